"""The train loader: one global batch sequence, whatever the number of processes or workers.

Global batch ``k`` (``G = batch_size * process_count`` images) of a run is fixed by the seed,
the epoch ``e = k // steps_per_epoch`` and the split alone:

* each epoch has one order of the split, :func:`train_order` (``seed``, ``e``); global batch
  ``k`` is positions ``[j*G, (j+1)*G)`` of it (``j = k % steps_per_epoch``; the last
  ``N % G`` positions of every epoch are dropped);
* process ``p`` reads rows ``j*G + p*B + [0, B)`` of that range, as the eval loader does;
* the random crop and flip of the image at global position ``g`` are drawn from
  :func:`augment_rng` (``seed``, ``e``, ``g``), not from process- or worker-local state.

So 1 process with 2 devices and 2 processes with 1 device each see the same global batches,
and so do any ``input.num_workers``. The iterator's state is the number of global batches
consumed (plus the fields that define the sequence, checked on restore): a checkpoint written
by ``P`` processes resumes exactly on any other process count with the same global batch.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import grain.python as grain
import numpy as np

from dualsig_jax.data import workers
from dualsig_jax.data.transforms import normalize_batch, train_crop

log = logging.getLogger('dualsig_jax')

# Distinct SeedSequence entropy for the two random streams derived from the seed.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1
STATE_FORMAT = 'dualsig_jax global train batches'
STATE_VERSION = 1
# The state fields that define the batch sequence; a restore with other values is refused.
_SEQUENCE_FIELDS = ('seed', 'global_batch_size', 'num_records', 'shuffle')
_ENDLESS = 2**62  # record-stream length of an endless loader (grain datasets need a length)


def _is_legacy(state: dict) -> bool:
  """A state of grain's DataLoader (the loader before the global batch sequence)."""
  return 'last_seen_indices' in state


def _seed(seed: int) -> int:
  return int(seed) % 2**63  # SeedSequence entropy must be non-negative


def train_order(seed: int, epoch: int, num_records: int, shuffle: bool = True) -> np.ndarray:
  """The split's order in ``epoch``: int64 ``[num_records]`` (``arange`` without shuffle)."""
  if not shuffle:
    return np.arange(num_records, dtype=np.int64)
  rng = np.random.default_rng([_ORDER_STREAM, _seed(seed), int(epoch)])
  return rng.permutation(num_records).astype(np.int64)


def augment_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
  """The generator of the crop and flip of global position ``position`` in ``epoch``."""
  return np.random.default_rng([_AUGMENT_STREAM, _seed(seed), int(epoch), int(position)])


class _Records:
  """This process's record stream: stream index -> {'image': uint8 [C, C, 3], 'label': int32}.

  A skipped bad image (``skip_bad_images``) is replaced by the next readable image of the
  epoch's order, with the augmentation of the slot: every batch stays full, and the
  replacement does not depend on which process reads the slot.
  """

  def __init__(self, source, *, seed, process_index, batch_size, global_batch, shuffle, crop):
    self.source, self.seed, self.shuffle = source, int(seed), bool(shuffle)
    self.p, self.b, self.g = int(process_index), int(batch_size), int(global_batch)
    self.n = len(source)
    self.steps_per_epoch = self.n // self.g
    self.resize_size, self.crop_size = crop
    self._cached = (None, None)

  def __getstate__(self):
    return {**self.__dict__, '_cached': (None, None)}  # workers compute their own orders

  def _order(self, epoch: int) -> np.ndarray:
    cached_epoch, order = self._cached
    if cached_epoch != epoch:
      order = train_order(self.seed, epoch, self.n, self.shuffle)
      self._cached = (epoch, order)
    return order

  def position(self, r: int) -> tuple[int, int]:
    """(epoch, global position in that epoch's order) of record-stream index ``r``."""
    step, row = divmod(int(r), self.b)
    epoch, j = divmod(step, self.steps_per_epoch)
    return epoch, j * self.g + self.p * self.b + row

  def __call__(self, r: int) -> dict:
    epoch, pos = self.position(r)
    order = self._order(epoch)
    for k in range(self.n):
      element = self.source[int(order[(pos + k) % self.n])]
      if element['image'] is not None:
        break
    else:
      raise RuntimeError(f'every image of the train split ({self.n}) was skipped as unreadable')
    rng = augment_rng(self.seed, epoch, pos)
    # input.augment drives both: False = metadata order and centre crops, no flips.
    image = train_crop(element['image'], rng, self.resize_size, self.crop_size, self.shuffle)
    return {'image': image, 'label': np.int32(element['label'])}


def _normalizing_batch(values: list) -> dict:
  """B examples -> {'image': float32 [B, C, C, 3] (ImageNet-normalized), 'label': int32 [B]}.

  Normalizes the uint8 crops straight into the batch array: in a worker process that array is
  a shared-memory block the main process maps (no pickling; it copies the batch out once and
  releases the block, see workers.py).
  """
  images = [v['image'] for v in values]
  shape = (len(images),) + images[0].shape
  if workers.in_worker():
    from grain.multiprocessing import SharedMemoryArray  # pylint: disable=import-outside-toplevel

    out = SharedMemoryArray(shape, dtype=np.float32)
  else:
    out = np.empty(shape, np.float32)
  return {
    'image': normalize_batch(images, out),
    'label': np.array([v['label'] for v in values], np.int32),
  }


class TrainLoader:
  """``iter(loader)`` -> a :class:`TrainIterator` from global batch 0.

  Attributes: ``skip_report`` (:class:`~dualsig_jax.data.sources.SkipReport` or None),
  ``steps_per_epoch`` (global batches per epoch), ``num_batches`` (None when endless).
  """

  def __init__(
    self,
    source,
    *,
    seed: int,
    num_epochs: int | None,
    process_index: int,
    process_count: int,
    batch_size: int,
    resize_size: int,
    crop_size: int,
    shuffle: bool,
    num_workers: int,
    skip_report=None,
  ):
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    global_batch = int(batch_size) * int(process_count)
    if len(source) < global_batch:
      raise ValueError(
        f'the train split has {len(source)} images, fewer than one global batch of '
        f'{global_batch}; lower input.batch_size'
      )
    self._records = _Records(
      source,
      seed=seed,
      process_index=process_index,
      batch_size=batch_size,
      global_batch=global_batch,
      shuffle=shuffle,
      crop=(int(resize_size), int(crop_size)),
    )
    self.batch_size, self.num_workers = int(batch_size), int(num_workers)
    self.steps_per_epoch = self._records.steps_per_epoch
    self.num_batches = None if num_epochs is None else int(num_epochs) * self.steps_per_epoch
    self.skip_report = skip_report
    self.sequence = dict(
      seed=int(seed), global_batch_size=global_batch, num_records=len(source), shuffle=shuffle
    )

  def __iter__(self) -> TrainIterator:
    return TrainIterator(self)

  def dataset(self, start: int) -> grain.IterDataset:
    """The batches from global batch ``start`` on, as a grain dataset (workers attached)."""
    b = self.batch_size
    stop = _ENDLESS if self.num_batches is None else self.num_batches * b
    ds = grain.MapDataset.range(min(start * b, stop), stop).map(self._records)
    if self.num_workers:
      # Batches are formed before the work is split across worker processes, so each batch
      # is the same rows for any worker count. Each worker decodes inline: grain's reader
      # threads only fight the transform for the GIL and the cores (~10-25% slower on 2).
      ds = ds.batch(b, drop_remainder=True, batch_fn=_normalizing_batch)
      ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
      return workers.prefetch(ds, self.num_workers)
    # In process: grain's reader threads decode records in parallel (PIL releases the GIL).
    return ds.to_iter_dataset().batch(b, drop_remainder=True, batch_fn=_normalizing_batch)


class TrainIterator:
  """Batches ``{'image': float32 [B, C, C, 3], 'label': int32 [B]}`` of this process.

  ``get_state()`` (JSON bytes) / ``set_state()`` save and restore the position (the number of
  global batches consumed), as grain iterators do, so ``grain.PyGrainCheckpointSave`` works.
  """

  def __init__(self, loader: TrainLoader):
    self._loader, self._next, self._it = loader, 0, None

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      start = self._next
      self._it = workers.ClosingIterator(lambda: iter(self._loader.dataset(start)))
    batch = next(self._it)  # a failed read leaves the position where it was
    self._next += 1
    return batch

  @property
  def position(self) -> int:
    """Global batches consumed so far."""
    return self._next

  def state(self) -> dict:
    return dict(
      format=STATE_FORMAT, version=STATE_VERSION, next_batch=self._next, **self._loader.sequence
    )

  def get_state(self) -> bytes:
    return json.dumps(self.state(), indent=2).encode()

  def set_state(self, state) -> None:
    """Continues from a saved state (bytes, str or dict) of any process count.

    Raises:
      ValueError: the state was written by another loader, or for another sequence (its
        seed, global batch size, split size or shuffling differ; the field is named).
    """
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if _is_legacy(state):
      raise ValueError(
        'the saved data position is from the previous train loader (each process shuffled '
        'its own shard), whose batch order this version cannot continue; resume through '
        'the checkpoint (load_state_dir with its step), or train this stage again'
      )
    if state.get('format') != STATE_FORMAT or state.get('version') != STATE_VERSION:
      raise ValueError(f'not a saved train loader position: {str(state)[:200]}')
    for key in _SEQUENCE_FIELDS:
      if state.get(key) != self._loader.sequence[key]:
        raise ValueError(
          f'the saved data position is for {key}={state.get(key)!r}, this run has '
          f'{self._loader.sequence[key]!r}'
        )
    self.close()
    self._next = int(state['next_batch'])

  def load_state_dir(self, folder: str, step: int | None = None) -> None:
    """``set_state`` from the ``process_<i>-of-<n>.json`` files that grain's checkpoint
    handler wrote into ``folder``: this process's own file when the process count is the
    same, else any (every process saves the same state).

    ``step``: the checkpoint's train step (= global batches consumed, one per step). A state
    written by the previous per-process loader then resumes at global batch ``step`` of this
    loader's sequence, with a warning (the batches from there on differ from the ones the
    old loader would have given); without ``step`` it is refused.
    """
    from grain._src.core import sharding  # pylint: disable=import-outside-toplevel

    index, count = sharding.get_process_index_and_count()
    own = os.path.join(folder, f'process_{index}-of-{count}.json')
    found = [own] if os.path.isfile(own) else sorted(glob.glob(os.path.join(folder, '*.json')))
    if not found:
      raise FileNotFoundError(f'no data loader state in {folder}')
    states = []
    for path in found:
      with open(path, encoding='utf-8') as f:
        states.append(json.load(f))
    if step is not None and all(_is_legacy(s) for s in states):
      log.warning(
        'the data position in %s was saved by the previous train loader (per-process '
        'shuffling); continuing at global batch %d of the process-count-independent order, '
        'so the batches from here on differ from those that loader would have given',
        folder,
        step,
      )
      self.close()
      self._next = int(step)
      return
    if any(s != states[0] for s in states):
      raise ValueError(f'the data loader states in {folder} differ between processes')
    self.set_state(states[0])

  def start_prefetch(self) -> None:
    """Kept for grain's checkpoint handler; the workers start at the first ``next()``."""

  def close(self) -> None:
    """Stops the worker processes (the next ``next()`` starts them again)."""
    it, self._it = self._it, None
    if it is not None:
      it.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
