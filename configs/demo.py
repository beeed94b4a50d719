"""The embedded default: MLM on the interpreter's own Python files, small enough for 2 CPU cores.

  python -m pretrain.main --config=configs/demo.py --workdir=workdir/demo
  python -m pretrain.main --config=configs/demo.py:size=tiny,steps=20 --workdir=/tmp/w
  python -m pretrain.main --config=configs/demo.py:objective=electra --workdir=workdir/electra

`size=tiny` with a small vocabulary is what the tests use. `objective=` swaps the objective and
keeps everything else (model, data, optimizer), which is what comparisons between objectives need;
electra, rts, crts and slm take their corruption rates from configs/electra.py. `arch=` swaps the
architecture the same way (configs/modernbert.py's ARCHITECTURES: bert, rope, geglu, prenorm,
modern).
"""
from configs import common, electra, modernbert


def get_config(arg=None):
  a = common.parse_arg(arg, size="demo", steps=600, vocab_size=16000, batch_size=8, seq_len=128,
                       whole_word=False, objective="mlm", arch="bert")
  c = common.base_config()
  c.model = common.model_config(a.size)
  c.model.update(modernbert.architecture(a.arch, c.model.mlp_dim))
  c.model.max_len = max(512, a.seq_len)
  # Minutes of CPU: more, smaller steps and no dropout leave the unigram plateau sooner (the
  # README's demo section compares the two).
  c.model.dropout_rate = 0.0
  c.data.seq_len = a.seq_len
  c.data.batch_size = a.batch_size
  c.data.tokenizer.vocab_size = a.vocab_size
  c.data.tokenizer.max_train_bytes = 8_000_000  # Enough text for 16k pieces; keeps the demo short.
  c.objective.name = a.objective
  c.objective.whole_word = a.whole_word
  if a.objective in electra.CORRUPTION:
    c.objective.mask_token_rate, c.objective.random_token_rate = electra.CORRUPTION[a.objective]
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = a.steps // 10
  common.short_run_cadence(c.train, a.steps)
  return c
