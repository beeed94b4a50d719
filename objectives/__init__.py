"""The literal objective registry: one name, one constructor; no registration by import side effect.

Each objective module may define `CONFIG` (its own `config.objective` keys with defaults) and
`validate_config(config)`; `base_config()` merges every module's keys, so a recipe or a command
line can set them, and `validate` checks them all before anything compiles.
"""
from objectives import combined, contrastive, dupmae, electra, masking, mlm, ngram, rtd

REGISTRY = {
    "mlm": mlm.MaskedLM,
    "electra": electra.Electra,
    "rts": rtd.RandomTokenSubstitution,
    "crts": rtd.ClusterRandomTokenSubstitution,
    "slm": rtd.SwappedLM,
    "combined": combined.Combined,
    "retromae": dupmae.RetroMAE,
    "dupmae": dupmae.DupMAE,
    "ernie_gram": ngram.ErnieGram,
    "contrastive": contrastive.Contrastive,
}
NAMES = tuple(REGISTRY)
CONFIG_MODULES = (masking, mlm, rtd, electra, combined, dupmae, ngram, contrastive)


def get(name):
  """The objective class called `name`; an unknown name lists the valid ones."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown objective {name!r}; valid objectives: {', '.join(NAMES)}.")
  return REGISTRY[name]


def config_defaults():
  """Every module's objective keys; two modules may not define one key differently."""
  merged = {}
  for module in CONFIG_MODULES:
    for key, value in getattr(module, "CONFIG", {}).items():
      if key in merged and merged[key] != value:
        raise ValueError(f"objective key {key!r} is defined twice ({module.__name__}).")
      merged[key] = value
  return merged


def validate(config):
  """Runs every module's `validate_config`: keys are shared, so all of them are checked."""
  for module in CONFIG_MODULES:
    if hasattr(module, "validate_config"):
      module.validate_config(config)
