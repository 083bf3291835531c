"""A run's working folder: where each stage keeps its checkpoints, the lock that keeps a second
run out, and the temporaries a killed run leaves behind.

Layout: `<workdir>/<stage>/checkpoints/<step>/` (Orbax steps), `<workdir>/config.json`,
`metrics.jsonl`, `results.json` / `results.md`, and `<workdir>/.run.lock` while a run holds it.
No JAX here: the entry points use it before JAX starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time

log = logging.getLogger('dualsig_jax')

LOCK_FILE = '.run.lock'
# Orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>` and renames it when complete;
# a run killed during a save leaves that folder.
_ORBAX_TMP = '.orbax-checkpoint-tmp'


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir's lock."""


def checkpoint_dir(workdir: str, stage: str) -> str:
  """`<workdir>/<stage>/checkpoints`: the Orbax folder of a stage's steps."""
  return os.path.join(workdir, stage, 'checkpoints')


def folder_steps(folder: str) -> list[int]:
  """The complete steps (numeric folders) of an Orbax checkpoint folder, ascending; [] when the
  folder is missing or has none (a converter output folder has none)."""
  if not os.path.isdir(folder):
    return []
  return sorted(int(p) for p in os.listdir(folder) if p.isdigit())


def steps(workdir: str, stage: str) -> list[int]:
  """The complete checkpoint steps of a stage, ascending; [] when none."""
  return folder_steps(checkpoint_dir(workdir, stage))


def _flock_owner(fd: int) -> int | None:
  """The pid holding a flock on the file of `fd`, from /proc/locks (Linux), or None."""
  st = os.fstat(fd)
  ident = f'{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}'
  try:
    with open('/proc/locks', encoding='ascii') as f:
      for line in f:
        parts = line.split()
        if 'FLOCK' in parts and ident in parts:
          return int(parts[parts.index(ident) - 1])
  except (OSError, ValueError, IndexError):
    pass
  return None


def _holder(path: str, fd: int) -> str:
  try:
    with open(path, encoding='utf-8') as f:
      rec = json.load(f)
    return f'pid {rec["pid"]} on host {rec["host"]}, since {rec["since"]}'
  except (OSError, ValueError, KeyError, TypeError):
    # The record is gone (removed by hand) or not written yet: the kernel still knows the pid.
    pid = _flock_owner(fd)
    return f'pid {pid}' if pid is not None else 'a live process whose record is missing'


def _busy(workdir: str, path: str, fd: int) -> WorkdirBusyError:
  return WorkdirBusyError(
    f'another run holds {workdir} ({_holder(path, fd)}); wait for it to finish or stop it, '
    'or use another --workdir'
  )


def _lock_folder(workdir: str, path: str) -> int | None:
  """flock on the workdir folder itself (an fd, or None where the filesystem refuses folder
  locks): unlike `.run.lock`, a user cannot delete it from under a live run."""
  try:
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    err = _busy(workdir, path, fd)
    os.close(fd)
    raise err from None
  except OSError:  # e.g. a network filesystem without locks on folders: the file lock remains
    os.close(fd)
    return None
  return fd


@contextlib.contextmanager
def locked(workdir: str):
  """Holds an exclusive lock on `workdir` (creating it) for the duration of the block.

  Two flocks: one on the workdir folder and one on `<workdir>/.run.lock`, which records the
  holder's pid, host and start time. The kernel releases both when the holder dies, however it
  dies, so the file of a killed run never blocks the next one. Liveness is the flock's, never
  the file's: removing `.run.lock` by hand while a run is active does not let a second run in
  (the folder's lock still refuses it, naming the pid from /proc/locks), so nothing of the live
  run is deleted. (On NFS, Linux maps flock to a lock the server sees; where folders cannot be
  locked, the file lock alone remains.)

  Raises:
    WorkdirBusyError naming the holder's pid and host when another process holds it.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  folder_fd = _lock_folder(workdir, path)
  try:
    # O_CLOEXEC: worker processes started by exec must not inherit (and keep) the lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      err = _busy(workdir, path, fd)
      os.close(fd)
      raise err from None
    try:
      rec = dict(
        pid=os.getpid(), host=socket.gethostname(), since=time.strftime('%Y-%m-%d %H:%M:%S')
      )
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(rec).encode(), 0)
      yield
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)
  finally:
    if folder_fd is not None:
      fcntl.flock(folder_fd, fcntl.LOCK_UN)
      os.close(folder_fd)


def check_writable(workdir: str) -> str | None:
  """Why `workdir` cannot hold a run's outputs (not creatable, not writable), or None.

  Creates the folder if missing and writes and removes a probe file in it, so a read-only
  folder or filesystem is found before any work rather than after it."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write-probe-{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('x')
    os.remove(probe)
  except OSError as e:
    return (
      f'--workdir {workdir} is not writable ({e.strerror or e}); make it writable or pass '
      'another --workdir'
    )
  return None


def remove_stale_temporaries(workdir: str, stages) -> list[str]:
  """Deletes the unfinished Orbax step folders (`*.orbax-checkpoint-tmp*`) that a run killed
  during a save left in the checkpoint folders of `stages`; returns their paths.

  Call it holding the lock: only a live run's save could be writing such a folder."""
  removed = []
  for stage in stages:
    d = checkpoint_dir(workdir, stage)
    if not os.path.isdir(d):
      continue
    for name in sorted(os.listdir(d)):
      if _ORBAX_TMP in name:
        path = os.path.join(d, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        removed.append(path)
  if removed:
    log.warning('removed unfinished checkpoint saves of an interrupted run: %s', removed)
  return removed
