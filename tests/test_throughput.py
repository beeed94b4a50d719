"""MFU, goodput and profiles in every run (pretrain/training/flops.py, metrics, loop)."""
import glob
import json
import os

import numpy as np
import pytest

from configs import common
from objectives.checks import ConfigError
from pretrain import train
from pretrain.training import flops, metrics


def test_the_peak_table_and_the_cpu_measurement():
  assert flops.table_peak("TPU v5 lite") == 197e12 and flops.table_peak("TPU v5p") == 459e12
  assert flops.table_peak("NVIDIA H100 80GB HBM3") == 989e12 and flops.table_peak("Foo") is None
  assert 1e9 < flops.cpu_peak_flops() < 1e14  # A measured rate, not a constant.
  peak, source = flops.machine_peak_flops(2.0)
  assert source == "train.peak_tflops" and peak == pytest.approx(2e12 * flops.jax.device_count())


def test_throughput_reports_mfu_and_goodput_from_lost_time(monkeypatch):
  clock = iter([0.0, 10.0])
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  t = metrics.Throughput(tokens_per_step=100, total_steps=20, start_step=0, flops_per_step=1e9,
                         peak_flops=4e9)
  t.lose(2.5)
  speed, eta = t.update(10)  # 10 steps in 10 s, 2.5 s of them lost.
  assert speed == {"tokens_per_s": 100.0, "goodput": 0.75, "mfu": 0.25} and eta == 10.0


def test_tokens_per_example_counts_every_row_group():
  from pretrain.data import pairs  # pylint: disable=import-outside-toplevel
  row = lambda n: np.ones((1, n), np.int32)  # noqa: E731
  assert metrics.tokens_per_example({k: row(128) for k in pairs.CHUNK_KEYS}) == 128
  # A pair objective with 2 hard negatives reads query + document + 2 negatives per example.
  keys = pairs.features("files", num_negatives=2)
  lengths = pairs.lengths(keys, 128, 64, 2)
  assert metrics.tokens_per_example({k: row(n) for k, n in lengths.items()}) == 64 + 128 + 2 * 128


def test_every_log_row_has_mfu_and_goodput_and_the_profile_is_written(corpus, tmp_path):
  from tests.test_probes import train_config  # pylint: disable=import-outside-toplevel
  c = train_config(corpus)
  c.train.update(probe_every=0, log_every=2, profile_steps="2:4")
  workdir = tmp_path / "w"
  train.train_and_evaluate(common.validate(c), str(workdir))
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl", encoding="utf-8")]
  logged = [r for r in rows if "tokens_per_s" in r]
  assert [r["step"] for r in logged] == [2, 4, 6]
  assert all(0 < r["mfu"] < 1 and 0 <= r["goodput"] <= 1 for r in logged)
  traces = glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
  assert traces and glob.glob(os.path.join(os.path.dirname(traces[0]), "perfetto_trace.json.gz"))
  c.train.profile_steps = "4:2"
  with pytest.raises(ConfigError, match="train.profile_steps"):
    common.validate(c)


def test_a_resume_past_the_profile_start_traces_nothing_and_never_stops_a_missing_trace(tmp_path):
  from pretrain.training import loop  # pylint: disable=import-outside-toplevel
  profiler = loop.Profiler("2:4", str(tmp_path))
  for step in (3, 4, 5):  # Resumed at step 2: START passed.
    profiler.before(step)
    profiler.after(step, None)
  profiler.stop(5)
  assert not profiler.active and not os.listdir(tmp_path)
