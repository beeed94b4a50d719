"""One of two real processes on 127.0.0.1 (see test_multiprocess.py): reads its data shard,
assembles the global batch, then trains, checkpoints and resumes through train_and_evaluate."""
import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils


def main(coordinator, process_id, config_json, workdir, out):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
  import ml_collections  # pylint: disable=import-outside-toplevel
  from pretrain.training import sharding
  from pretrain import train  # pylint: disable=import-outside-toplevel
  from pretrain.data import pipeline, sources, tokenizer  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(json.loads(config_json))
  d = config.data
  tok = tokenizer.load_or_train(d)
  data = pipeline.make_dataset(sources.open_source(d, d.train_split), tok, seq_len=d.seq_len,
                               batch_size=d.batch_size, seed=d.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
  local = next(iter(data))
  mesh = sharding.make_mesh(config.mesh)
  batch = sharding.global_batch(local, sharding.batch_sharding(mesh, sharding.rules(config.axis_rules)))
  gathered = multihost_utils.process_allgather(batch["input_ids"], tiled=True)
  np.savez(out, local=local["input_ids"], gathered=np.asarray(gathered),
           devices=jax.device_count(), local_devices=jax.local_device_count())
  steps = config.train.steps
  config.train.steps = steps // 2
  first = train.train_and_evaluate(config, workdir)
  config.train.steps = steps
  second = train.train_and_evaluate(config, workdir)
  with open(out + ".json", "w") as f:
    json.dump({"first": first, "second": second}, f)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
