"""BERT / CuBERT masked-LM pretraining at the classic sizes (the original recipe's optimizer).

  python -m pretrain.main --config=configs/bert.py:size=base --workdir=gs://bucket/bert-base
  python -m pretrain.main --config=configs/bert.py:size=base,data=wikipedia/20230601.en ...
"""
from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, size="base", data="python_stdlib", steps=1_000_000, batch_size=256,
                       seq_len=128, vocab_size=32000, whole_word=True)
  c = common.base_config()
  c.model = common.model_config(a.size)
  c.data.name = a.data
  c.data.seq_len = a.seq_len
  c.data.batch_size = a.batch_size
  c.data.tokenizer.vocab_size = a.vocab_size
  c.objective.whole_word = a.whole_word
  c.optimizer.update(learning_rate=1e-4, warmup_steps=10_000, weight_decay=0.01, b2=0.999)
  c.train.update(steps=a.steps, log_every=100, eval_every=10_000, eval_batches=50,
                 checkpoint_every=5_000)
  return c
