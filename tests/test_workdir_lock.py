"""One run per workdir: the lock's states (free, held, stale, held elsewhere) and a real second run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pretrain.training import workdir_lock
from tests import e2e


def _write_lock(workdir, host, pid):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
    json.dump({"host": host, "pid": pid, "started": "then"}, f)


def _dead_pid():
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def test_acquire_writes_host_and_pid_and_release_removes_what_it_created(tmp_path):
  workdir = tmp_path / "new"
  workdir_lock.acquire(str(workdir))
  holder = json.loads((workdir / workdir_lock.LOCK_FILE).read_text())
  assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
  workdir_lock.release(str(workdir))
  assert not workdir.exists(), "a workdir created only for the lock should go with it"


def test_release_keeps_a_workdir_that_holds_results(tmp_path):
  workdir_lock.acquire(str(tmp_path / "w"))
  (tmp_path / "w" / "metrics.jsonl").write_text("{}\n")
  workdir_lock.release(str(tmp_path / "w"))
  assert sorted(os.listdir(tmp_path / "w")) == ["metrics.jsonl"]


def test_a_live_holder_on_this_host_stops_check_and_acquire(tmp_path):
  live = subprocess.Popen(["sleep", "30"])
  try:
    _write_lock(tmp_path, socket.gethostname(), live.pid)
    for call in (workdir_lock.check, workdir_lock.acquire):
      with pytest.raises(workdir_lock.WorkdirLocked, match=f"in use by pid {live.pid}"):
        call(str(tmp_path))
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == live.pid
  finally:
    live.kill()
    live.wait()


def test_a_stale_lock_on_this_host_is_taken_over(tmp_path):
  _write_lock(tmp_path, socket.gethostname(), _dead_pid())
  workdir_lock.check(str(tmp_path))  # a killed run's lock does not stop the rerun
  workdir_lock.acquire(str(tmp_path))
  assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  workdir_lock.release(str(tmp_path))
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_a_lock_from_another_host_says_how_to_clear_it(tmp_path):
  _write_lock(tmp_path, "elsewhere", 1)
  lock = tmp_path / workdir_lock.LOCK_FILE
  with pytest.raises(workdir_lock.WorkdirLocked, match=f"host elsewhere.*delete {lock}"):
    workdir_lock.acquire(str(tmp_path))
  workdir_lock.release(str(tmp_path))  # not ours: left alone
  assert lock.exists()


def test_an_unwritable_workdir_is_named(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied")
  monkeypatch.setattr(workdir_lock.os, "open", refuse)
  with pytest.raises(OSError, match=f"cannot write in workdir {tmp_path}.*choose a --workdir"):
    workdir_lock.acquire(str(tmp_path))


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
    second = e2e.run("pretrain.main", *e2e.flags(corpus), f"--workdir={workdir}", check=False)
    assert second.returncode == 1, second.stderr[-2000:]
    assert second.stderr.strip().splitlines()[-1].startswith(
        f"error: workdir {workdir} is in use by pid {first.pid} on this host")
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
