"""One run per workdir: an OS lock on `<workdir>/run.lock`, which also says who holds it.

  acquire(workdir)    # at run start, before any work: a second run stops here at once
  release(workdir)    # at the end (and at exit)

The lock is `flock` on the file, held for the whole run: the kernel drops it when the process
dies however it dies, so a killed run never leaves a stale lock, and a requeued job on another
node of a shared filesystem with lock support (NFSv4, Lustre, GPFS) takes it as soon as the old
one is gone. The file's JSON (host, pid, start time) only names the holder in the error.
Multi-host runs take it once, in process 0, and every process stops when that fails. A workdir
that acquire() had to create is removed again at release() if the run wrote nothing else into it.
Object-store paths (`gs://`) cannot be locked: those runs are not protected.
"""
import atexit
import errno
import fcntl
import json
import os
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_FILE = "run.lock"

_HELD = {}  # workdir -> the open lock file's descriptor
_CREATED = {}  # workdir -> the topmost directory acquire() created for it


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir."""


def _path(workdir):
  return os.path.join(os.fspath(workdir), LOCK_FILE)


def _holder(fd):
  """'pid P on host H (started T)' from the lock file's JSON, or what is known of it."""
  try:
    info = json.loads(os.pread(fd, 4096, 0) or b"{}")
  except (OSError, ValueError):
    info = None
  if not isinstance(info, dict) or "pid" not in info:
    return "another run (its lock file names no holder yet)"
  return f"pid {info.get('pid')} on host {info.get('host')} (started {info.get('started')})"


def _topmost_missing(path):
  """The highest ancestor of `path` (or itself) that does not exist, or None."""
  missing = None
  while path and not os.path.exists(path):
    missing, parent = path, os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return missing


def _acquire_here(workdir):
  workdir = os.fspath(workdir)
  if workdir in _HELD or "://" in workdir:
    return  # Held already by this process (a second run in one process), or unlockable.
  created = _topmost_missing(os.path.abspath(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(_path(workdir), os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise OSError(f"cannot create or write workdir {workdir} ({e.strerror or e}); choose a "
                  "--workdir you can write to.") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = _holder(fd)
    os.close(fd)
    _remove_created(workdir, created)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise WorkdirLocked(
          f"workdir {workdir} is in use by {holder} ({_path(workdir)}): wait for that run to "
          "end or stop it, or choose another --workdir.") from None
    raise OSError(f"cannot lock {_path(workdir)} ({e.strerror or e}): the filesystem has no "
                  "file locks; choose a --workdir on one that has.") from None
  info = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(info).encode(), 0)
  _HELD[workdir] = fd
  if created:
    _CREATED[workdir] = created
  atexit.register(release, workdir)


def _remove_created(workdir, created):
  """Removes the directories from `workdir` up to `created` while they are empty."""
  path = os.path.abspath(workdir)
  while created and path.startswith(created):
    try:
      os.rmdir(path)  # Only an empty directory: never a file of the user's.
    except OSError:
      return
    if path == created:
      return
    path = os.path.dirname(path)


def in_process_0(fn, *args):
  """`fn(*args)` in process 0 only; when it raises, every process raises (process 0 its own
  error), so none is left waiting in a collective."""
  error = None
  if jax.process_index() == 0:
    try:
      fn(*args)
    except Exception as e:  # pylint: disable=broad-except  # re-raised below, on every process
      error = e
  if jax.process_count() > 1:
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if failed and error is None:
      raise RuntimeError(f"process 0 stopped in {fn.__name__}; see its error.")
  if error is not None:
    raise error


def acquire(workdir):
  """Locks `workdir` for this run (process 0); raises WorkdirLocked when another run holds it."""
  in_process_0(_acquire_here, workdir)


def release(workdir):
  """Drops the lock if this process holds it (idempotent) and removes a workdir it created
  for the lock that holds nothing else."""
  workdir = os.fspath(workdir)
  fd = _HELD.pop(workdir, None)
  if fd is None:
    return
  created = _CREATED.pop(workdir, None)
  try:
    os.unlink(_path(workdir))
  except OSError:
    pass
  os.close(fd)
  _remove_created(workdir, created)
