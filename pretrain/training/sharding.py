"""Device meshes and logical-axis shardings: the one place that turns axis names into placements.

Parameters carry logical names (`vocab, embed, mlp, heads, kv`), activations `batch, length, embed`;
`config.axis_rules` maps them to the mesh axes `data, fsdp, tensor`. A one-device run is still a mesh.
"""
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config, num_devices):
  """Axis sizes with the single -1 resolved; errors name the numbers and the fix."""
  sizes = [int(mesh_config[a]) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"Mesh {dict(zip(AXES, sizes))}: at most one axis may be -1 (the rest).")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"Mesh {dict(zip(AXES, sizes))}: the fixed axes multiply to {known}, which "
                       f"does not divide the {num_devices} devices; choose sizes that divide it.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"Mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but there are "
                     f"{num_devices}; make the product of data*fsdp*tensor equal {num_devices} "
                     f"(or set one axis to -1).")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None):
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def rules(axis_rules):
  """Config rules (lists after a JSON round trip) as the tuples flax expects."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in axis_rules)


# The config key behind each logical axis, for the error when a mesh axis does not divide it.
LOGICAL_SIZES = {"heads": "model.num_heads", "mlp": "model.mlp_dim",
                 "vocab": "data.tokenizer.vocab_size", "embed": "model.hidden_size",
                 "kv": "model.hidden_size / model.num_heads",
                 "layers": "model.num_layers (the scanned groups of model.scan_layers)"}


def logical_shardings(boxed_tree, mesh, axis_rules):
  """NamedShardings for a tree of `nn.Partitioned` leaves (unannotated leaves are replicated)."""
  specs = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules(axis_rules))
  check_divisible(boxed_tree, shardings)
  return shardings


def check_divisible(boxed_tree, shardings):
  """Every sharded dimension must split evenly over its mesh axes (jit refuses otherwise, naming
  neither the config key nor the mesh axis): raises naming both and the fix."""
  is_leaf = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
  leaves = jax.tree_util.tree_flatten_with_path(boxed_tree, is_leaf=is_leaf)[0]
  for (path, leaf), named in zip(leaves, jax.tree.leaves(shardings), strict=True):
    names = leaf.names if isinstance(leaf, nn.Partitioned) else ()
    shape = np.shape(leaf.value if isinstance(leaf, nn.Partitioned) else leaf)
    for dim, (size, axes) in enumerate(zip(shape, named.spec)):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      shards = math.prod(named.mesh.shape[a] for a in axes)
      if shards > 1 and size % shards:
        logical = names[dim] if dim < len(names) else None
        key = LOGICAL_SIZES.get(logical, f"the size of logical axis {logical!r}")
        mesh_keys = "*".join(f"mesh.{a}={named.mesh.shape[a]}" for a in axes)
        raise ValueError(
            f"{key}: {size} does not split over {mesh_keys} (parameter "
            f"{jax.tree_util.keystr(path)}, dimension {dim}); make {key} a multiple of {shards} "
            f"or change config.mesh (or config.axis_rules for {logical!r}).")


def batch_sharding(mesh, axis_rules):
  """Rows split over the axes the `batch` rule names; every other dimension replicated."""
  batch_axes = dict(rules(axis_rules)).get("batch")
  return NamedSharding(mesh, P(batch_axes))


def replicated(mesh):
  return NamedSharding(mesh, P())


def global_batch(local_batch, sharding):
  """Each process's rows -> one global jax.Array (multi-process safe)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def assert_sufficiently_sharded(params, mesh, min_size=2**16):
  """Fails when an FSDP/tensor mesh leaves a large parameter fully replicated (MaxText's guard)."""
  if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
    return
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if x.size >= min_size and x.sharding.is_fully_replicated:
      raise ValueError(f"Parameter {jax.tree_util.keystr(path)} {x.shape} is replicated on a mesh "
                       f"with fsdp/tensor axes; add an axis rule for its logical names.")
