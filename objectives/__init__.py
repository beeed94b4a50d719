"""The literal objective registry: one name, one constructor; no registration by import side effect."""
from objectives import electra, mlm, rtd

REGISTRY = {
    "mlm": mlm.MaskedLM,
    "electra": electra.Electra,
    "rts": rtd.RandomTokenSubstitution,
    "crts": rtd.ClusterRandomTokenSubstitution,
    "slm": rtd.SwappedLM,
}
NAMES = tuple(REGISTRY)


def get(name):
  """The objective class called `name`; an unknown name lists the valid ones."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown objective {name!r}; valid objectives: {', '.join(NAMES)}.")
  return REGISTRY[name]
