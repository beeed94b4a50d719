"""The literal objective registry: one name, one constructor; no registration by import side effect."""
from objectives import mlm

REGISTRY = {
    "mlm": mlm.MaskedLM,
}
NAMES = tuple(REGISTRY)


def get(name):
  """The objective class called `name`; an unknown name lists the valid ones."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown objective {name!r}; valid objectives: {', '.join(NAMES)}.")
  return REGISTRY[name]
