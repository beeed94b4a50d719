"""Where metrics go: TensorBoard event files, a JSONL file in the workdir, and one console line."""
import json
import os
import time

from absl import logging


class MetricWriter:
  """Writes scalars from process 0 only; other processes get a writer that does nothing."""

  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None  # Opened at the first write: a run that stops before it leaves no event file.

  def _tensorboard(self):
    if self._tb is None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      os.makedirs(self.workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"))
    return self._tb

  def truncate_after(self, step):
    """Drops rows logged after `step`, so a resumed run's log reads like an uninterrupted one."""
    if not self.enabled or not os.path.exists(self.path):
      return
    rows = [json.dumps(r) + "\n" for r in read_jsonl(os.path.dirname(self.path) or ".",
                                                   drop_truncated_last=True) if r["step"] <= step]
    with open(self.path + ".tmp", "w") as f:
      f.writelines(rows)
    os.replace(self.path + ".tmp", self.path)

  def write(self, step, scalars):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    tb = self._tensorboard()
    for k, v in scalars.items():
      tb.add_scalar(k, v, step)
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")

  def flush(self):
    if self._tb:
      self._tb.flush()

  def close(self):
    if self._tb:
      self._tb.close()


def read_jsonl(workdir, drop_truncated_last=False):
  """The rows of `<workdir>/metrics.jsonl`; a line that is not JSON is an error naming it, except
  a last line cut short (a run killed mid-write) when `drop_truncated_last`."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
  rows = []
  for i, (n, line) in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except ValueError as e:
      if drop_truncated_last and i == len(lines) - 1 and not line.endswith("\n"):
        logging.warning("Dropped the cut-short last line %d of %s.", n, path)
        break
      raise ValueError(f"{path}:{n}: not JSON ({e}); delete or repair that line.") from None
  return rows


def tokens_per_example(example_batch) -> int:
  """Input tokens of one example of `example_batch` (an objective's or task model's one-row
  batch): the lengths of all its row groups (every `*segment_ids` feature: a pair objective's
  query, document and negatives), not just data.seq_len."""
  return sum(int(x.shape[-1]) for k, x in example_batch.items() if k.endswith("segment_ids"))


class Throughput:
  """Tokens/s, MFU, goodput and ETA between two log points.

  MFU is the train step's FLOPs x steps/s over the machine's peak (pretrain/training/flops.py;
  absent when either is unknown). Goodput is the share of the wall time spent stepping: what the
  loop reports as lost (`lose`: waiting for input, evaluating, checkpointing, profiling) is not.
  """

  def __init__(self, tokens_per_step, total_steps, start_step, flops_per_step=0.0,
               peak_flops=0.0):
    self.tokens_per_step, self.total_steps = tokens_per_step, total_steps
    self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
    self.step, self.time = start_step, time.perf_counter()
    self.lost = 0.0

  def lose(self, seconds):
    self.lost += seconds

  def update(self, step):
    """({"tokens_per_s", "goodput"[, "mfu"]}, ETA in seconds) since the last update."""
    now = time.perf_counter()
    elapsed = max(now - self.time, 1e-9)
    steps_per_s = (step - self.step) / elapsed
    speed = {"tokens_per_s": steps_per_s * self.tokens_per_step,
             "goodput": max(0.0, 1.0 - self.lost / elapsed)}
    if self.flops_per_step > 0 and self.peak_flops > 0:
      speed["mfu"] = steps_per_s * self.flops_per_step / self.peak_flops
    self.step, self.time, self.lost = step, now, 0.0
    eta = (self.total_steps - step) / max(steps_per_s, 1e-9)
    return speed, eta


def console_line(step, total, scalars, speed=None, eta_s=None):
  parts = [f"step {step}/{total}"]
  parts += [f"{k} {v:.4g}" for k, v in scalars.items()]
  if speed is not None:
    parts.append(f"{speed['tokens_per_s']:,.0f} tok/s")
    if "mfu" in speed:
      parts.append(f"MFU {100 * speed['mfu']:.1f}%")
    parts += [f"goodput {100 * speed['goodput']:.0f}%", f"ETA {eta_s / 60:.1f} min"]
  line = " | ".join(parts)
  logging.info(line)
  print(line, flush=True)
  return line
