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


def _holder(path: str) -> str:
  try:
    with open(path, encoding='utf-8') as f:
      rec = json.load(f)
    return f'pid {rec["pid"]} on host {rec["host"]}, since {rec["since"]}'
  except (OSError, ValueError, KeyError, TypeError):
    return 'a process that has not written its name yet'


@contextlib.contextmanager
def locked(workdir: str):
  """Holds an exclusive lock on `workdir` (creating it) for the duration of the block.

  The lock is `fcntl.flock` on `<workdir>/.run.lock`, which records the holder's pid, host and
  start time. The kernel releases it when the holder dies, however it dies, so the file of a
  killed run never blocks the next one. (On NFS, Linux maps flock to a lock the server sees.)

  Raises:
    WorkdirBusyError naming the holder's pid and host when another process holds it.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  # O_CLOEXEC: worker processes started by exec must not inherit (and keep) the lock.
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise WorkdirBusyError(
      f'another run holds {workdir} ({_holder(path)}); wait for it to finish or stop it, '
      'or use another --workdir'
    ) from None
  try:
    rec = dict(pid=os.getpid(), host=socket.gethostname(), since=time.strftime('%Y-%m-%d %H:%M:%S'))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(rec).encode(), 0)
    yield
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


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
