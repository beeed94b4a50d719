"""Entry point: `python -m pretrain.main --config=configs/demo.py --workdir=workdir/demo`.

Parses flags and the config, starts jax.distributed when asked, and calls `train_and_evaluate`.
Rerunning the same command resumes from the workdir's latest checkpoint.
"""
from absl import flags, logging
from ml_collections import config_flags

import jax

from pretrain import cli, console, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py:size=tiny.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() (TPU VM and SLURM fill in the rest).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  console.quiet(flags.FLAGS["verbosity"].present)
  jax.config.update("jax_threefry_partitionable", True)
  if _MULTIHOST.value or _COORDINATOR.value:
    # CPU processes need a collectives backend of their own; TPUs and GPUs ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:  # No cluster environment to fill in what the flags left out.
      raise ValueError(
          f"--multihost: jax.distributed.initialize failed ({e}); TPU VMs and SLURM fill in the "
          "cluster, elsewhere pass --coordinator_address=host:port, --num_processes and "
          "--process_id.") from e
  logging.info("Process %d of %d, %d local devices of %d.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
