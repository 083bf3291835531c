"""grain random-access sources: an image folder + wsolevaluation metadata, or a TFDS dataset.

Both yield the same raw record (a dict, consumed inside the same worker process, never
batched): ``index`` (position in the split), ``image`` (RGB PIL image, or None when a bad
image was skipped), ``label`` (int), ``size`` ((w, h) used to rescale boxes), ``boxes``
(int ``[N, 4]`` x0,y0,x1,y1 in original pixels), ``mask`` ((mask files, ignore file) or None)
and ``where`` (text for error messages).
"""

from __future__ import annotations

import collections.abc
import glob
import logging
import os
import shutil
import tempfile
import weakref

import numpy as np
from PIL import Image

from dualsig_jax.data.metadata import Metadata, check_relative_path, safe_join
from dualsig_jax.data.transforms import SKIP_HINT, BadImageError, load_rgb

log = logging.getLogger(__name__)


def _remove_own_folder(path: str, owner_pid: int) -> None:
  # Forked worker processes inherit the finalizer registry; only the creator removes the folder.
  if os.getpid() == owner_pid:
    shutil.rmtree(path, ignore_errors=True)


class SkipReport:
  """Counts images skipped with ``skip_bad_images`` across worker processes.

  Each process appends ``image_id<TAB>where<TAB>reason`` lines to its own file in ``log_dir``
  (worker processes cannot share a Python counter), and this object sums them up.

  Without ``log_dir`` it makes a temporary ``dualsig_skipped_*`` folder, removed (by the
  creating process) when this object is garbage collected, at :meth:`close`, or at exit.
  """

  def __init__(self, log_dir: str | None = None):
    self._finalizer = None
    if log_dir is None:
      log_dir = tempfile.mkdtemp(prefix='dualsig_skipped_')
      self._finalizer = weakref.finalize(self, _remove_own_folder, log_dir, os.getpid())
    self.log_dir = log_dir

  def __getstate__(self):
    # Copies in worker processes write into the folder but do not own it.
    return {'log_dir': self.log_dir, '_finalizer': None}

  def close(self) -> None:
    """Removes the temporary folder now (no-op for a caller-given ``log_dir``)."""
    if self._finalizer is not None:
      self._finalizer()

  def record(self, image_id: str, where: str, reason: str) -> None:
    os.makedirs(self.log_dir, exist_ok=True)
    with open(os.path.join(self.log_dir, f'skipped-{os.getpid()}.txt'), 'a') as f:
      f.write(f'{image_id}\t{where}\t{reason}\n'.replace('\r', ' '))

  def entries(self) -> list[tuple[str, str, str]]:
    """(image_id, metadata line, reason) of every skip so far, sorted."""
    out = []
    for path in glob.glob(os.path.join(self.log_dir, 'skipped-*.txt')):
      with open(path) as f:
        out += [tuple(line.rstrip('\n').split('\t', 2)) for line in f if line.strip()]
    return sorted(out)

  def count(self) -> int:
    """Number of skipped reads (an image read in two epochs counts twice)."""
    return len(self.entries())

  def summary(self) -> str:
    entries = self.entries()
    uniq = sorted({e[0] for e in entries})
    head = ', '.join(uniq[:10]) + (' ...' if len(uniq) > 10 else '')
    return f'skipped {len(entries)} bad image reads ({len(uniq)} distinct files): {head}'


class FolderSource:
  """Random access over ``metadata.image_ids``, images at ``data_root/<image_id>``.

  Implements grain's RandomAccessDataSource protocol (``__len__``, ``__getitem__``).
  Args:
    metadata: parsed split metadata.
    data_root: folder the image ids are relative to.
    mask_root: folder the mask paths are relative to (default ``data_root``).
    skip_report: when given, missing/corrupt images are logged there and yield ``image=None``
      (training only); otherwise they raise :class:`BadImageError`.
  """

  def __init__(
    self,
    metadata: Metadata,
    data_root: str,
    *,
    mask_root: str | None = None,
    skip_report: SkipReport | None = None,
  ):
    if not os.path.isdir(data_root):
      raise FileNotFoundError(f'data root {data_root!r} does not exist')
    self._ids = list(metadata.image_ids)
    # String checks for every id up front (cheap, so a bad id fails at construction); the
    # symlink-proof realpath check runs per read, where its lstat calls hide behind decoding.
    for i in self._ids:
      check_relative_path(i, metadata.where.get(i, i))
    self._data_root = data_root
    self._labels = np.array([metadata.labels[i] for i in self._ids], dtype=np.int32)
    self._where = [metadata.where.get(i, '') for i in self._ids]
    self._sizes = metadata.sizes
    self._boxes = metadata.boxes
    mask_root = mask_root or data_root
    self._masks = {
      i: (
        [safe_join(mask_root, p, self._where[k]) for p in metadata.masks[i][0]],
        None
        if metadata.masks[i][1] is None
        else safe_join(mask_root, metadata.masks[i][1], self._where[k]),
      )
      for k, i in enumerate(self._ids)
      if i in metadata.masks
    }
    self._skip_report = skip_report

  def __len__(self) -> int:
    return len(self._ids)

  def __repr__(self) -> str:
    return f'FolderSource({len(self)} images)'

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    image_id = self._ids[index]
    try:
      path = safe_join(self._data_root, image_id, self._where[index])
      image = load_rgb(path, self._where[index])
    except BadImageError as e:
      if self._skip_report is None:
        raise BadImageError(f'{e}{SKIP_HINT}') from None
      log.warning('skip_bad_images: %s', e)
      self._skip_report.record(image_id, self._where[index], str(e))
      image = None
    size = self._sizes.get(image_id) or (image.size if image is not None else (1, 1))
    boxes = self._boxes.get(image_id)
    return {
      'index': index,
      'image': image,
      'label': int(self._labels[index]),
      'size': size,
      'boxes': np.zeros((0, 4), np.int64) if boxes is None else boxes,
      'mask': self._masks.get(image_id),
      'where': self._where[index],
    }


def tfds_boxes(record: dict, width: int, height: int) -> np.ndarray:
  """Normalized TFDS boxes (ymin, xmin, ymax, xmax) -> pixel (x0, y0, x1, y1) int64 ``[N, 4]``.

  Looks for ``record['objects']['bbox']`` (detection-style builders) then ``record['bbox']``
  (e.g. caltech_birds2011); no boxes -> ``[0, 4]``.
  """
  bbox = None
  objects = record.get('objects')
  if isinstance(objects, dict) and 'bbox' in objects:
    bbox = objects['bbox']
  elif 'bbox' in record:
    bbox = record['bbox']
  if bbox is None:
    return np.zeros((0, 4), np.int64)
  b = np.asarray(bbox, dtype=np.float64).reshape(-1, 4)
  # round(): the builders stored pixel/size as float32, so this recovers the pixel value.
  out = np.stack([b[:, 1] * width, b[:, 0] * height, b[:, 3] * width, b[:, 2] * height], 1)
  return np.round(out).astype(np.int64)


class TfdsBoxes(collections.abc.Mapping):
  """image id -> pixel boxes int64 ``[N, 4]`` of a TFDS split, read from the record on access.

  ``Metadata.boxes`` of a TFDS split with a bbox feature: it tells evaluation that the split
  has boxes without decoding every record up front (eval batches carry each record's boxes).
  Iterating all values (e.g. ``Metadata.max_boxes``) reads the whole split.
  """

  def __init__(self, source: TfdsSource, image_ids):
    self._source = source
    self._index = {image_id: k for k, image_id in enumerate(image_ids)}

  def __getitem__(self, image_id: str) -> np.ndarray:
    return self._source[self._index[image_id]]['boxes']

  def __len__(self) -> int:
    return len(self._index)

  def __iter__(self):
    return iter(self._index)


class TfdsSource:
  """Adapts ``tfds.data_source(name, split=..., data_dir=...)`` records to our raw record.

  A TFDS record is a dict with ``image`` (uint8 ``[H, W, C]``, C in {1, 3, 4}), ``label`` and
  optionally boxes (see :func:`tfds_boxes`). Corrupt records raise :class:`BadImageError`
  unless ``skip_report`` is given.
  """

  def __init__(self, data_source, name: str, split: str, *, skip_report: SkipReport | None = None):
    self._src = data_source
    self._name = f'{name}[{split}]'
    self._skip_report = skip_report

  def __len__(self) -> int:
    return len(self._src)

  def __repr__(self) -> str:
    return f'TfdsSource({self._name}, {len(self)} records)'

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    where = f'tfds {self._name} record {index}'
    try:
      record = self._src[index]
      arr = np.asarray(record['image'])
      if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise BadImageError(
          f'{where}: image must be uint8 [H,W] or [H,W,C], got {arr.dtype} {arr.shape}'
        )
      if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
      image = Image.fromarray(arr)
      if image.mode != 'RGB':
        image = image.convert('RGB')
    except Exception as e:  # pylint: disable=broad-except
      err = e if isinstance(e, BadImageError) else BadImageError(f'{where}: {e!r}')
      if self._skip_report is None:
        raise BadImageError(f'{err}{SKIP_HINT}') from None
      log.warning('skip_bad_images: %s', err)
      self._skip_report.record(str(index), where, str(err))
      return {
        'index': index,
        'image': None,
        'label': 0,
        'size': (1, 1),
        'boxes': np.zeros((0, 4), np.int64),
        'mask': None,
        'where': where,
      }
    w, h = image.size
    return {
      'index': index,
      'image': image,
      'label': int(record['label']),
      'size': (w, h),
      'boxes': tfds_boxes(record, w, h),
      'mask': None,
      'where': where,
    }
