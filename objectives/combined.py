"""Several objectives over one shared encoder, their losses summed with weights.

  --config.objective.name=combined --config.objective.components="mlm:1.0,rts:0.5"

Why a composite instead of a multi-objective train step: the train step stays objective-agnostic
(objectives/base.py), and any pair of objectives that read the same batch format combines
without either knowing. Each component is built from the same flat `config.objective` block, so
shared keys (mask_rate, whole_word, ...) mean the same thing to all of them.

- Parameters: one tree. Every component's `init` runs; "encoder" comes from the first and the
  others' are dropped (same model config, same shapes), so gradients from every loss meet in one
  encoder. Other top-level entries (heads, generator, decoder) are merged by name: two components
  with an entry of the same name (e.g. "mlm_head" of mlm and slm) share it, which is what tying a
  head across objectives means; their shapes must agree.
- Randomness: component i draws from fold_in(rng, i), so adding a component never changes the
  masks of the others.
- Metrics are prefixed "<name>/"; "loss" is the weighted total. Non-gradient state is a dict by
  component name (C-RTS counts, MoCo queues) and checkpoints with the train state.
- All components must take the same input format: objectives that bring their own
  their own `input_format` (contrastive pairs) combine only with objectives of the same format.
"""
import jax
import jax.numpy as jnp
import numpy as np

from objectives import base, checks


CONFIG = dict(
    components="mlm:1.0",  # combined: comma-separated name:weight pairs over one shared encoder
)


def parse_components(spec):
  """"mlm:1,rts:0.5" -> [("mlm", 1.0), ("rts", 0.5)]; a bare name weighs 1."""
  pairs = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, _, weight = item.partition(":")
    try:
      pairs.append((name.strip(), float(weight) if weight else 1.0))
    except ValueError as e:
      raise ValueError(f"objective.components={spec!r}: weight {weight!r} of {name!r} is not a "
                       f"number; write name:weight pairs like 'mlm:1.0,rts:0.5'.") from e
  return pairs


def validate_components(o, allowed):
  """Checks `objective.components` of objective config `o` against the registry's `allowed`
  names (the registry calls this: it sits above this module)."""
  pairs = parse_components(o.components)
  names = [n for n, _ in pairs]
  checks.require(pairs and all(n in allowed for n in names) and len(set(names)) == len(names),
                 "objective.components", o.components,
                 f"distinct name:weight pairs of {', '.join(allowed)}")
  checks.require(all(w >= 0 for _, w in pairs) and sum(w for _, w in pairs) > 0,
                 "objective.components", o.components, "weights >= 0, not all 0")


class Combined(base.Objective):
  """A weighted sum of registered objectives sharing params["encoder"]."""

  def __init__(self, config, model_config, components):
    """`components`: {name: objective} in `config.components` order, built by the registry."""
    self.config = config
    self.model_config = model_config
    self.weights = parse_components(config.components)
    self.components = components
    formats = {c.input_format for c in self.components.values()}
    if len(formats) > 1:
      raise ValueError(f"objective.components={config.components!r} mixes input formats "
                       f"({', '.join(sorted(formats))}); combine objectives that read the same "
                       f"batches.")
    parts = list(self.components.values())
    first = parts[0]
    self.input_format = first.input_format
    self.features = tuple(dict.fromkeys(f for c in parts for f in c.features))
    self.shape_fields = tuple(dict.fromkeys(f for c in parts for f in c.shape_fields))
    self.export_format = "electra" if any(c.export_format == "electra" for c in parts) else "bert"
    self.generator_config = next((c.generator_config for c in parts if c.generator_config), None)
    self.pooler_config = next((c.pooler_config for c in parts if c.pooler_config), None)
    self.first = first

  def dataset_options(self):
    return self.first.dataset_options()

  def example_batch(self, seq_len):
    return self.first.example_batch(seq_len)

  def init(self, rng, batch):
    params = {}
    for i, (name, component) in enumerate(self.components.items()):
      for key, value in component.init(jax.random.fold_in(rng, i), batch).items():
        if key in params:
          _check_same_shapes(params[key], value, key, name)
        else:
          params[key] = value
    return params

  def init_state(self):
    return {name: c.init_state() for name, c in self.components.items()}

  def loss(self, params, state, batch, rng, *, train):
    total, metrics, new_state = jnp.zeros((), jnp.float32), {}, {}
    for i, (name, weight) in enumerate(self.weights):
      loss, (m, new_state[name]) = self.components[name].loss(
          params, state[name], batch, jax.random.fold_in(rng, i), train=train)
      total = total + weight * loss
      metrics.update({f"{name}/{k}": v for k, v in m.items()})
    metrics["loss"] = (total, jnp.ones((), jnp.float32))
    return total, (metrics, new_state)

  def export_extras(self, out_dir, params):
    for component in self.components.values():
      component.export_extras(out_dir, params)

  def import_extras(self, model_dir, params):
    for component in self.components.values():
      params = component.import_extras(model_dir, params)
    return params


def _check_same_shapes(kept, other, key, name):
  shapes = lambda tree: jax.tree.map(np.shape, tree)  # noqa: E731
  if shapes(kept) != shapes(other):
    raise ValueError(f"objective.components: {name!r} has a {key!r} of another shape than the "
                     f"component before it; they cannot share it.")
