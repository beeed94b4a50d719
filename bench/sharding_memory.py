"""Parameter + optimizer-state bytes per device for BERT-base and BERT-large, data-only vs FSDP.

  python bench/sharding_memory.py

Read from the real shardings of the real train state (`eval_shape`, nothing allocated) on 8
fake CPU devices, not from a formula.
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import bert  # noqa: E402
from pretrain.training import optimizer as optimizer_lib, sharding
from objectives import registry
from pretrain.training import state as state_lib

MESHES = {"data=8": {"data": 8, "fsdp": 1, "tensor": 1},
          "fsdp=8": {"data": 1, "fsdp": 8, "tensor": 1},
          "data=2,fsdp=2,tensor=2": {"data": 2, "fsdp": 2, "tensor": 2}}


class _Vocab:
  def __init__(self, size):
    self.vocab_size = size

  def word_start_table(self):
    return np.zeros(self.vocab_size, bool)


def bytes_per_device(tree):
  """Largest per-device footprint: each leaf's shard shape times its item size, summed."""
  per_device = {}
  for x in jax.tree.leaves(tree):
    for device, index in x.sharding.devices_indices_map(x.shape).items():
      shard = [len(range(*s.indices(n))) for s, n in zip(index, x.shape)]
      per_device[device] = per_device.get(device, 0) + int(np.prod(shard)) * x.dtype.itemsize
  return max(per_device.values())


def main():
  print(f"{'model':<12}{'mesh':<26}{'params/device':>16}{'optimizer/device':>18}{'total/device':>16}")
  for size in ("base", "large"):
    config = bert.get_config(f"size={size}")
    objective = registry.build(config, _Vocab(config.data.tokenizer.vocab_size))
    tx, _ = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
    for name, mesh_config in MESHES.items():
      mesh = sharding.make_mesh(mesh_config)
      target, _ = state_lib.abstract_state(objective, tx, config.data.seq_len, mesh,
                                       sharding.rules(config.axis_rules))
      p, o = bytes_per_device(target.params), bytes_per_device(target.opt_state)
      print(f"{'bert-' + size:<12}{name:<26}{p / 2**20:>13.1f}MiB{o / 2**20:>15.1f}MiB"
            f"{(p + o) / 2**20:>13.1f}MiB")


if __name__ == "__main__":
  main()
