"""Reader for wsolevaluation metadata (``<metadata_root>/<dataset>/<split>/*.txt``).

Files (one record per line, comma separated, as in clovaai/wsolevaluation):
  image_ids.txt        ``path``                      (``image_ids_proxy.txt`` with ``proxy=True``)
  class_labels.txt     ``path,label``
  image_sizes.txt      ``path,w,h``                  (absent for OpenImages: masks need no sizes)
  localization.txt     ``path,x0,y0,x1,y1``, one line per box (CUB, ILSVRC, CARS, SYNTH), or
                       ``path,mask_path,ignore_path`` (OpenImages; the ignore path only on the
                       first line of an image)
  localization_mask.txt  the OpenImages mask format, for sets that have boxes *and* masks (SYNTH).

Every malformed line raises :class:`MetadataError` naming ``file:line``. The reader is strict
on purpose: a silently dropped image changes the evaluation denominators.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

# Class counts of the known datasets; labels outside [0, K) are rejected.
NUM_CLASSES = {'CUB': 200, 'ILSVRC': 1000, 'CARS': 196, 'OpenImages': 100}
# Datasets whose localization.txt holds masks instead of boxes.
MASK_DATASETS = ('OpenImages',)


class MetadataError(ValueError):
  """A metadata file is missing, malformed, or inconsistent (message names file:line)."""


@dataclasses.dataclass
class Metadata:
  """Parsed metadata of one dataset split.

  Attributes:
    image_ids: image paths relative to the data root, in ``image_ids.txt`` order.
    labels: image id -> class index (int).
    sizes: image id -> (width, height) of the original image; empty when the split has no
      ``image_sizes.txt``.
    boxes: image id -> int64 array ``[N, 4]`` of (x0, y0, x1, y1) in original pixels; empty
      when the split has no box localization.
    masks: image id -> (list of instance mask paths, ignore mask path or None), paths relative
      to the mask root; empty when the split has no masks.
    where: image id -> ``'<abs path of image_ids.txt>:<line>'`` for error messages.
    dataset_name, split, root: what was loaded, and the split's metadata directory.
  """

  image_ids: list[str]
  labels: dict[str, int]
  sizes: dict[str, tuple[int, int]]
  boxes: dict[str, np.ndarray]
  masks: dict[str, tuple[list[str], str | None]]
  where: dict[str, str] = dataclasses.field(default_factory=dict)
  dataset_name: str = ''
  split: str = ''
  root: str = ''

  def __len__(self) -> int:
    return len(self.image_ids)

  @property
  def max_boxes(self) -> int:
    """Largest number of boxes of one image (0 without box localization)."""
    return max((len(b) for b in self.boxes.values()), default=0)


def check_relative_path(path: str, where: str) -> str:
  """Refuses ids that could resolve outside the data root (absolute, ``..``, ``~``, empty)."""
  if not path or path != path.strip():
    raise MetadataError(f'{where}: empty path or path with surrounding spaces: {path!r}')
  parts = path.replace('\\', '/').split('/')
  if os.path.isabs(path) or path.startswith(('/', '\\', '~')) or ':' in parts[0] or '..' in parts:
    raise MetadataError(
      f'{where}: path {path!r} resolves outside the data root; ids must be '
      'relative paths without ".." components'
    )
  return path


def safe_join(root: str, path: str, where: str) -> str:
  """``root/path``, refusing paths that escape ``root`` (also through symlinked folders)."""
  check_relative_path(path, where)
  full = os.path.join(root, path)
  real_root = os.path.realpath(root)
  real = os.path.realpath(full)
  if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
    raise MetadataError(f'{where}: path {path!r} resolves outside the data root {root!r}')
  return full


def _read_lines(path: str):
  """Yields (line_number, fields) for non-blank lines of a comma separated file."""
  try:
    with open(path, encoding='utf-8') as f:
      for num, line in enumerate(f, start=1):
        line = line.rstrip('\r\n')
        if line.strip():
          yield num, line.split(',')
  except UnicodeDecodeError as e:
    raise MetadataError(f'{path}: not UTF-8 text ({e})') from None


def _ints(fields, path, num, what):
  try:
    return [int(x) for x in fields]
  except ValueError:
    raise MetadataError(f'{path}:{num}: expected integer {what}, got {fields}') from None


def _expect(fields, n, path, num, fmt):
  if len(fields) != n:
    raise MetadataError(
      f'{path}:{num}: expected {n} fields ({fmt}), got {len(fields)}: {",".join(fields)!r}'
    )


def load_metadata(
  metadata_root: str,
  dataset_name: str,
  split: str,
  *,
  num_classes: int | None = None,
  proxy: bool = False,
  require_labels: bool = True,
) -> Metadata:
  """Loads ``metadata_root/dataset_name/split``.

  Args:
    metadata_root: folder holding one sub-folder per dataset.
    dataset_name: e.g. ``'CUB'``, ``'ILSVRC'``, ``'CARS'``, ``'OpenImages'``, ``'SYNTH'``.
    split: ``'train'``, ``'val'`` or ``'test'``.
    num_classes: labels must lie in ``[0, num_classes)``; default from :data:`NUM_CLASSES`
      (unknown datasets: labels only need to be >= 0).
    proxy: read ``image_ids_proxy.txt`` (wsolevaluation's proxy train subset) instead.
    require_labels: every id must have a label (always true for this project's loaders).

  Returns:
    :class:`Metadata`. Raises :class:`MetadataError` (a ``ValueError``) on bad input.
  """
  root = os.path.join(metadata_root, dataset_name, split)
  if not os.path.isdir(root):
    avail = (
      sorted(os.listdir(os.path.join(metadata_root, dataset_name)))
      if os.path.isdir(os.path.join(metadata_root, dataset_name))
      else []
    )
    raise MetadataError(
      f'no metadata folder {root!r} (dataset {dataset_name!r}, split '
      f'{split!r}); splits available there: {avail}'
    )
  if num_classes is None:
    num_classes = NUM_CLASSES.get(dataset_name)

  ids_file = os.path.join(root, 'image_ids_proxy.txt' if proxy else 'image_ids.txt')
  if not os.path.isfile(ids_file):
    raise MetadataError(f'missing {ids_file}')
  image_ids, where = [], {}
  for num, fields in _read_lines(ids_file):
    _expect(fields, 1, ids_file, num, 'path')
    image_id = check_relative_path(fields[0], f'{ids_file}:{num}')
    if image_id in where:
      raise MetadataError(
        f'{ids_file}:{num}: duplicate image id {image_id!r} (first at {where[image_id]})'
      )
    where[image_id] = f'{os.path.abspath(ids_file)}:{num}'
    image_ids.append(image_id)
  if not image_ids:
    raise MetadataError(f'{ids_file}: no image ids')

  labels = {}
  labels_file = os.path.join(root, 'class_labels.txt')
  if os.path.isfile(labels_file):
    for num, fields in _read_lines(labels_file):
      _expect(fields, 2, labels_file, num, 'path,label')
      (label,) = _ints(fields[1:], labels_file, num, 'label')
      if label < 0 or (num_classes is not None and label >= num_classes):
        raise MetadataError(
          f'{labels_file}:{num}: label {label} out of range '
          f'[0, {num_classes if num_classes is not None else "inf"})'
        )
      labels[fields[0]] = label
  if require_labels:
    for image_id in image_ids:
      if image_id not in labels:
        raise MetadataError(
          f'{where[image_id]}: image id {image_id!r} has no label in {labels_file}'
        )

  sizes = {}
  sizes_file = os.path.join(root, 'image_sizes.txt')
  if os.path.isfile(sizes_file):
    for num, fields in _read_lines(sizes_file):
      _expect(fields, 3, sizes_file, num, 'path,w,h')
      w, h = _ints(fields[1:], sizes_file, num, 'width,height')
      if w <= 0 or h <= 0:
        raise MetadataError(f'{sizes_file}:{num}: non-positive size {w}x{h}')
      sizes[fields[0]] = (w, h)
    for image_id in image_ids:
      if image_id not in sizes:
        raise MetadataError(f'{where[image_id]}: image id {image_id!r} has no size in {sizes_file}')

  boxes, masks = {}, {}
  loc_file = os.path.join(root, 'localization.txt')
  if os.path.isfile(loc_file):
    if dataset_name in MASK_DATASETS:
      masks = _read_masks(loc_file)
    else:
      boxes = _read_boxes(loc_file, sizes, sizes_file, where, image_ids)
  mask_file = os.path.join(root, 'localization_mask.txt')
  if os.path.isfile(mask_file):
    masks = _read_masks(mask_file)
  if masks:
    for image_id in image_ids:
      if image_id not in masks:
        raise MetadataError(f'{where[image_id]}: image id {image_id!r} has no mask line')
      if masks[image_id][1] is None:
        raise MetadataError(
          f'{where[image_id]}: image id {image_id!r} has no ignore path on its first mask line'
        )
  return Metadata(
    image_ids=image_ids,
    labels={i: labels[i] for i in image_ids if i in labels},
    sizes=sizes,
    boxes=boxes,
    masks=masks,
    where=where,
    dataset_name=dataset_name,
    split=split,
    root=root,
  )


def _read_boxes(path, sizes, sizes_file, where, image_ids):
  """``path,x0,y0,x1,y1`` lines -> {id: int64 [N, 4]}; every image must have a box."""
  if not sizes:
    raise MetadataError(f'{path}: boxes need {sizes_file} to rescale them, which is missing')
  lists: dict[str, list] = {}
  for num, fields in _read_lines(path):
    _expect(fields, 5, path, num, 'path,x0,y0,x1,y1')
    x0, y0, x1, y1 = _ints(fields[1:], path, num, 'box coordinates')
    if x1 < x0 or y1 < y0 or x0 < 0 or y0 < 0:
      raise MetadataError(
        f'{path}:{num}: invalid box (x0,y0,x1,y1)=({x0},{y0},{x1},{y1}); '
        'need 0 <= x0 <= x1 and 0 <= y0 <= y1'
      )
    lists.setdefault(fields[0], []).append((x0, y0, x1, y1))
  for image_id in image_ids:
    if image_id not in lists:
      raise MetadataError(f'{where[image_id]}: image id {image_id!r} has no box in {path}')
  return {k: np.asarray(v, dtype=np.int64).reshape(-1, 4) for k, v in lists.items()}


def _read_masks(path):
  """``path,mask_path,ignore_path`` lines -> {id: ([mask paths], ignore path or None)}."""
  masks: dict[str, tuple[list[str], str | None]] = {}
  for num, fields in _read_lines(path):
    _expect(fields, 3, path, num, 'path,mask_path,ignore_path')
    image_id, mask_path, ignore_path = fields
    check_relative_path(mask_path, f'{path}:{num}')
    if image_id in masks:
      if ignore_path:
        raise MetadataError(
          f'{path}:{num}: ignore path given on a non-first line of '
          f'{image_id!r} (the format has it on the first line only)'
        )
      masks[image_id][0].append(mask_path)
    else:
      if ignore_path:
        check_relative_path(ignore_path, f'{path}:{num}')
      masks[image_id] = ([mask_path], ignore_path or None)
  return masks
