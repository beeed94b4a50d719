"""Model FLOPs utilisation: the train step's FLOPs against the machine's peak.

FLOPs per step are XLA's cost analysis of the lowered (not yet partitioned) train step: the whole
global batch's work, generator, decoder and heads included, as it runs. The peak is the devices'
dense bf16 matmul rate from PEAK_TFLOPS (by `device_kind`), times the device count; on CPU it is
the host's fp32 matmul rate measured once per process (a 1024 x 1024 matmul, best of several),
times the process count, since fake CPU devices share the host's cores. `train.peak_tflops` > 0
overrides either (e.g. an fp32 run on a GPU, whose fp32 peak is far below its bf16 one).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 TFLOP/s per chip, from the vendors' data sheets (no sparsity).
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,   # v5e
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,   # v6e (Trillium)
    "NVIDIA A100": 312.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
}


@functools.lru_cache(maxsize=1)
def cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
  """The host's fp32 matmul FLOP/s (best of `repeats`), measured once per process."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best


def table_peak(device_kind: str) -> float | None:
  """PEAK_TFLOPS of the longest name `device_kind` starts with, in FLOP/s (None: unknown)."""
  names = [n for n in PEAK_TFLOPS if device_kind.startswith(n)]
  return PEAK_TFLOPS[max(names, key=len)] * 1e12 if names else None


def machine_peak_flops(override_tflops: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of every device of the run together, where it comes from)."""
  if override_tflops > 0:
    return override_tflops * 1e12 * jax.device_count(), "train.peak_tflops"
  device = jax.devices()[0]
  if device.platform == "cpu":
    return cpu_peak_flops() * jax.process_count(), "measured CPU matmul"
  peak = table_peak(device.device_kind)
  if peak is None:
    return 0.0, f"unknown device {device.device_kind!r} (set train.peak_tflops)"
  return peak * jax.device_count(), f"{device.device_kind} bf16 dense"


def step_flops(step_fn, *args) -> float:
  """FLOPs of one call of the jitted `step_fn` on `args` (lowered only; 0 when XLA gives none)."""
  cost = step_fn.lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))
