"""grain loaders: the train loader (built here, see train_loader.py) and the padded eval loader.

Config fields read (``config.input``): resize_size, crop_size, eval_size, num_workers,
skip_bad_images, and those of :mod:`dualsig_jax.data.splits` (source, dataset_name, data_root,
metadata_root, train_split, eval_split, synthetic.*, tfds.*, mask_root).
"""

from __future__ import annotations

import math

import grain.python as grain
import numpy as np

from dualsig_jax.data import splits, workers
from dualsig_jax.data.metadata import Metadata, check_labels
from dualsig_jax.data.sources import SkipReport, TfdsSource
from dualsig_jax.data.train_loader import TrainLoader
from dualsig_jax.data.transforms import build_mask, eval_transform, rescale_boxes

# TFDS eval batches need a box count fixed before reading; more boxes than this raise.
TFDS_MAX_BOXES = 16
# Kept importable from here (the split-building helpers live in splits.py).
SOURCES, load_split = splits.SOURCES, splits.load_split


def _workers(input_cfg) -> int:
  """input.num_workers; with workers, make grain's absl flags readable.

  grain 0.2.x reads an absl flag when starting worker processes and fails with
  UnparsedFlagAccessError in scripts that do not run under absl.app (google/grain#1355);
  marking the flags parsed keeps their defaults and is harmless under absl.app.
  """
  n = int(splits.get(input_cfg, 'num_workers', 0))
  if n < 0:
    raise ValueError(f'input.num_workers must be >= 0, got {n}')
  if n > 0:
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
  return n


def make_train_loader(
  input_cfg,
  *,
  seed: int,
  num_epochs: int | None,
  process_index: int,
  process_count: int,
  batch_size: int,
  num_classes: int | None = None,
) -> TrainLoader:
  """Shuffled training loader over ``input_cfg.train_split`` for this process.

  Every process count and worker count gives the same global batches (see
  :mod:`~dualsig_jax.data.train_loader`). ``input.augment=False`` gives the split in metadata
  order, centre crops and no flips: the same batches every run, for parity checks against
  other frameworks and debugging.

  Args:
    seed: order and augmentation seed.
    num_epochs: passes over the data (None = forever).
    process_index, process_count: this process reads rows ``[p*B, (p+1)*B)`` of every global
      batch of ``B * process_count`` images.
    batch_size: per-process batch size ``B``.
    num_classes: the model's class count; when given, labels are checked against it first
      (:func:`~dualsig_jax.data.metadata.check_labels`).

  Returns:
    A :class:`~dualsig_jax.data.train_loader.TrainLoader`; ``iter(loader)`` yields dicts with
    ``image`` float32 ``[B, C, C, 3]`` (ImageNet-normalized, C = crop_size) and ``label``
    int32 ``[B]``. The iterator's ``get_state()``/``set_state()`` (or
    ``grain.PyGrainCheckpointSave``) save/resume it. ``loader.skip_report`` (a
    :class:`SkipReport`, or None) counts skipped bad images when ``input.skip_bad_images`` is on.
  """
  skip_report = SkipReport() if splits.get(input_cfg, 'skip_bad_images', False) else None
  source, meta = splits.build_source(
    input_cfg, input_cfg.train_split, train=True, skip_report=skip_report
  )
  if num_classes is not None:
    check_labels(meta, num_classes)
  return TrainLoader(
    source,
    seed=seed,
    num_epochs=num_epochs,
    process_index=process_index,
    process_count=process_count,
    batch_size=batch_size,
    resize_size=input_cfg.resize_size,
    crop_size=input_cfg.crop_size,
    shuffle=bool(splits.get(input_cfg, 'augment', True)),
    num_workers=_workers(input_cfg),
    skip_report=skip_report,
  )


def steps_per_epoch(input_cfg, global_batch: int) -> int:
  """Full global batches per pass over the train split (the remainder is dropped)."""
  n = splits.split_length(input_cfg, input_cfg.train_split, train=True)
  return max(1, n // int(global_batch))


class _EvalSource:
  """This process's padded slice of an eval split; position -> raw record or padding."""

  def __init__(self, source, positions):
    self._source, self._positions = source, positions

  def __len__(self):
    return len(self._positions)

  def __getitem__(self, i):
    pos = int(self._positions[int(i)])
    # Not None: grain treats a None element as filtered out.
    return {'pad': True} if pos < 0 else self._source[pos]


class _EvalMap(grain.MapTransform):
  """Raw record (or ``{'pad': True}``) -> fixed-shape eval example."""

  def __init__(self, eval_size, max_boxes, with_mask):
    self.eval_size, self.max_boxes, self.with_mask = int(eval_size), max_boxes, with_mask

  def map(self, element):
    s = self.eval_size
    boxes = np.zeros((self.max_boxes, 4), np.int32)
    if element.get('pad'):  # Padding: ignored everywhere (valid=False, mask all "ignore").
      out = {
        'image': np.zeros((s, s, 3), np.float32),
        'label': np.int32(0),
        'index': np.int32(-1),
        'valid': np.bool_(False),
        'boxes': boxes,
        'num_boxes': np.int32(0),
      }
      if self.with_mask:
        out['mask'] = np.full((s, s), 255, np.uint8)
      return out
    n = len(element['boxes'])
    if n > self.max_boxes:
      raise ValueError(
        f'{element["where"]}: {n} boxes, more than the {self.max_boxes} an eval batch holds'
      )
    if n:
      boxes[:n] = rescale_boxes(element['boxes'], element['size'], s)
    if element['image'] is None:
      raise RuntimeError(f'{element["where"]}: image missing in evaluation (never skipped)')
    out = {
      'image': eval_transform(element['image'], s),
      'label': np.int32(element['label']),
      'index': np.int32(element['index']),
      'valid': np.bool_(True),
      'boxes': boxes,
      'num_boxes': np.int32(n),
    }
    if self.with_mask:
      if element['mask'] is None:
        raise ValueError(f'{element["where"]}: no mask for this image')
      out['mask'] = build_mask(*element['mask'], s, element['where'])
    return out


class EvalLoader:
  """Iterable over fixed-shape eval batches of one process; never drops an image.

  Global step ``b`` covers split positions ``[b*B*P, (b+1)*B*P)``; process ``p`` gets rows
  ``b*B*P + p*B + [0, B)``. Positions past the end are padding rows: ``valid=False``,
  ``index=-1``, zero image/boxes, mask all 255. Every process yields ``len(self)`` batches.

  Batches: ``image`` float32 ``[B, S, S, 3]``, ``label``/``index``/``num_boxes`` int32 ``[B]``,
  ``valid`` bool ``[B]``, ``boxes`` int32 ``[B, MAXB, 4]`` (x0,y0,x1,y1 at eval size S, zero
  padded), and ``mask`` uint8 ``[B, S, S]`` (1/0/255) when the split has masks.
  """

  def __init__(
    self,
    source,
    metadata: Metadata,
    *,
    batch_size: int,
    eval_size: int,
    max_boxes: int,
    with_mask: bool,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
  ):
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    self.metadata = metadata
    self.batch_size = int(batch_size)
    self._source, self._num_workers = source, int(num_workers)
    self._map = _EvalMap(eval_size, max_boxes, with_mask)
    n, step = len(source), self.batch_size * process_count
    self._num_batches = math.ceil(n / step)
    b = np.arange(self._num_batches)[:, None] * step
    pos = (b + process_index * self.batch_size + np.arange(self.batch_size)[None]).ravel()
    self._positions = np.where(pos < n, pos, -1)

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> workers.ClosingIterator:
    return self.iterate()

  def iterate(self, limit: int | None = None) -> workers.ClosingIterator:
    """An iterator over the first ``limit`` batches (all when None).

    Its worker processes stop and its shared memory is released when it is exhausted, after
    ``limit`` batches, at ``close()`` / the end of a ``with`` block, or at exit; so
    ``itertools.islice(loader, n)`` leaves them running until exit, ``iterate(n)`` does not.
    """

    def make():
      # Batches are formed before the work is split across worker processes (grain's dataset
      # API shards the *batched* dataset), so every batch has the rows described above for
      # any worker count.
      ds = grain.MapDataset.source(_EvalSource(self._source, self._positions))
      ds = ds.map(self._map).batch(self.batch_size, drop_remainder=False).to_iter_dataset()
      return iter(workers.prefetch(ds, self._num_workers))

    return workers.ClosingIterator(make, limit=limit)


def make_eval_loader(
  input_cfg,
  split: str,
  *,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  num_classes: int | None = None,
) -> EvalLoader:
  """Eval loader over ``split`` (resize to ``input.eval_size``, no augmentation).

  ``batch_size`` is per process; ``num_classes`` (the model's), when given, checks the labels
  first. Returns an :class:`EvalLoader` (``len()`` = batches per process, ``.metadata`` = the
  split's :class:`Metadata`, whose ``image_ids[index]`` names each valid row; its ``boxes`` /
  ``masks`` are empty when the split has none). Missing or corrupt images raise: evaluation
  never skips. TFDS: ``split`` maps to ``input.tfds.eval_split`` (see ``splits.tfds_split``).
  """
  source, meta = splits.build_source(input_cfg, split, train=False)
  if num_classes is not None:
    check_labels(meta, num_classes)
  if isinstance(source, TfdsSource):
    max_boxes, with_mask = TFDS_MAX_BOXES, False
  else:
    max_boxes, with_mask = max(1, meta.max_boxes), bool(meta.masks)
  return EvalLoader(
    source,
    meta,
    batch_size=batch_size,
    eval_size=input_cfg.eval_size,
    max_boxes=max_boxes,
    with_mask=with_mask,
    process_index=process_index,
    process_count=process_count,
    num_workers=_workers(input_cfg),
  )
