"""RetroMAE and DupMAE: masked auto-encoding through the [CLS] embedding (objectives/retromae.py).

  python -m pretrain.main --config=configs/dupmae.py:variant=retromae --workdir=workdir/retromae
  python -m pretrain.main --config=configs/dupmae.py:variant=dupmae --workdir=workdir/dupmae
  python -m pretrain.main --config=configs/dupmae.py:variant=dupmae,size=base,seq_len=512,\
batch_size=256,steps=100000,learning_rate=1e-4 --workdir=gs://BUCKET/runs/dupmae-base

Everything but the objective is configs/demo.py's (same model sizes, data, optimizer and schedule),
so a run here compares with an MLM run of configs/demo.py:whole_word=True at the same settings.
The objective follows the official recipe: encoder mask rate 0.3 of whole words, decoder mask rate
0.5, BoW weight 0.1 (DupMAE). The papers' optimizer is lr 1e-4 with 10% warmup and weight decay
0.01 at sequence 512 for base models (the third command); the demo keeps demo.py's 1e-3, which
suits its few hundred steps on 2 CPU cores.
"""
from configs import common, demo

VARIANTS = ("retromae", "dupmae")


def get_config(arg=None):
  a = common.parse_arg(arg, variant="dupmae", size="demo", steps=600, vocab_size=16000,
                       batch_size=8, seq_len=128, learning_rate=1e-3, mask_rate=0.3,
                       decoder_mask_rate=0.5, bow_weight=0.1, whole_word=True, arch="bert")
  if a.variant not in VARIANTS:
    raise ValueError(f"Unknown variant {a.variant!r} for configs/dupmae.py; allowed: "
                     f"{', '.join(VARIANTS)}.")
  c = demo.get_config(f"size={a.size},steps={a.steps},vocab_size={a.vocab_size},"
                      f"batch_size={a.batch_size},seq_len={a.seq_len},arch={a.arch},"
                      f"whole_word={a.whole_word}")
  c.objective.update(name=a.variant, mask_rate=a.mask_rate, decoder_mask_rate=a.decoder_mask_rate,
                     bow_weight=a.bow_weight)
  c.optimizer.learning_rate = a.learning_rate
  return c
