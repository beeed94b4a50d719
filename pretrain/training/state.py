"""The train state and its sharded creation: eval_shape -> logical specs -> jit(init) in place.

`model` is anything with the objective interface's `init`, `init_state` and `example_batch`
(objectives.base.Objective, or a fine-tuning task model): this floor never imports objectives.
"""
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pretrain.training import nonfinite as nonfinite_lib, sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  obj_state: Any
  nonfinite: Any  # nonfinite.NonFinite: steps whose loss, gradients or update were NaN/inf


def init_state(rng, model, tx, seq_len):
  """A fresh TrainState whose parameters (and optimizer moments) keep their logical-axis boxes."""
  params = model.init(rng, model.example_batch(seq_len))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    obj_state=model.init_state(), nonfinite=nonfinite_lib.init())


def sharded_init(rng, model, tx, seq_len, mesh, axis_rules):
  """Shardings from `eval_shape` -> logical specs, then an init that lands directly in place."""
  init = functools.partial(init_state, model=model, tx=tx, seq_len=seq_len)
  shardings = sharding.logical_shardings(jax.eval_shape(init, rng), mesh, axis_rules)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def abstract_state(model, tx, seq_len, mesh, axis_rules):
  """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
  init = functools.partial(init_state, model=model, tx=tx, seq_len=seq_len)
  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, mesh, axis_rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(boxed), shardings), shardings


def check_same_shapes(loaded, expected, where):
  """Raises naming the first parameter of `expected` that `loaded` lacks or shapes otherwise."""
  flat_loaded = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  for key, value in jax.tree_util.tree_flatten_with_path(expected)[0]:
    got = flat_loaded.get(key)
    if got is None or np.shape(got) != value.shape:
      raise ValueError(f"init_from {where}: parameter {jax.tree_util.keystr(key)} is "
                       f"{None if got is None else np.shape(got)} there but {value.shape} in this "
                       f"model; make config.model match the checkpoint.")
