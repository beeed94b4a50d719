"""One run per workdir: a lock file holding its owner's host and pid.

  check(workdir)      # early, writes nothing: stops a second run before it does any work
  acquire(workdir)    # before the first write into the workdir; released at exit
  release(workdir)

The lock is `<workdir>/run.lock` (JSON: host, pid, started). A lock whose pid no longer runs on
this host is stale (the run was killed): it is taken over with a warning, so rerunning a killed
command resumes. A lock held from another host cannot be checked from here: the error says how to
clear it. Multi-host runs take it once, in process 0, and every process stops if it is held.
"""
import atexit
import json
import os
import socket
import time

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

LOCK_FILE = "run.lock"


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir."""


def _path(workdir):
  return epath.Path(workdir) / LOCK_FILE


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's process.
    return True
  return True


def _holder(workdir):
  """The lock's {host, pid, started}, or None when there is none; unreadable JSON counts as held
  by an unknown run."""
  path = _path(workdir)
  try:
    text = path.read_text()
  except (FileNotFoundError, NotADirectoryError):  # No lock, or no such directory yet.
    return None
  try:
    return json.loads(text)
  except ValueError:
    return {"host": "?", "pid": -1, "started": "?"}


def _refusal(workdir, holder):
  """The error for a live (or uncheckable) holder, or None when the lock is stale here."""
  host, pid, started = holder.get("host"), holder.get("pid"), holder.get("started")
  lock = _path(workdir)
  if host == socket.gethostname() and isinstance(pid, int) and pid > 0:
    if pid == os.getpid() or not _alive(pid):
      return None
    return WorkdirLocked(
        f"workdir {workdir} is in use by pid {pid} on this host (started {started}; {lock}): "
        f"wait for that run to end or stop it, or choose another --workdir.")
  return WorkdirLocked(
      f"workdir {workdir} is locked by pid {pid} on host {host} (started {started}; {lock}); if "
      f"no run on {host} uses it any more, delete {lock} and rerun, or choose another --workdir.")


def _check_here(workdir):
  holder = _holder(workdir)
  if holder is not None:
    error = _refusal(workdir, holder)
    if error is not None:
      raise error


def check(workdir):
  """Raises WorkdirLocked when a live run holds `workdir`; writes nothing."""
  _in_process_0(_check_here, workdir)


def _write_new(path, text):
  """Creates `path` only if it does not exist (O_EXCL where the filesystem is local)."""
  if "://" in os.fspath(path):
    if path.exists():
      raise FileExistsError(os.fspath(path))
    path.write_text(text)
    return
  fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  with os.fdopen(fd, "w") as f:
    f.write(text)


# Workdirs that acquire() created: release() removes them again when nothing else was written.
_CREATED = set()


def _acquire_here(workdir):
  path = _path(workdir)
  if not path.parent.exists():
    _CREATED.add(os.fspath(workdir))
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise OSError(f"cannot create workdir {workdir} ({e.strerror or e}); choose a --workdir "
                  "you can write to.") from None
  text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S")})
  for _ in range(2):
    try:
      _write_new(path, text)
      break
    except FileExistsError:
      holder = _holder(workdir)
      error = _refusal(workdir, holder or {})
      if holder is not None and error is not None:
        raise error from None
      if holder is not None:
        logging.warning("Taking over the stale lock of pid %s (no longer running) in %s.",
                        holder.get("pid"), workdir)
        path.unlink(missing_ok=True)
    except OSError as e:
      raise OSError(f"cannot write in workdir {workdir} ({e.strerror or e}); choose a --workdir "
                    "you can write to.") from None
  else:
    raise WorkdirLocked(f"workdir {workdir}: another run took {path} at the same moment.")
  atexit.register(release, workdir)


def acquire(workdir):
  """Takes the lock in process 0; every process raises when it is held."""
  _in_process_0(_acquire_here, workdir)


def _in_process_0(fn, workdir):
  """Runs `fn(workdir)` in process 0 only (the other processes of a run are not other runs);
  when it raises, every process raises, so none is left waiting in a collective."""
  error = None
  if jax.process_index() == 0:
    try:
      fn(workdir)
    except (OSError, WorkdirLocked) as e:
      error = e
  if jax.process_count() > 1:
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if failed and error is None:
      error = WorkdirLocked(f"workdir {workdir}: process 0 stopped on its lock; see its error.")
  if error is not None:
    raise error


def release(workdir):
  """Removes the lock if this process holds it (idempotent)."""
  holder = _holder(workdir)
  if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
    _path(workdir).unlink(missing_ok=True)
    if os.fspath(workdir) in _CREATED and not any(epath.Path(workdir).iterdir()):
      epath.Path(workdir).rmdir()  # A run that stopped before writing leaves no directory.
    _CREATED.discard(os.fspath(workdir))
