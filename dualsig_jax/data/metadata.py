"""Reader for wsolevaluation metadata (``<metadata_root>/<dataset>/<split>/*.txt``).

Files (one record per line, comma separated, as in clovaai/wsolevaluation):
  image_ids.txt        ``path``                      (``image_ids_proxy.txt`` with ``proxy=True``)
  class_labels.txt     ``path,label``
  image_sizes.txt      ``path,w,h``                  (absent for OpenImages: masks need no sizes)
  localization.txt     ``path,x0,y0,x1,y1``, one line per box (CUB, ILSVRC, CARS, SYNTH), or
                       ``path,mask_path,ignore_path`` (OpenImages; the ignore path only on the
                       first line of an image)
  localization_mask.txt  the OpenImages mask format, for sets that have boxes *and* masks (SYNTH).

Every malformed line raises :class:`MetadataError` naming ``file:line``, and so do
conflicting duplicates (an id given two labels or two sizes: both lines are named) and boxes
outside their image. The reader is strict on purpose: a silently dropped image changes the
evaluation denominators.

The metadata shipped with the package (the top-level ``metadata/`` folder of the repository,
installed as the package data ``dualsig_jax/metadata``) is found by
:func:`resolve_metadata_root`, whatever the working directory.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from dualsig_jax.data.paths import (  # noqa: F401  (re-exported: part of this module's API)
  SHIPPED_NAMES,
  resolve_metadata_root,
  shipped_metadata_root,
)

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
    label_where: image id -> ``'<abs path of class_labels.txt>:<line>'`` of its label.
    declared_num_classes: class count declared by the source when labels are not listed up
      front (TFDS: the label feature's ``num_classes``), else None.
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
  label_where: dict[str, str] = dataclasses.field(default_factory=dict)
  declared_num_classes: int | None = None

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
  """``root/path`` for a metadata path (refused if absolute or with ``..``, see
  :func:`check_relative_path`).

  Symlinks under ``root`` are followed on purpose: a data root assembled from links (images on
  another disk, a shared dataset folder) is a common layout, and every link there was placed by
  the user. Only the metadata text, which may come from elsewhere, is distrusted.
  """
  check_relative_path(path, where)
  return os.path.join(root, path)


def check_labels(metadata: Metadata, num_classes: int) -> None:
  """Refuses a split whose labels do not fit a model with ``num_classes`` outputs.

  A label >= num_classes has no model output and turns the training loss NaN within the first
  steps, so this runs before training (the loaders call it when given ``num_classes``).

  Args:
    metadata: a split's metadata (folder source: its labels; TFDS: its declared class count).
    num_classes: the model's class count (``config.model.num_classes``).

  Raises:
    MetadataError naming ``class_labels.txt:line`` of the first label (in file order) outside
    ``[0, num_classes)`` and the largest label; for TFDS, the dataset's class count.
  """
  if int(num_classes) < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  fix = 'set --config.model.num_classes={} (or more) or fix the labels'
  bad = [i for i, label in metadata.labels.items() if label >= num_classes]
  if bad:

    def line(i):
      where = metadata.label_where.get(i, '')
      return int(where.rsplit(':', 1)[1]) if ':' in where else 0

    first = min(bad, key=line)
    largest = max(metadata.labels.values())
    where = metadata.label_where.get(first, f'{metadata.dataset_name}[{metadata.split}]')
    raise MetadataError(
      f'{where}: label {metadata.labels[first]} of {first!r} does not fit '
      f'model.num_classes={num_classes} (labels must lie in [0, {num_classes}); largest label '
      f'{largest} in this split, {len(bad)} labels too large): ' + fix.format(largest + 1)
    )
  declared = metadata.declared_num_classes
  if declared is not None and declared > num_classes:
    raise MetadataError(
      f'tfds {metadata.dataset_name}[{metadata.split}] has {declared} classes (its label '
      f'feature) but model.num_classes={num_classes}: ' + fix.format(declared)
    )


def _read_lines(path: str):
  """Yields (line_number, fields) for non-blank lines of a comma separated file.

  A byte-order mark at the start of the file (UTF-8 as some editors save it) is dropped; one
  anywhere else would become an invisible part of an id, so it is refused at file:line."""
  try:
    with open(path, encoding='utf-8-sig') as f:
      for num, line in enumerate(f, start=1):
        line = line.rstrip('\r\n')
        if '\ufeff' in line:
          raise MetadataError(
            f'{path}:{num}: a byte-order mark (U+FEFF, invisible in most editors) inside the '
            'text, e.g. from files pasted together; remove it'
          )
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
  root = _split_root(metadata_root, dataset_name, split)
  if num_classes is None:
    num_classes = NUM_CLASSES.get(dataset_name)
  image_ids, where = _read_ids(
    os.path.join(root, 'image_ids_proxy.txt' if proxy else 'image_ids.txt')
  )
  labels_file = os.path.join(root, 'class_labels.txt')
  labels, label_where = _read_labels(labels_file, num_classes)
  if require_labels:
    _each_has(image_ids, labels, where, f'label in {labels_file}')
  sizes_file = os.path.join(root, 'image_sizes.txt')
  sizes = _read_sizes(sizes_file)
  if os.path.isfile(sizes_file):
    _each_has(image_ids, sizes, where, f'size in {sizes_file}')
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
    _check_masks(masks, image_ids, where)
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
    label_where={i: label_where[i] for i in image_ids if i in label_where},
  )


def _split_root(metadata_root, dataset_name, split):
  """The split's metadata folder; an error listing the dataset's splits when it is missing."""
  root = os.path.join(metadata_root, dataset_name, split)
  if not os.path.isdir(root):
    parent = os.path.join(metadata_root, dataset_name)
    avail = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
    raise MetadataError(
      f'no metadata folder {root!r} (dataset {dataset_name!r}, split '
      f'{split!r}); splits available there: {avail}'
    )
  return root


def _read_ids(ids_file):
  """``image_ids.txt`` -> (ids in file order, {id: 'abs path:line'}); duplicates refused."""
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
  return image_ids, where


def _read_labels(labels_file, num_classes):
  """``class_labels.txt`` -> ({id: label}, {id: 'abs path:line'}); ({}, {}) without the file."""
  labels, label_where = {}, {}
  if not os.path.isfile(labels_file):
    return labels, label_where
  abs_labels = os.path.abspath(labels_file)
  for num, fields in _read_lines(labels_file):
    _expect(fields, 2, labels_file, num, 'path,label')
    (label,) = _ints(fields[1:], labels_file, num, 'label')
    if label < 0 or (num_classes is not None and label >= num_classes):
      raise MetadataError(
        f'{labels_file}:{num}: label {label} out of range '
        f'[0, {num_classes if num_classes is not None else "inf"}); fix the label in that file '
        '(labels are class indices from 0)'
      )
    _no_conflict(labels, label_where, fields[0], label, f'{abs_labels}:{num}', 'label')
    labels[fields[0]], label_where[fields[0]] = label, f'{abs_labels}:{num}'
  return labels, label_where


def _read_sizes(sizes_file):
  """``image_sizes.txt`` -> {id: (w, h)}; {} without the file."""
  sizes, size_where = {}, {}
  if not os.path.isfile(sizes_file):
    return sizes
  abs_sizes = os.path.abspath(sizes_file)
  for num, fields in _read_lines(sizes_file):
    _expect(fields, 3, sizes_file, num, 'path,w,h')
    w, h = _ints(fields[1:], sizes_file, num, 'width,height')
    if w <= 0 or h <= 0:
      raise MetadataError(f'{sizes_file}:{num}: non-positive size {w}x{h}')
    _no_conflict(sizes, size_where, fields[0], (w, h), f'{abs_sizes}:{num}', 'size')
    sizes[fields[0]], size_where[fields[0]] = (w, h), f'{abs_sizes}:{num}'
  return sizes


def _each_has(image_ids, values, where, what):
  """Refuses the first id (in image_ids.txt order) missing from ``values``."""
  for image_id in image_ids:
    if image_id not in values:
      raise MetadataError(f'{where[image_id]}: image id {image_id!r} has no {what}')


def _check_masks(masks, image_ids, where):
  """Every id has a mask line, and an ignore path on its first one."""
  for image_id in image_ids:
    if image_id not in masks:
      raise MetadataError(f'{where[image_id]}: image id {image_id!r} has no mask line')
    if masks[image_id][1] is None:
      raise MetadataError(
        f'{where[image_id]}: image id {image_id!r} has no ignore path on its first mask line'
      )


def _no_conflict(values, value_where, image_id, value, here, what):
  """Refuses a second, different ``what`` for ``image_id`` (an identical repeat is harmless)."""
  if image_id in values and values[image_id] != value:
    raise MetadataError(
      f'{here}: conflicting {what} for image id {image_id!r}: {value} here, '
      f'{values[image_id]} at {value_where[image_id]}'
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
    if fields[0] in sizes:
      w, h = sizes[fields[0]]
      # wsolevaluation boxes are (x, y, x + width, y + height): x1 == image width is inside.
      if x1 > w or y1 > h:
        raise MetadataError(
          f'{path}:{num}: box (x0,y0,x1,y1)=({x0},{y0},{x1},{y1}) lies outside the image '
          f'{fields[0]!r} of size {w}x{h} ({sizes_file}); need x1 <= width and y1 <= height'
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
