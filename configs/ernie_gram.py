"""ERNIE-Gram: explicitly n-gram masked LM (objectives/ernie_gram.py) on the demo encoder and data.

  python -m pretrain.main --config=configs/ernie_gram.py --workdir=workdir/ernie_gram
  python -m pretrain.main --config=configs/ernie_gram.py:relation --workdir=workdir/ernie_gram_erm
  python -m pretrain.main --config=configs/ernie_gram.py:size=tiny,steps=20 --workdir=/tmp/w

Everything but the objective is configs/demo.py's (model sizes, data, optimizer, schedule), so a
run here compares with `configs/demo.py` MLM at the same settings: evaluation reports the same
`mlm_accuracy` (plain token masking, the same masks) next to ERNIE-Gram's own coarse / fine /
n-gram metrics. The first run extracts the n-gram lexicon from the train split (seconds on the
embedded corpus) and saves it beside the tokenizer.
Options: `ngram_vocab_size` (lexicon size G: the joint vocabulary is tokens + G n-grams),
`max_n`, `score` (t_test or pmi), `comprehensive` (fine-grained predictions, default on),
`relation` (enhanced relation modelling: a generator of hidden x generator_fraction samples
n-grams for the masked slots, plus replaced-token detection weighted `rtd_weight`).
"""
from configs import common, demo


def get_config(arg=None):
  a = common.parse_arg(arg, size="demo", steps=600, vocab_size=16000, batch_size=8, seq_len=128,
                       ngram_vocab_size=8000, max_n=3, min_count=5, score="t_test",
                       comprehensive=True, relation=False, generator_fraction=0.25,
                       rtd_weight=50.0,
                       arch="bert")
  c = demo.get_config(f"size={a.size},steps={a.steps},vocab_size={a.vocab_size},"
                      f"batch_size={a.batch_size},seq_len={a.seq_len},arch={a.arch}")
  c.objective.update(name="ernie_gram", ngram_vocab_size=a.ngram_vocab_size, ngram_max_n=a.max_n,
                     ngram_min_count=a.min_count, ngram_score=a.score,
                     ngram_comprehensive=a.comprehensive, ngram_relation=a.relation,
                     generator_size_fraction=a.generator_fraction, generator_weight=1.0,
                     discriminator_weight=a.rtd_weight)
  return c
