"""Contrastive training on pair files: (query, positive[, hard negatives]) rows of your own.

  python -m pretrain.main --config=configs/pair_files.py:base=minilm,negatives=3 \
      --config.data.paths='pairs/*.jsonl' --workdir=workdir/pairs
  python -m pretrain.main --config=configs/pair_files.py:base=minilm,negatives=3,guide=True \
      --config.data.paths=triplets.csv --config.data.query_prefix='query: ' --workdir=W
  python -m pretrain.main --config=configs/pair_files.py:base=scratch,negatives=3,distill=margin_mse \
      --config.data.paths=triplets.jsonl --workdir=W

The files are FlagEmbedding's JSON lines ({"query", "pos": [...], "neg": [...]}) or
sentence-transformers' columns (anchor, positive, negative / negative_1, ...), as
pretrain/data/pair_files.py reads them; `negatives=k` scores k hard negatives per query next to
every in-batch candidate. Everything else is configs/code_pairs.py's (base=minilm: continue
all-MiniLM-L6-v2 with its WordPiece tokenizer; guide=True: GISTEmbed with it as the guide;
distill=kl or margin_mse: it teaches the student's scores).
"""
from configs import code_pairs, common


def get_config(arg=None):
  a = common.parse_arg(arg, base="minilm", negatives=0, guide=False, size="demo", steps=600,
                       batch_size=32, seq_len=128, learning_rate=5e-4, temperature=0.0,
                       vocab_size=16000, distill="none")
  c = code_pairs.get_config(
      f"base={a.base},guide={a.guide},size={a.size},steps={a.steps},batch_size={a.batch_size},"
      f"seq_len={a.seq_len},learning_rate={a.learning_rate},temperature={a.temperature},"
      f"vocab_size={a.vocab_size},distill={a.distill}")
  c.data.name = "pair_files"
  c.objective.update(view="files", num_negatives=a.negatives)
  return c
