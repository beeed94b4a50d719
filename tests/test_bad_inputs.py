"""Every command line against bad inputs, each run as the user would run it (a subprocess).

Each case asserts the exit status (2: a flag or config problem; 1: a file, data or state problem),
that the last stderr line is the one `error:` line and names the offending key or file, that no
traceback is shown, and that nothing was created or changed under the test's directory. The
README's Reliability table lists them (BAD_INPUTS_REPORT=<file> appends each case's status and
line to <file>, from which the table is written). Most stop before anything compiles.
"""
import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
from typing import Callable

import pytest

from tests import e2e
from tests.e2e import ROOT

DEMO = f"--config={ROOT}/configs/demo.py:size=tiny,vocab_size=400,steps=2,batch_size=8,seq_len=64"


@dataclasses.dataclass
class Env:
  """What a case may point at: its own empty directory, the shared corpus, a trained workdir."""
  tmp: str
  corpus: str
  workdir: str  # a copy of a trained pretraining workdir, in tmp
  held: list = dataclasses.field(default_factory=list)  # lock files held during the case

  def data(self):
    return e2e.flags(pathlib.Path(self.corpus))


@dataclasses.dataclass
class Case:
  name: str
  module: str
  args: Callable[[Env], list]
  status: int
  needles: tuple  # substrings of the last stderr line
  devices: int = 1
  setup: Callable[[Env], None] = lambda env: None


def _w(env):
  return f"--workdir={env.tmp}/run"


def _lock(env, host, pid, workdir=None):
  """Holds `workdir`'s lock as a run on `host` with `pid` would (until the case ends)."""
  workdir = workdir or env.workdir
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "run.lock"), "w") as f:
    json.dump({"host": host, "pid": pid, "started": "2026-01-01 00:00:00"}, f)
  fd = os.open(os.path.join(workdir, "run.lock"), os.O_RDONLY)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  env.held.append(fd)


def _ft(env):
  """Fine-tuning on the case's own train.jsonl (written by `_rows`)."""
  return ["--config=configs/finetune/jsonl.py", _w(env), f"--config.data.train={env.tmp}/train.jsonl",
          "--config.data.batch_size=4", "--config.data.dev_fraction=0.3", "--config.train.steps=2"]


def _rows(env, name, bad=None, n=20):
  """`n` good two-class rows, with the lines of `bad` ({0-based index: bytes}) replaced."""
  lines = [json.dumps({"text": f"word{i} text", "label": "pos" if i % 2 else "neg"}).encode()
           for i in range(n)]
  for i, line in (bad or {}).items():
    lines[i] = line
  _file(env, name, b"\n".join(lines) + b"\n")


def _append(env, name, content):
  with open(os.path.join(env.workdir, name), "ab") as f:
    f.write(content)


def _finetune_workdir(env):
  """A directory shaped like a fine-tuning workdir: checkpoints whose config has a `task`."""
  step = os.path.join(env.tmp, "ft", "checkpoints", "1")
  shutil.copytree(os.path.join(env.workdir, "checkpoints", "50"), step)
  config_file = os.path.join(step, "config", "metadata")
  with open(config_file, encoding="utf-8") as f:
    config = json.load(f)
  with open(config_file, "w", encoding="utf-8") as f:
    json.dump({**config, "task": {"head": "sequence"}}, f)


def _file(env, name, content):
  with open(os.path.join(env.tmp, name), "wb") as f:
    f.write(content)


CASES = [
    # --- pretrain.main: flags and config (status 2) ---
    Case("unknown override key", "pretrain.main",
         lambda e: [DEMO, _w(e), "--config.data.nope=1"], 2, ("--config.data.nope", "'nope'")),
    Case("misspelt override section", "pretrain.main",
         lambda e: [DEMO, _w(e), "--config.dta.seq_len=3"], 2, ("--config.dta.seq_len", "data")),
    Case("override of the wrong type", "pretrain.main",
         lambda e: [DEMO, _w(e), "--config.data.seq_len=abc"], 2, ("--config.data.seq_len=abc",)),
    Case("override without a value", "pretrain.main",
         lambda e: [DEMO, _w(e), "--config.data.seq_len"], 2, ("--config.data.seq_len",)),
    Case("missing config file", "pretrain.main",
         lambda e: ["--config=configs/nope.py", _w(e)], 2, ("configs/nope.py",)),
    Case("unknown config argument", "pretrain.main",
         lambda e: ["--config=configs/demo.py:sise=tiny", _w(e)], 2, ("sise",)),
    Case("unknown model size", "pretrain.main",
         lambda e: ["--config=configs/demo.py:size=huge", _w(e)], 2, ("huge", "tiny")),
    Case("unknown flag", "pretrain.main",
         lambda e: [DEMO, f"--wrokdir={e.tmp}/run"], 2, ("wrokdir", "workdir")),
    Case("missing --workdir", "pretrain.main", lambda e: [DEMO], 2, ("--workdir",)),
    Case("positional argument", "pretrain.main",
         lambda e: [DEMO, _w(e), "train"], 2, ("unexpected arguments", "train")),
    Case("unknown objective", "pretrain.main",
         lambda e: [DEMO, _w(e), "--config.objective.name=mlmm"], 2, ("objective.name", "mlm")),
    Case("bad dtype", "pretrain.main",
         lambda e: [DEMO, _w(e), "--config.model.dtype=float8"], 2, ("model.dtype", "bfloat16")),
    Case("heads do not divide hidden", "pretrain.main",
         lambda e: [DEMO, _w(e), "--config.model.num_heads=3"], 2, ("model.num_heads",)),
    Case("sequence longer than max_len", "pretrain.main",
         lambda e: [DEMO, _w(e), "--config.data.seq_len=1024"], 2, ("data.seq_len",)),
    Case("accumulation does not divide the batch", "pretrain.main",
         lambda e: [DEMO, _w(e), "--config.optimizer.grad_accum_steps=3"], 2,
         ("optimizer.grad_accum_steps", "data.batch_size=8")),
    Case("bad nonfinite mode", "pretrain.main",
         lambda e: [DEMO, _w(e), "--config.train.nonfinite=ignore"], 2, ("train.nonfinite", "skip")),
    Case("negative steps", "pretrain.main",
         lambda e: [DEMO, _w(e), "--config.train.steps=-5"], 2, ("train.steps",)),
    # --- pretrain.main: mesh, files, workdir (status 1) ---
    Case("multihost without a cluster", "pretrain.main",
         lambda e: [DEMO, _w(e), "--multihost"], 1, ("--multihost", "--coordinator_address")),
    Case("mesh larger than the devices", "pretrain.main",
         lambda e: [*e.data(), _w(e), "--config.mesh.data=4"], 1, ("needs 4 devices", "1")),
    Case("tensor size does not divide the heads", "pretrain.main",
         lambda e: [*e.data(), _w(e), "--config.mesh.tensor=4", "--config.mesh.data=2"], 1,
         ("model.num_heads", "mesh.tensor=4"), devices=8),
    Case("batch does not divide over data shards", "pretrain.main",
         lambda e: [*e.data(), _w(e), "--config.data.batch_size=12"], 1,
         ("data.batch_size=12", "8"), devices=8),
    Case("mistyped init_from", "pretrain.main",
         lambda e: [*e.data(), _w(e), f"--config.init_from={e.tmp}/wrokdir"], 1,
         ("config.init_from", "wrokdir")),
    Case("corpus glob matching nothing", "pretrain.main",
         lambda e: [*e.data(), _w(e), f"--config.data.paths={e.tmp}/nothing*.jsonl",
                    f"--config.data.data_dir={e.tmp}/tfds"], 1, ("nothing*.jsonl",)),
    Case("workdir in use by a live run", "pretrain.main",
         lambda e: [*e.data(), f"--workdir={e.workdir}"], 1, ("in use by pid", "run.lock"),
         setup=lambda e: _lock(e, socket.gethostname(), os.getpid())),
    Case("workdir locked from another host", "pretrain.main",
         lambda e: [*e.data(), f"--workdir={e.workdir}"], 1, ("pid 1234 on host other-host",),
         setup=lambda e: _lock(e, "other-host", 1234)),
    Case("workdir that cannot be created", "pretrain.main",
         lambda e: [*e.data(), f"--workdir={e.tmp}/a_file/run", f"--config.data.data_dir={e.tmp}/tfds"],
         1, ("cannot create or write workdir", "a_file"), setup=lambda e: _file(e, "a_file", b"x")),
    Case("init_from a model of another shape", "pretrain.main",
         lambda e: [*e.data(), _w(e), f"--config.init_from={e.workdir}", "--config.model.mlp_dim=128"],
         1, ("config.init_from", "model.mlp_dim=256")),
    Case("init_from a fine-tuning workdir", "pretrain.main",
         lambda e: [*e.data(), _w(e), f"--config.init_from={e.tmp}/ft"], 1,
         ("config.init_from", "fine-tuning workdir"), setup=lambda e: _finetune_workdir(e)),
    Case("report of a cut metrics line", "pretrain.report",
         lambda e: [f"--workdir={e.workdir}"], 1, ("metrics.jsonl:", "not JSON"),
         setup=lambda e: _append(e, "metrics.jsonl", b'{"step": 2, "mlm_lo\n{}\n')),
    Case("resume with another sequence length", "pretrain.main",
         lambda e: [*e.data(), f"--workdir={e.workdir}", "--config.data.seq_len=32"], 1,
         ("data.seq_len=64", "init_from")),
    Case("resume with another batch size", "pretrain.main",
         lambda e: [*e.data(), f"--workdir={e.workdir}", "--config.data.batch_size=16"], 1,
         ("data.batch_size=8", "init_from")),
    Case("resume with another model shape", "pretrain.main",
         lambda e: [*e.data(), f"--workdir={e.workdir}", "--config.model.mlp_dim=128"], 1,
         ("model.mlp_dim=256",)),
    Case("jsonl corpus without the text field", "pretrain.main",
         lambda e: [*e.data(), _w(e), f"--config.data.paths={e.tmp}/c.jsonl",
                    f"--config.data.data_dir={e.tmp}/tfds", "--config.data.text_feature=content"],
         1, ("c.jsonl:1", "'content'", "text_feature"),
         setup=lambda e: _file(e, "c.jsonl", b'{"text": "def f(): pass"}\n' * 50)),
    Case("binary file in the corpus", "pretrain.main",
         lambda e: [*e.data(), _w(e), f"--config.data.paths={e.tmp}/c.txt",
                    f"--config.data.data_dir={e.tmp}/tfds"], 1, ("c.txt", "data.paths"),
         setup=lambda e: _file(e, "c.txt", b"PK\x03\x04\x00\x00" + bytes(range(256)) * 40)),
    Case("mistyped tokenizer path", "pretrain.main",
         lambda e: [*e.data(), _w(e), f"--config.data.tokenizer.path={e.tmp}/tok/spm.mdl"], 1,
         ("data.tokenizer.path", "spm.mdl", "tokenizer.train=True")),
    Case("unknown dataset name", "pretrain.main",
         lambda e: [DEMO, _w(e), "--config.data.name=wikipdia",
                    f"--config.data.data_dir={e.tmp}/tfds"], 1, ("data.name='wikipdia'",)),
    # --- pretrain.export ---
    Case("export of a mistyped workdir", "pretrain.export",
         lambda e: [f"--workdir={e.tmp}/wrokdir", f"--out={e.tmp}/out"], 1,
         ("--workdir", "wrokdir", "checkpoints/")),
    Case("export of a missing step", "pretrain.export",
         lambda e: [f"--workdir={e.workdir}", f"--out={e.tmp}/out", "--step=7"], 1,
         ("--step=7", "available steps: 50, 100, 150")),
    Case("export into a non-empty directory", "pretrain.export",
         lambda e: [f"--workdir={e.workdir}", f"--out={e.tmp}"], 1, ("--overwrite",)),
    Case("export without --out", "pretrain.export",
         lambda e: [f"--workdir={e.workdir}"], 2, ("--out",)),
    Case("export with an unknown pooling", "pretrain.export",
         lambda e: [f"--workdir={e.workdir}", f"--out={e.tmp}/out", "--pooling=sum"], 2,
         ("--pooling", "mean")),
    Case("export into a file", "pretrain.export",
         lambda e: [f"--workdir={e.workdir}", f"--out={e.tmp}/a_file"], 1, ("--out", "a_file"),
         setup=lambda e: _file(e, "a_file", b"x")),
    # --- pretrain.report ---
    Case("report of a mistyped workdir", "pretrain.report",
         lambda e: [f"--workdir={e.tmp}/wrokdir"], 1, ("wrokdir", "metrics.jsonl")),
    Case("report of a missing export", "pretrain.report",
         lambda e: [f"--workdir={e.workdir}", f"--export={e.tmp}/exprot"], 1, ("--export", "exprot")),
    # --- pretrain.data.prepare ---
    Case("prepare without --config", "pretrain.data.prepare", lambda e: [], 2, ("--config",)),
    Case("prepare with a mistyped tokenizer path", "pretrain.data.prepare",
         lambda e: [*e.data()[:5], f"--config.data.tokenizer.path={e.tmp}/spm.mdl"], 1,
         ("data.tokenizer.path",)),
    Case("prepare with an unknown override", "pretrain.data.prepare",
         lambda e: [DEMO, "--config.data.tokenizer.szie=3"], 2, ("tokenizer", "'szie'")),
    # --- pretrain.finetune ---
    Case("finetune without --workdir", "pretrain.finetune",
         lambda e: ["--config=configs/finetune/jsonl.py"], 2, ("--workdir",)),
    Case("finetune with an unknown override", "pretrain.finetune",
         lambda e: ["--config=configs/finetune/jsonl.py", _w(e), "--config.task.haed=x"], 2,
         ("--config.task.haed", "'haed'")),
    Case("finetune without an init", "pretrain.finetune",
         lambda e: _ft(e), 2, ("init=''",), setup=lambda e: _rows(e, "train.jsonl")),
    Case("finetune from a mistyped init", "pretrain.finetune",
         lambda e: [*_ft(e), f"--config.init={e.tmp}/nope"], 1, ("config.init=", "nope"),
         setup=lambda e: _rows(e, "train.jsonl")),
    Case("finetune row that is not JSON", "pretrain.finetune",
         lambda e: [*_ft(e), f"--config.init={e.workdir}"], 1, ("train.jsonl:3", "not valid JSON"),
         setup=lambda e: _rows(e, "train.jsonl", bad={2: b'{"text": "x" "label": "pos"}'})),
    Case("finetune row without a label", "pretrain.finetune",
         lambda e: [*_ft(e), f"--config.init={e.workdir}"], 1, ("train.jsonl:5", "'label'"),
         setup=lambda e: _rows(e, "train.jsonl", bad={4: b'{"text": "x"}'})),
    Case("finetune dev label unseen in training", "pretrain.finetune",
         lambda e: [*_ft(e), f"--config.data.dev={e.tmp}/dev.jsonl", f"--config.init={e.workdir}"],
         1, ("dev.jsonl:1", "'maybe'", "task.labels"),
         setup=lambda e: (_rows(e, "train.jsonl"),
                          _file(e, "dev.jsonl", b'{"text": "x", "label": "maybe"}\n'))),
    Case("finetune on a workdir in use", "pretrain.finetune",
         lambda e: [*_ft(e), f"--config.init={e.workdir}"], 1, ("in use by pid", "run.lock"),
         setup=lambda e: (_rows(e, "train.jsonl"),
                          _lock(e, socket.gethostname(), os.getpid(), f"{e.tmp}/run"))),
    Case("finetune split smaller than a batch", "pretrain.finetune",
         lambda e: [*_ft(e), "--config.data.batch_size=64", f"--config.init={e.workdir}"], 1,
         ("train.jsonl", "data.batch_size=64"), setup=lambda e: _rows(e, "train.jsonl")),
    # --- launch.sweep ---
    Case("sweep file missing", "launch.sweep",
         lambda e: [f"--sweep={e.tmp}/nope.py", "--config=configs/demo.py", f"--workdir_root={e.tmp}/r"],
         2, ("nope.py", "--sweep")),
    Case("sweep with an unknown key", "launch.sweep",
         lambda e: [f"--sweep={e.tmp}/bad_sweep.py", "--config=configs/demo.py",
                    f"--workdir_root={e.tmp}/r", "--run"], 2, ("optimizer.learnig_rate",),
         setup=lambda e: _file(e, "bad_sweep.py",
                               b"def get_sweep():\n  return [{'optimizer.learnig_rate': 1e-3}]\n")),
    Case("sweep without --workdir_root", "launch.sweep",
         lambda e: ["--sweep=configs/sweeps/mlm_lr.py", "--config=configs/demo.py"], 2,
         ("--workdir_root",)),
]


def _tree(root):
  """{relative path: (size, mtime)} of every file under `root`, and every directory (a lock
  taken and released changes its directory's mtime, not its content)."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames:
      out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
    for name in filenames:
      st = os.lstat(os.path.join(dirpath, name))
      out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(name="trained", scope="module")
def _trained(runs):
  return runs[0]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, tmp_path, corpus, trained):
  env = Env(str(tmp_path), str(corpus), str(tmp_path / "trained"))
  shutil.copytree(trained, env.workdir)
  case.setup(env)
  before, corpus_before = _tree(tmp_path), _tree(corpus)
  run_env = {**e2e.env(), "XLA_FLAGS": e2e.CHEAP_COMPILE +
             f" --xla_force_host_platform_device_count={case.devices}"}
  try:
    proc = subprocess.run([sys.executable, "-m", case.module, *case.args(env)], cwd=ROOT,
                          env=run_env, capture_output=True, text=True, timeout=300)
  finally:
    for fd in env.held:
      os.close(fd)
  lines = proc.stderr.strip().splitlines()
  last = lines[-1] if lines else ""
  assert proc.returncode == case.status, (proc.returncode, proc.stderr[-3000:])
  assert last.startswith("error: ") and all(n in last for n in case.needles), (case.needles, last)
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert _tree(tmp_path) == before, "the failed command created or changed files"
  assert _tree(corpus) == corpus_before, "the failed command changed the shared corpus"
  if os.environ.get("BAD_INPUTS_REPORT"):  # The README's table: name, status, the line.
    with open(os.environ["BAD_INPUTS_REPORT"], "a", encoding="utf-8") as f:
      f.write(json.dumps({"case": case.name, "command": case.module, "status": proc.returncode,
                          "line": last.replace(str(tmp_path), "T").replace(ROOT, ".")}) + "\n")


def test_the_readme_lists_every_case():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  missing = [c.name for c in CASES if f"| {c.name} |" not in readme]
  assert not missing, f"README's bad-input table lacks: {missing}"


def test_a_cut_last_metrics_line_is_dropped_on_resume_and_a_bad_one_named(tmp_path):
  from pretrain.training import metrics  # pylint: disable=import-outside-toplevel
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  metrics.MetricWriter(str(tmp_path)).truncate_after(5)  # what a resumed run does first
  assert metrics.read_jsonl(str(tmp_path)) == [{"step": 1, "loss": 2.0}]
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
    metrics.MetricWriter(str(tmp_path)).truncate_after(5)
