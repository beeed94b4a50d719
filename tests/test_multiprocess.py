"""Two real processes on 127.0.0.1 (jax.distributed + gloo, 4 fake CPU devices each)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import ROOT
from tests import e2e


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_checkpoint_and_resume(corpus, tmp_path):
  from configs import demo  # pylint: disable=import-outside-toplevel
  e2e.run("pretrain.data.prepare", *e2e.flags(corpus)[:6])
  config = demo.get_config("size=tiny,vocab_size=400,steps=8,batch_size=16,seq_len=64")
  config.data.update(name="local_text", paths=str(corpus / "code.jsonl"), data_dir=str(corpus / "tfds"),
                     validation_fraction=0.2)
  config.train.update(checkpoint_every=2, eval_every=4, eval_batches=2, log_every=2,
                      probe_every=4, probe_tasks="docstring_retrieval", probe_rows=64,
                      probe_max_files=100)
  config.mesh.update(data=2, fsdp=4, tensor=1)
  # Cheap compilation, as in conftest: each process compiles more than it runs.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
                      " --xla_llvm_disable_expensive_passes=true"}
  coordinator = f"127.0.0.1:{_free_port()}"
  workdir, outs = tmp_path / "work", [str(tmp_path / f"p{i}.npz") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "multiprocess_worker.py"),
                             coordinator, str(i), config.to_json(), str(workdir), outs[i]],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-5000:]
  a, b = (np.load(o) for o in outs)
  assert int(a["devices"]) == 8 and int(a["local_devices"]) == 4
  rows_a, rows_b = {r.tobytes() for r in a["local"]}, {r.tobytes() for r in b["local"]}
  assert not rows_a & rows_b, "the two processes read the same rows"
  np.testing.assert_array_equal(a["gathered"], np.concatenate([a["local"], b["local"]]))
  np.testing.assert_array_equal(a["gathered"], b["gathered"])
  results = [json.load(open(o + ".json")) for o in outs]
  assert results[0]["second"]["mlm_loss"] == results[1]["second"]["mlm_loss"]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 8
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows if "mlm_loss" in r] == [2, 4, 6, 8]
  # The second call resumed at step 4 instead of starting again (which would re-evaluate step 0).
  assert [r["step"] for r in rows if "eval_mlm_loss" in r] == [0, 4, 8]
  # The probe gathers the sharded encoder onto every process: both score the same.
  assert [r["step"] for r in rows if "probe_docstring_retrieval_mrr" in r] == [0, 4, 8]
  mrr = [r["second"]["probe_docstring_retrieval_mrr"] for r in results]
  assert mrr[0] == mrr[1] and 0 < mrr[0] <= 1
