"""grain worker processes that clean up after themselves: no orphans, no leaked shared memory.

Two failures this module exists for:

* ``kill -9`` of a training run left its grain workers (and multiprocessing's resource
  tracker) alive for hours: a worker blocked on a full queue never learns that its parent is
  gone. Every worker started by :func:`prefetch` runs a watchdog thread that exits the worker
  as soon as the parent process is no longer its parent (Linux, macOS; a thread rather than
  ``PR_SET_PDEATHSIG``, which fires when the *thread* that forked exits, and grain starts
  workers from short-lived pool threads).
* Every run ended with ``resource_tracker: There appear to be N leaked shared_memory
  objects``: grain hands batches over in named shared-memory blocks and unlinks a block only
  when the last numpy view of it is garbage collected, asynchronously, on a pool thread that
  does not run at interpreter exit (and a view alive at shutdown never unlinks it).
  :class:`ClosingIterator` copies each batch out of its blocks and unlinks them as soon as it
  arrives, closes grain's iterator when exhausted, at :meth:`ClosingIterator.close` or at
  exit, and then runs grain's pending deletions (of the batches prefetched but never read).
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
import time
import weakref

import grain.python as grain
import numpy as np

# How often a worker checks that its parent is alive (seconds): the bound on how long an
# orphaned worker lingers.
PARENT_POLL_S = 0.5
_in_worker = False  # set in worker processes by _init_worker
_open: weakref.WeakSet = weakref.WeakSet()  # iterators to close at exit


def in_worker() -> bool:
  """True inside a worker process started by :func:`prefetch`."""
  return _in_worker


def _watch_parent(parent_pid: int) -> None:
  while True:
    if os.getppid() != parent_pid:
      os._exit(0)  # the parent died: nothing to clean up that the tracker will not
    time.sleep(PARENT_POLL_S)


def _init_worker(parent_pid: int, worker_index: int, worker_count: int) -> None:
  del worker_index, worker_count
  global _in_worker
  _in_worker = True
  threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def prefetch(ds: grain.IterDataset, num_workers: int, buffer_size: int = 2) -> grain.IterDataset:
  """``ds.mp_prefetch`` with ``num_workers`` watched worker processes (0: ``ds`` unchanged).

  Each worker produces whole elements of ``ds`` (round-robin over its elements), so batch a
  dataset before calling this to keep every batch's rows independent of the worker count.
  """
  if num_workers <= 0:
    return ds
  return ds.mp_prefetch(
    grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer_size),
    worker_init_fn=functools.partial(_init_worker, os.getpid()),
  )


def _detach(leaf):
  """A plain numpy copy of a leaf in a shared-memory block, whose name is unlinked now.

  Copied rather than viewed: a view would keep grain's SharedMemoryArray alive, and one still
  alive at interpreter shutdown fails in its ``__del__`` (its module is torn down) and leaks
  its block. The copy is one memcpy of the batch (~2% of the time the workers spend making it).
  """
  if isinstance(leaf, np.ndarray) and getattr(leaf, '_unlink_on_del', False):
    out = np.array(leaf, copy=True, subok=False)
    leaf._unlink_on_del = False  # pylint: disable=protected-access
    try:
      leaf.shm.unlink()
    except FileNotFoundError:
      pass
    return out  # ``leaf`` is dropped here and its __del__ unmaps the block
  return leaf


def detach_batch(batch: dict) -> dict:
  """A batch dict from a grain iterator with its shared-memory names already released."""
  return {k: _detach(v) for k, v in batch.items()}


def _drain_grain_deletions() -> None:
  """Runs grain's queued asynchronous shared-memory deletions now (they would be lost at exit)."""
  from grain._src.python.ipc import shared_memory_array  # pylint: disable=import-outside-toplevel

  cls = shared_memory_array.SharedMemoryArray
  pool = cls._del_thread_pool  # pylint: disable=protected-access
  if pool is not None:
    cls._disable_async_del()  # pylint: disable=protected-access
    pool.close()
    pool.join()


class ClosingIterator:
  """Wraps a grain iterator of dict batches: detaches shared memory, closes when done.

  ``next()`` returns the wrapped iterator's batches (numpy arrays; ``detach_batch``-ed). The
  wrapped iterator is closed (its worker processes stopped) at exhaustion, after ``limit``
  batches (when given), at :meth:`close`, at the end of a ``with`` block, or at exit.
  """

  def __init__(self, make_iterator, limit: int | None = None):
    self._make, self._it, self._limit, self._count = make_iterator, None, limit, 0
    self.closed = False
    _open.add(self)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.closed or (self._limit is not None and self._count >= self._limit):
      self.close()
      raise StopIteration
    if self._it is None:
      self._it = self._make()
    try:
      batch = detach_batch(next(self._it))
    except StopIteration:
      self.close()
      raise
    self._count += 1
    if self._limit is not None and self._count >= self._limit:
      self.close()  # the last batch is detached, so it outlives the iterator
    return batch

  def close(self) -> None:
    """Stops the worker processes and releases every shared-memory block (idempotent)."""
    self.closed = True
    it, self._it = self._it, None
    if it is not None:
      close = getattr(it, 'close', None)
      if callable(close):
        close()
      _drain_grain_deletions()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False

  def __del__(self):
    # Dropped unexhausted (e.g. the end of a loop over itertools.islice(loader, n)).
    try:
      self.close()
    except Exception:  # noqa: BLE001 (never raise from a finaliser)
      pass


@atexit.register
def _close_all() -> None:
  for it in list(_open):
    it.close()
  _drain_grain_deletions()  # iterators of ours closed earlier may have left some queued
