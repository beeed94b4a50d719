"""A compact student distilled from a frozen teacher during pretraining (objectives/distill.py).

  # The teacher: any MLM workdir, export or Hugging Face *ForMaskedLM directory; here the demo's.
  python -m pretrain.main --config=configs/demo.py --workdir=workdir/demo
  python -m pretrain.main --config=configs/distill.py:teacher=workdir/demo --workdir=workdir/d2
  # Cut from the teacher first (DistilBERT: every k-th layer), logits + hidden states:
  python -m pretrain.main --config=configs/distill.py:teacher=workdir/demo,init=every_k,hidden_weight=1 \
      --workdir=workdir/d2_init
  # The same student's plain MLM at equal steps (no teacher):
  python -m pretrain.main --config=configs/distill.py --workdir=workdir/d2_mlm

The student is the demo recipe (configs/demo.py: data, optimizer, cadence) with `layers` layers
of the `size` width. With `teacher=` the objective is `distill` and the student reads the
teacher's tokenizer (a workdir's tokenizer/ copy, else the directory itself; `vocab_size` must be
the teacher's); without it, the same student trains with plain MLM: the baseline of the
comparison. `init=every_k|first` starts the student from the teacher's layers
(config.init_from_layers, pretrain/interop/student_init.py), cut to its width.
`size=tiny,layers=1` with a small vocabulary is what the tests use.
"""
import os

from configs import common, demo


def teacher_tokenizer(teacher):
  """A pretraining workdir keeps its tokenizer in tokenizer/; exports and HF dirs hold theirs."""
  inside = os.path.join(teacher, "tokenizer")
  return inside + os.sep if os.path.isdir(os.path.join(teacher, "checkpoints")) else teacher


def get_config(arg=None):
  a = common.parse_arg(arg, teacher="", size="demo", layers=2, steps=600, vocab_size=16000,
                       batch_size=8, seq_len=128, init="", temperature=2.0, logit_weight=1.0,
                       mlm_weight=0.0, hidden_weight=0.0)
  c = demo.get_config(f"size={a.size},steps={a.steps},vocab_size={a.vocab_size},"
                      f"batch_size={a.batch_size},seq_len={a.seq_len}")
  c.model.num_layers = a.layers
  if not a.teacher:
    if a.init:
      raise common.ConfigError("configs/distill.py: init= cuts the student from the teacher; "
                               "give teacher=<dir> too.")
    return c
  c.objective.update(name="distill", teacher=a.teacher, distill_temperature=a.temperature,
                     logit_weight=a.logit_weight, mlm_weight=a.mlm_weight,
                     hidden_weight=a.hidden_weight)
  c.data.tokenizer.path = teacher_tokenizer(a.teacher)
  if a.init:
    c.init_from, c.init_from_layers = a.teacher, a.init
  return c
