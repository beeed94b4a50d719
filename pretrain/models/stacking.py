"""The scanned encoder's parameter layout, and the pure conversions to and from the canonical one.

The canonical layout, everywhere outside a scanned run's train state (exports, imports,
`init_from`, fine-tuning, guides), names every layer: ``layer_0 .. layer_{n-1}``. With
``EncoderConfig.scan_layers`` the layers that share a compiled body are stacked instead:

  layer_{i}                      for i < head (pre-norm: layer 0, which has no attention_norm)
  scanned_layers/offset_{j}/...  every leaf [groups, ...]: layer head + k * group + j is row k
  layer_{i}                      for the tail, head + groups * group <= i < num_layers

``group`` is global_every with local attention (one global layer, then global_every - 1 local
ones: each offset has one static kind and rotary base), else 1. The stacked layout describes
itself (the offsets, the rows and the remaining ``layer_{i}`` keys give every index back), so
`unstack_layers` needs no config and `stack_like` copies the layout of any stacked tree.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pretrain.models.encoder_config import EncoderConfig

SCANNED = "scanned_layers"  # The nn.scan module's name in the Encoder's params.
LAYERS_AXIS = "layers"  # The logical axis name of the stacked dimension.


class Layout(NamedTuple):
  head: int  # Unrolled layers before the scan.
  group: int  # Layers per scanned body.
  groups: int  # Scan length (0: nothing scanned).
  num_layers: int

  def index(self, k: int, j: int) -> int:
    """The layer index of offset `j` in group `k`."""
    return self.head + k * self.group + j

  def scanned(self, i: int) -> bool:
    return self.head <= i < self.head + self.groups * self.group


def layout(config: EncoderConfig) -> Layout:
  """The scanned layout of `config` (whether or not `config.scan_layers` is set)."""
  head = 1 if config.pre_norm else 0
  group = config.global_every if config.local_window else 1
  return Layout(head, group, (config.num_layers - head) // group, config.num_layers)


def layout_of(stacked: dict) -> Layout:
  """The layout of an encoder tree in the stacked layout (see the module docstring)."""
  offsets = stacked[SCANNED]
  groups = jax.tree.leaves(offsets)[0].shape[0]
  present = {int(k[len("layer_"):]) for k in stacked if k.startswith("layer_")}
  num_layers = len(present) + len(offsets) * groups
  head = min(i for i in range(num_layers) if i not in present)
  return Layout(head, len(offsets), groups, num_layers)


def _stack(*xs):
  if all(isinstance(x, np.ndarray) for x in xs):
    return np.stack(xs)
  return jnp.stack(xs)


def _stack_with(params: dict, lay: Layout) -> dict:
  if SCANNED in params or not lay.groups:
    return params
  out = {k: v for k, v in params.items()
         if not (k.startswith("layer_") and lay.scanned(int(k[len("layer_"):])))}
  out[SCANNED] = {
      f"offset_{j}": jax.tree.map(_stack, *[params[f"layer_{lay.index(k, j)}"]
                                            for k in range(lay.groups)])
      for j in range(lay.group)}
  return out


def stack_layers(params: dict, config: EncoderConfig) -> dict:
  """Canonical encoder params -> the layout of `config` with scan_layers (unchanged when it is
  already stacked or nothing scans)."""
  return _stack_with(params, layout(config))


def unstack_layers(params: dict, config: EncoderConfig | None = None) -> dict:
  """Stacked (or canonical) encoder params -> canonical ``layer_0 .. layer_{n-1}``."""
  del config  # The stacked layout describes itself.
  if SCANNED not in params:
    return params
  lay = layout_of(params)
  out = {k: v for k, v in params.items() if k != SCANNED}
  for k in range(lay.groups):
    for j in range(lay.group):
      out[f"layer_{lay.index(k, j)}"] = jax.tree.map(
          lambda x, k=k: x[k], params[SCANNED][f"offset_{j}"])
  return out


def unstack_all(tree: Any) -> Any:
  """Every stacked encoder tree inside `tree` (a run's params: encoder, generator...) unstacked."""
  if not isinstance(tree, dict):
    return tree
  if SCANNED in tree:
    return unstack_layers(tree)
  return {k: unstack_all(v) for k, v in tree.items()}


def stack_like(tree: Any, target: Any) -> Any:
  """`tree` (canonical) with every encoder subtree stacked where `target` (e.g. a scanned run's
  fresh params) holds a stacked one, in the same layout."""
  if not isinstance(tree, dict) or not isinstance(target, dict):
    return tree
  if SCANNED in target:
    return _stack_with(tree, layout_of(target))
  return {k: stack_like(v, target[k]) if k in target else v for k, v in tree.items()}


def is_stacked(tree: Any) -> bool:
  """Whether any encoder tree inside `tree` is in the stacked layout."""
  return isinstance(tree, dict) and (SCANNED in tree or any(map(is_stacked, tree.values())))
