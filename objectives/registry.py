"""The literal objective registry: one name, one class; no registration by import side effect.

Each objective module defines `CONFIG` (its own `config.objective` keys with defaults);
`config_defaults()` merges them so that a recipe or a command line can set any of them, and
`validate(config)` runs the checks of the objective (or the components) the run uses.
`build(config, tokenizer, resources)` is how every caller makes an objective from a run config.
"""
import dataclasses

import jax

from objectives import (base, combined, contrastive, detection, distill, electra, ernie_gram,
                        masking, mlm, prop, retromae)
from objectives.checks import ConfigError
from pretrain.models import attention_kernels, encoder as enc

REGISTRY = {
    "mlm": mlm.MaskedLM,
    "electra": electra.Electra,
    "rts": detection.RandomTokenSubstitution,
    "crts": detection.ClusterRandomTokenSubstitution,
    "slm": detection.SwappedLM,
    "combined": combined.Combined,
    "retromae": retromae.RetroMAE,
    "dupmae": retromae.DupMAE,
    "ernie_gram": ernie_gram.ErnieGram,
    "contrastive": contrastive.Contrastive,
    "prop": prop.Prop,
    "distill": distill.Distill,
}
NAMES = tuple(REGISTRY)
COMPONENTS = tuple(n for n in NAMES if n != "combined")  # what `combined` may combine
CONFIG_MODULES = (masking, detection, electra, combined, retromae, ernie_gram, contrastive, prop,
                  distill)
Resources = base.Resources


def get(name):
  """The objective class called `name`; an unknown name lists the valid ones."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown objective {name!r}; valid objectives: {', '.join(NAMES)}.")
  return REGISTRY[name]


def _classes(objective_config):
  """The classes whose checks and needs apply: the objective's, or (combined) its components'."""
  if objective_config.name == "combined":
    return [REGISTRY[n] for n, _ in combined.parse_components(objective_config.components)]
  return [REGISTRY[objective_config.name]]


def config_defaults():
  """Every module's objective keys; two modules may not define one key differently."""
  merged = {}
  for module in CONFIG_MODULES:
    for key, value in module.CONFIG.items():
      if key in merged and merged[key] != value:
        raise ValueError(f"objective key {key!r} is defined twice ({module.__name__}).")
      merged[key] = value
  return merged


def validate(config):
  """The checks of every class the run builds (combined: the component list first, so that an
  unknown name is reported before any component's checks run)."""
  get(config.objective.name)
  if config.objective.name == "combined":
    combined.validate_components(config.objective, COMPONENTS)
  for cls in _classes(config.objective):
    cls.validate(config)
  m = config.model
  reason = attention_kernels.problem(
      m.get("attention", "xla"), jax.default_backend(), m.hidden_size // m.num_heads,
      config.data.seq_len, m.dtype, m.get("attention_interpret", False))
  if reason:  # A kernel that cannot run this shape or backend: refused before anything compiles.
    raise ConfigError(reason)


def needs(objective_config) -> frozenset:
  """The `Resources` fields the entry point must build for this config."""
  return frozenset().union(*(cls.needs(objective_config) for cls in _classes(objective_config)))


# `config.model` keys that are EncoderConfig fields of the same name (and meaning).
ARCHITECTURE_KEYS = ("position", "rope_theta", "rope_local_theta", "mlp", "pre_norm", "norm",
                     "norm_bias", "use_bias", "type_vocab_size", "layer_norm_eps", "local_window",
                     "global_every", "mlm_head", "vocab_multiple", "attention",
                     "attention_interpret", "scan_layers", "remat")


def encoder_config(model_config, vocab_size) -> enc.EncoderConfig:
  """The `EncoderConfig` of a run config's `model` block."""
  m = model_config
  # The architecture keys, with EncoderConfig's defaults for configs saved before they existed.
  defaults = {f.name: f.default for f in dataclasses.fields(enc.EncoderConfig)}
  options = {key: m.get(key, defaults[key]) for key in ARCHITECTURE_KEYS}
  return enc.EncoderConfig(
      vocab_size=vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
      num_heads=m.num_heads, mlp_dim=m.mlp_dim, max_len=m.max_len, dropout_rate=m.dropout_rate,
      dtype=m.dtype, embedding_size=m.get("embedding_size", 0) or None, **options)


def build(config, tokenizer, resources: base.Resources = base.Resources()):
  """The objective of run config `config`, over `config.model` with the tokenizer's vocabulary
  size from `config.data.tokenizer.vocab_size`."""
  o = config.objective
  model_config = encoder_config(config.model, config.data.tokenizer.vocab_size)
  if o.name == "combined":
    return combined.Combined(o, model_config, {
        name: get(name)(o, model_config, tokenizer, resources)
        for name, _ in combined.parse_components(o.components)})
  return get(o.name)(o, model_config, tokenizer, resources)
