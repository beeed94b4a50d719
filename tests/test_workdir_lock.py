"""One run per workdir: the lock's states (free, held, left by a killed run, unwritable), races,
and a real second run on a busy workdir."""
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pretrain.training import workdir_lock
from tests import e2e

_HOLD = ("import sys, time; from pretrain.training import workdir_lock as w; "
         "w.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)")


def _holder_process(workdir):
  """A process that holds the lock of `workdir` (as a run does) until killed."""
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir)], cwd=e2e.ROOT,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_acquire_names_the_holder_and_release_removes_what_it_created(tmp_path):
  workdir = tmp_path / "a" / "b" / "new"
  workdir_lock.acquire(str(workdir))
  holder = json.loads((workdir / workdir_lock.LOCK_FILE).read_text())
  assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
  workdir_lock.release(str(workdir))
  assert not (tmp_path / "a").exists(), "directories created only for the lock should go"


def test_release_keeps_a_workdir_that_holds_results(tmp_path):
  workdir_lock.acquire(str(tmp_path / "w"))
  (tmp_path / "w" / "metrics.jsonl").write_text("{}\n")
  workdir_lock.release(str(tmp_path / "w"))
  assert sorted(os.listdir(tmp_path / "w")) == ["metrics.jsonl"]


def test_a_live_holder_stops_acquire_and_its_death_frees_the_lock(tmp_path):
  holder = _holder_process(tmp_path)
  try:
    with pytest.raises(workdir_lock.WorkdirLocked, match=f"in use by pid {holder.pid} on host "):
      workdir_lock.acquire(str(tmp_path))
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The killed holder left its file, naming a dead pid: the lock itself went with the process.
  assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == holder.pid
  workdir_lock.acquire(str(tmp_path))
  assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  workdir_lock.release(str(tmp_path))


@pytest.mark.parametrize("content", ["", "[]", '"s"', "null", "{\"pid\": 1", "\x00\x01"])
def test_any_leftover_lock_file_content_is_harmless(tmp_path, content):
  (tmp_path / workdir_lock.LOCK_FILE).write_text(content)
  workdir_lock.acquire(str(tmp_path))
  workdir_lock.release(str(tmp_path))


def _race(workdir, results):
  try:
    workdir_lock.acquire(workdir)
    results.put("acquired")
    time.sleep(1.0)  # hold it while the others try
  except workdir_lock.WorkdirLocked:
    results.put("locked")


def test_runs_starting_at_the_same_moment_get_one_lock(tmp_path):
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps({"host": "h", "pid": 1}))
  results = multiprocessing.get_context("fork").Queue()
  procs = [multiprocessing.get_context("fork").Process(target=_race, args=(str(tmp_path), results))
           for _ in range(4)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(30)
  outcomes = sorted(results.get(timeout=5) for _ in procs)
  assert outcomes == ["acquired", "locked", "locked", "locked"], outcomes


def test_an_unwritable_workdir_is_named(tmp_path):
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(OSError, match=f"cannot create or write workdir {tmp_path}/a_file/w .*"
                                    "choose a --workdir"):
    workdir_lock.acquire(str(tmp_path / "a_file" / "w"))


def test_a_second_run_on_a_busy_workdir_stops_at_once(corpus, tmp_path):
  workdir = tmp_path / "w"
  first = subprocess.Popen([sys.executable, "-m", "pretrain.main", *e2e.flags(corpus),
                            f"--workdir={workdir}"], cwd=e2e.ROOT, env=e2e.env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while not (workdir / workdir_lock.LOCK_FILE).exists():
      assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
      time.sleep(0.2)
    time.sleep(0.5)  # the holder's JSON is written right after the lock file is created
    start = time.perf_counter()
    second = e2e.run("pretrain.main", *e2e.flags(corpus), f"--workdir={workdir}", check=False)
    assert second.returncode == 1, second.stderr[-2000:]
    assert second.stderr.strip().splitlines()[-1].startswith(
        f"error: workdir {workdir} is in use by pid {first.pid} on host")
    assert time.perf_counter() - start < 30, "the second run should stop before any work"
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
