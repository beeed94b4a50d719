"""The fine-tuning command line.

  python -m pretrain.finetune --config=configs/finetune/exception_type.py \\
      --config.init=exports/demo --workdir=workdir/ft_exception
"""
import json
import time

import jax
from absl import flags
from ml_collections import config_flags

from pretrain import cli, console
from pretrain.finetune import train


def main(argv):
  del argv
  console.quiet(flags.FLAGS["verbosity"].present)
  jax.config.update("jax_threefry_partitionable", True)
  t0 = time.perf_counter()
  workdir = flags.FLAGS.workdir
  results = train.train_and_evaluate(flags.FLAGS.config, workdir)
  scores = {k: round(v, 4) for k, v in results.items() if k.startswith(("dev_", "test_"))}
  print(f"Done in {time.perf_counter() - t0:.0f}s: {json.dumps(scores)} "
        f"({workdir}/{train.RESULTS_FILE})", flush=True)


if __name__ == "__main__":
  # Defined here, not at import, so that importing this module defines no flags.
  config_flags.DEFINE_config_file("config", None, "configs/finetune/<task>.py[:key=value,...]")
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
