"""Combining streaming evaluators across the processes of a `jax.distributed` job, exactly.

Every evaluator of this project (`wsol.BoxEvaluator`, `wsol.MaskEvaluator`,
`cam.FidelityAccumulator`, the Top-1 `Counts` below) follows one protocol:

  accumulate(...)   adds a batch (its own arguments)
  state() -> dict   what it holds, as integers and arrays (int64 counts, float32 per-image values)
  merge(state)      adds another instance's state
  reset()           forgets everything
  compute()         the metrics

so the multi-host combine is written once, against that protocol: each process's state is
all-gathered bit for bit, every evaluator is reset and merges the states of processes 0..P-1 in
order. Integer counts sum exactly and per-image floats are summed with `math.fsum` by their
owner, so P processes give the metrics of one process bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import numpy as np

_MAX_DIMS = 4


class Counts:
  """Integer counters under names (e.g. correct predictions per head), with the protocol."""

  def __init__(self, names: Iterable[str]):
    self.names = tuple(names)
    self.reset()

  def reset(self) -> None:
    self.values = {n: 0 for n in self.names}

  def add(self, name: str, n: int) -> None:
    self.values[name] += int(n)

  def state(self) -> dict:
    return dict(self.values)

  def merge(self, state: Mapping) -> None:
    for n in self.names:
      self.values[n] += int(state[n])

  def compute(self) -> dict:
    return dict(self.values)


def allgather(x) -> np.ndarray:
  """Every process's `x` stacked, `[P, *x.shape]`; bit-exact for 4- and 8-byte dtypes.

  jax narrows int64 / float64 to 32 bits unless x64 is on, so the bytes travel as int32 words.
  `x` must have the same shape and dtype on every process.
  """
  from jax.experimental import multihost_utils

  x = np.asarray(x)
  if x.dtype.itemsize not in (4, 8):
    raise ValueError(f'allgather supports 4- and 8-byte dtypes, got {x.dtype}')
  words = np.ascontiguousarray(x).reshape(-1).view(np.int32)
  got = np.asarray(multihost_utils.process_allgather(words))
  return got.view(x.dtype).reshape((-1, *x.shape))


def _as_array(v) -> np.ndarray:
  a = np.asarray(v)
  if a.dtype.kind in 'iub':
    return a.astype(np.int64)
  if a.dtype.kind == 'f':
    return a.astype(np.float32 if a.dtype.itemsize <= 4 else np.float64)
  raise ValueError(f'state values must be numbers or numeric arrays, got {a.dtype}')


def gather_states(state: Mapping) -> list[dict]:
  """Every process's `state` (same keys everywhere, any shapes), in process order.

  Arrays may have different shapes on different processes (e.g. per-image values of shards of
  different sizes): shapes travel first, then the values padded to the longest.
  """
  out = [{} for _ in range(jax.process_count())]
  for key in sorted(state):
    a = _as_array(state[key])
    if a.ndim > _MAX_DIMS:
      raise ValueError(f'state {key!r} has {a.ndim} dimensions; at most {_MAX_DIMS}')
    code = 0 if a.dtype == np.int64 else (1 if a.dtype == np.float32 else 2)
    header = np.array([code, a.ndim, *a.shape, *[0] * (_MAX_DIMS - a.ndim)], np.int64)
    headers = allgather(header)
    if len(set(headers[:, 0])) != 1:
      raise ValueError(f'state {key!r} has different dtypes on different processes')
    sizes = [int(np.prod(h[2 : 2 + h[1]])) for h in headers]
    flat = np.zeros(max(max(sizes), 1), a.dtype)  # padded: the gather needs equal shapes
    flat[: a.size] = a.reshape(-1)
    gathered = allgather(flat)
    for p, h in enumerate(headers):
      shape = tuple(int(d) for d in h[2 : 2 + h[1]])
      v = gathered[p, : sizes[p]].reshape(shape)
      out[p][key] = v if shape else v.item()
  return out


def combine_over_processes(evaluators: Mapping[str, object]) -> None:
  """Makes every evaluator hold the union of all processes' images (on every process).

  `evaluators`: name -> an object with `state()`, `reset()` and `merge(state)`. The names must
  be the same on every process (each is gathered in sorted order). One process: nothing to do.
  """
  if jax.process_count() == 1:
    return
  for name in sorted(evaluators):
    ev = evaluators[name]
    states = gather_states(ev.state())
    ev.reset()
    for s in states:
      ev.merge(s)
