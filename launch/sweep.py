"""Expands a sweep file into `pretrain.main` runs, runs them one after another, and tabulates them.

  python -m launch.sweep --sweep=configs/sweeps/mlm_lr.py --config=configs/demo.py:size=tiny \
      --workdir_root=workdirs/mlm_lr [--run] [--summary] [-- --config.train.steps=50 ...]

A sweep file defines `get_sweep()` returning a list of override dicts ({"optimizer.learning_rate":
1e-4}); each becomes one run named after its overrides, in `<workdir_root>/<name>`. Arguments
after `--` go to every run. Every key is checked against the config before anything runs. Without
--run the commands are only printed; --summary prints the table of existing workdirs alone.
"""
import importlib.util
import os
import re
import shlex
import subprocess
import sys

from absl import flags

from objectives.checks import ConfigError
from pretrain import cli


def _load_module(path, what):
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} file {path!r} does not exist; check --{what}.")
  spec = importlib.util.spec_from_file_location(f"_{what}_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(config_arg):
  """`configs/x.py:a=1` -> the ConfigDict, as `pretrain.main --config=` would build it."""
  path, _, arg = config_arg.partition(":")
  return _load_module(path, "config").get_config(arg or None)


def load_sweep(path):
  sweep = _load_module(path, "sweep").get_sweep()
  if not sweep or not all(isinstance(o, dict) for o in sweep):
    raise ValueError(f"get_sweep() in {path} must return a non-empty list of override dicts.")
  return sweep


def check_override(config, key, value, where, check_type=True):
  """Raises naming `key` when it is not a config field or `value` does not fit its type."""
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      parent = ".".join(parts[:i]) or "the config"
      raise KeyError(f"Unknown config key {key!r} in {where}: {parent} has no field {part!r}.")
    node = node[part]
  if check_type:
    target = config.copy_and_resolve_references()
    for part in parts[:-1]:
      target = target[part]
    try:
      target[parts[-1]] = value  # A ConfigDict refuses a value of another type.
    except (TypeError, ValueError) as e:
      raise TypeError(f"Bad value {value!r} for config key {key!r} in {where}: {e}") from e


def format_value(value):
  return repr(value) if isinstance(value, str) and not value else str(value)


def run_name(overrides, short=True):
  """A directory-safe name like `learning_rate-0.0001`; `short` keeps only each key's last part."""
  parts = [f"{k.rsplit('.', 1)[-1] if short else k}-{format_value(v)}" for k, v in overrides.items()]
  return re.sub(r"[^A-Za-z0-9._+-]+", "_", "__".join(parts)) or "default"


def expand(sweep, config_arg, workdir_root, extra=(), config=None):
  """[(name, workdir, command argv)]: validated, with distinct names, nothing run."""
  config = load_config(config_arg) if config is None else config
  for arg in extra:
    if arg.startswith("--config.") and "=" in arg:
      key = arg[len("--config."):].split("=", 1)[0]
      check_override(config, key, None, "the extra flags", check_type=False)  # main parses values
  for i, overrides in enumerate(sweep):
    for key, value in overrides.items():
      check_override(config, key, value, f"sweep entry {i}")
  names = [run_name(o) for o in sweep]
  if len(set(names)) < len(names):  # Short names collide (same last key part): use full keys.
    names = [run_name(o, short=False) for o in sweep]
  if len(set(names)) < len(names):
    dupes = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f"The sweep repeats the same overrides: {', '.join(dupes)}.")
  runs = []
  for name, overrides in zip(names, sweep):
    workdir = os.path.join(workdir_root, name)
    command = ["python", "-m", "pretrain.main", f"--config={config_arg}", f"--workdir={workdir}",
               *(f"--config.{k}={format_value(v)}" for k, v in overrides.items()), *extra]
    runs.append((name, workdir, command))
  return runs


def _loss_key(row):
  losses = sorted(k for k in row if k.endswith("loss") and not k.startswith("eval_"))
  for preferred in ("total_loss", "loss", "mlm_loss"):
    if preferred in losses:
      return preferred
  return losses[0] if losses else None


def summary(runs):
  """A text table of each run's last training loss and last evaluation."""
  from pretrain.training import metrics  # pylint: disable=import-outside-toplevel
  rows, eval_keys = [], []
  for name, workdir, _ in runs:
    try:
      records = metrics.read_jsonl(workdir)
    except FileNotFoundError:
      rows.append((name, {"status": "no metrics.jsonl"}))
      continue
    row = {"step": max((r["step"] for r in records), default="-")}
    train = [r for r in records if _loss_key(r)]
    if train:
      row["train_loss"] = train[-1][_loss_key(train[-1])]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    if evals:
      row.update({k: v for k, v in evals[-1].items() if k.startswith("eval_")})
      eval_keys += [k for k in evals[-1] if k.startswith("eval_") and k not in eval_keys]
    rows.append((name, row))
  columns = ["step", "train_loss", *eval_keys]
  cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
  table = [["run", *columns]] + [
      [name, *(cell(row.get(c, row.get("status", "-") if c == "step" else "-")) for c in columns)]
      for name, row in rows]
  widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def main(argv):
  f = flags.FLAGS
  extra = argv[1:]
  if not f.sweep or not f.config or not f.workdir_root:
    missing = [n for n in ("sweep", "config", "workdir_root") if not f[n].value]
    raise ConfigError(f"missing --{', --'.join(missing)} (e.g. --sweep=configs/sweeps/mlm_lr.py "
                         "--config=configs/demo.py:size=tiny --workdir_root=workdirs/mlm_lr).")
  try:
    runs = expand(load_sweep(f.sweep), f.config, f.workdir_root, extra)
  except (KeyError, TypeError, ValueError, FileNotFoundError) as e:  # The command line's files.
    raise ConfigError(e.args[0] if e.args else str(e)) from e
  if f.summary:
    print(summary(runs))
    return 0
  if not f.run or f.launcher == "print":
    for _, _, command in runs:
      print(shlex.join(command))
    return 0
  failed = []
  for name, _, command in runs:
    print(f"=== {name}: {shlex.join(command)}", flush=True)
    if subprocess.run([sys.executable, *command[1:]], check=False).returncode:  # same interpreter
      failed.append(name)
  print(summary(runs))
  if failed:
    print(f"Failed runs: {', '.join(failed)} (rerun the sweep to resume them).", file=sys.stderr)
    return 1
  return 0


def _define_flags():
  # Defined here, not at import: sweep files import `product` from this module, and a second
  # import of the flag definitions (when run as __main__) would be a duplicate-flag error.
  flags.DEFINE_string("sweep", None, "Sweep file defining get_sweep(), e.g. configs/sweeps/mlm_lr.py.")
  flags.DEFINE_string("config", None, "Base config, e.g. configs/demo.py:size=tiny.")
  flags.DEFINE_string("workdir_root", None, "Each run's workdir is <workdir_root>/<run name>.")
  flags.DEFINE_bool("run", False, "Run the commands locally one after another (default: print them).")
  flags.DEFINE_enum("launcher", "local", ["local", "print"], "With --run: local runs, print only prints.")
  flags.DEFINE_bool("summary", False, "Only print the table of final metrics of existing workdirs.")


if __name__ == "__main__":
  _define_flags()
  cli.run(main, extra_args=True)
