"""The recipe `make demo` trains: the best MLM measured for a few minutes on 2 CPU cores.

  python -m pretrain.main --config=configs/cpu_recipe.py --workdir=workdir/demo
  python -m pretrain.main --config=configs/cpu_recipe.py:steps=2400 --workdir=workdir/longer

configs/demo.py (demo size: 4 layers, hidden 256, 8 x 128-token batches, lr 1e-3, no dropout)
with what helped in the screen of the README's "A recipe for 2 CPU cores": rotary positions and
30% masking (ModernBERT's rate). The architecture is the whole ModernBERT-class encoder
(arch=modern), which scores as RoPE alone does here (held-out MLM accuracy 0.450 both, 1,200
steps) and exports as a transformers ModernBertForMaskedLM directory (RoPE on BERT has no
transformers class; arch=rope trains it, exported as Flax params). It also probes the encoder at
step 0 and at the end (train.probe_every: exception type, docstring match, zero-shot docstring ->
code retrieval on the held-out stdlib files), so `pretrain.report` shows what pretraining bought
over the random init of step 0. demo.py itself keeps BERT's defaults, which the comparisons and
golden tests are measured against.
"""
from configs import common, demo


def get_config(arg=None):
  a = common.parse_arg(arg, steps=1200, mask_rate=0.3, arch="modern", probe_rows=500)
  c = demo.get_config(f"steps={a.steps},arch={a.arch}")
  c.objective.mask_rate = a.mask_rate
  # Probes at step 0 and at the last step (which always probes): probe_every is the first
  # multiple of eval_every past the run.
  every = c.train.eval_every
  c.train.update(probe_every=every * (a.steps // every + 1), probe_rows=a.probe_rows,
                 probe_tasks="exception_type,docstring_match,docstring_retrieval")
  return c
