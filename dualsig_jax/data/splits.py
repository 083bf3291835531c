"""From ``config.input`` to one split's random-access source and :class:`Metadata`.

Config fields read (``config.input``): source ('folder'|'tfds'), dataset_name, data_root,
metadata_root (see :func:`split_dir`), train_split, eval_split, synthetic.{generate, ...},
tfds.{name, data_dir, train_split, eval_split}; optional mask_root (default: data_root).

Folder layout: images at ``data_root/<image id>``; for CARS, whose train and test ids overlap
(``00001.jpg`` is in both), at ``data_root/cars_<split>/<image id>`` when that folder exists, as
the reference reads them (a flat root that would mix two splits is refused).
"""

from __future__ import annotations

import logging
import os

from dualsig_jax import vocab
from dualsig_jax.data import paths
from dualsig_jax.data.metadata import NUM_CLASSES, Metadata, load_metadata
from dualsig_jax.data.sources import FolderSource, TfdsBoxes, TfdsSource

log = logging.getLogger(__name__)

SOURCES = vocab.SOURCES


def get(cfg, key, default=None):
  """cfg.key for a ConfigDict or dict, ``default`` when absent or empty."""
  try:
    value = cfg[key]
  except (KeyError, AttributeError, TypeError):
    return default
  return default if value is None or value == '' else value


def source_kind(input_cfg) -> str:
  """``input.source``, checked ('folder' when absent)."""
  source = get(input_cfg, 'source', 'folder')
  if source not in SOURCES:
    raise ValueError(f'unknown input.source {source!r}; valid: {list(SOURCES)}')
  return source


def split_dir(input_cfg, split: str) -> str:
  """``<metadata root>/<dataset>/<split>`` of a folder-source split.

  ``input.metadata_root`` '' or 'metadata': the metadata shipped with the package (SYNTH, never
  shipped: ``data_root/metadata``). Any other value: that folder, relative to the working
  directory, which must exist; a split it lacks is read from the shipped copy (e.g. ILSVRC: a
  made train split next to the shipped test split). See ``paths.split_metadata_dir``.
  """
  root = get(input_cfg, 'metadata_root', '')
  if not (input_cfg['dataset_name'] == 'SYNTH' and root in paths.SHIPPED_NAMES):
    paths.resolve_metadata_root(root)  # A clear error for a missing folder or installation.
  return paths.split_metadata_dir(input_cfg, split)


def num_classes_of(input_cfg) -> int | None:
  """Class count the metadata labels are checked against (dataset's, or SYNTH's setting)."""
  if input_cfg['dataset_name'] == 'SYNTH':
    return get(get(input_cfg, 'synthetic', {}), 'num_classes')
  return NUM_CLASSES.get(input_cfg['dataset_name'])


def prepare_synthetic(input_cfg) -> None:
  """SYNTH folder source: generates the set when ``input.synthetic.generate`` is on, else
  requires an existing one. Never deletes anything (see ``synthetic.ensure_synthetic``)."""
  if input_cfg['dataset_name'] != 'SYNTH' or source_kind(input_cfg) != 'folder':
    return
  from dualsig_jax.data import synthetic  # pylint: disable=import-outside-toplevel

  if get(get(input_cfg, 'synthetic', {}), 'generate', False):
    synthetic.ensure_synthetic(input_cfg)
    return
  root = input_cfg['data_root']
  meta = synthetic.synth_metadata_root(root, get(input_cfg, 'metadata_root', ''))
  if not os.path.isdir(os.path.join(meta, 'SYNTH')):
    raise FileNotFoundError(
      f'no SYNTH benchmark at input.data_root={root!r} (missing {os.path.join(meta, "SYNTH")}) '
      'and input.synthetic.generate is False. Generate it with '
      '--config.input.synthetic.generate=True, or once with '
      f'`python -m dualsig_jax.data.synthetic --out {root}`.'
    )


def load_split(input_cfg, split: str) -> Metadata:
  """Metadata of a folder-source split (labels checked against the dataset's class count)."""
  root = os.path.dirname(os.path.dirname(split_dir(input_cfg, split)))
  return load_metadata(
    root, input_cfg['dataset_name'], split, num_classes=num_classes_of(input_cfg)
  )


def _read_ids(input_cfg, split):
  path = os.path.join(paths.split_metadata_dir(input_cfg, split), 'image_ids.txt')
  if not os.path.isfile(path):
    return set()
  with open(path, encoding='utf-8-sig') as f:
    return {line.strip() for line in f if line.strip()}


def image_root(input_cfg, split: str, ids=None) -> str:
  """Folder the image ids of ``split`` are relative to (``data_root``, or CARS's
  ``data_root/cars_<split>``).

  Raises:
    ValueError for a flat CARS root when another split shares image ids with ``split``.
  """
  root = input_cfg['data_root']
  if input_cfg['dataset_name'] != 'CARS':
    return root
  own = os.path.join(root, f'cars_{split}')
  if os.path.isdir(own):
    return own
  ids = set(ids) if ids is not None else _read_ids(input_cfg, split)
  # The other splits this run reads (a split missing from the user's folder comes from the
  # shipped copy, see split_dir, so its ids count too).
  for other in sorted(
    {get(input_cfg, 'train_split'), get(input_cfg, 'eval_split')} - {split, None}
  ):
    common = ids & _read_ids(input_cfg, other)
    if common:
      raise ValueError(
        f'CARS splits {split!r} and {other!r} share {len(common)} image ids (e.g. '
        f'{min(common)!r}), so a flat input.data_root={root!r} would read the same file for '
        'both. Put the images of each split in its own folder, as the Stanford Cars archives '
        f'unpack and the reference reads them: {os.path.join(root, f"cars_{split}")}/<id> and '
        f'{os.path.join(root, f"cars_{other}")}/<id>.'
      )
  return root


def tfds_split(input_cfg, split: str, *, train: bool) -> str:
  """TFDS split name for one of our split names: ``input.train_split`` -> ``tfds.train_split``
  and ``input.eval_split`` -> ``tfds.eval_split`` (the train loader tries the train mapping
  first, eval loaders the eval one); any other name is used as given."""
  tcfg = get(input_cfg, 'tfds', {})
  order = ('train_split', 'eval_split') if train else ('eval_split', 'train_split')
  for key in order:
    if split == get(input_cfg, key):
      return get(tcfg, key, split)
  return split


def tfds_data_source(input_cfg, split: str):
  """-> (``tfds.data_source`` of the prepared split, dataset name)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  tcfg = get(input_cfg, 'tfds', {})
  name = get(tcfg, 'name')
  if not name:
    raise ValueError("input.source='tfds' needs input.tfds.name (e.g. 'caltech_birds2011')")
  # download=False: prepared data only (no downloads at run time, and it fails fast).
  return tfds.data_source(name, split=split, data_dir=get(tcfg, 'data_dir'), download=False), name


def _tfds_features(src):
  return getattr(getattr(src, 'dataset_info', None), 'features', None)


def _tfds_has_boxes(src) -> bool:
  """Whether records carry ``bbox`` or ``objects/bbox`` (features, else the first record)."""
  features = _tfds_features(src)
  if features is not None:
    try:
      return 'bbox' in features or ('objects' in features and 'bbox' in features['objects'])
    except (TypeError, KeyError):
      pass
  if not len(src):
    return False
  rec = src[0]
  return 'bbox' in rec or (isinstance(rec.get('objects'), dict) and 'bbox' in rec['objects'])


def _tfds_num_classes(src) -> int | None:
  features = _tfds_features(src)
  try:
    return int(features['label'].num_classes)
  except (TypeError, KeyError, AttributeError):
    return None


def build_source(input_cfg, split: str, *, train: bool, skip_report=None):
  """-> (grain random-access source, :class:`Metadata`) of ``split``.

  Args:
    split: our split name (``input.train_split``, ``input.eval_split`` or another metadata
      split); for TFDS mapped by :func:`tfds_split`.
    train: the train loader (TFDS: prefers ``tfds.train_split``; no box warning).
    skip_report: a ``sources.SkipReport`` for ``skip_bad_images`` (training only).
  """
  if source_kind(input_cfg) == 'tfds':
    tsplit = tfds_split(input_cfg, split, train=train)
    src, name = tfds_data_source(input_cfg, tsplit)
    source = TfdsSource(src, name, tsplit, skip_report=skip_report)
    ids = [f'{name}/{tsplit}/{i}' for i in range(len(source))]
    boxes = TfdsBoxes(source, ids) if _tfds_has_boxes(src) else {}
    if not boxes and not train:
      log.warning(
        "tfds %s[%s] has no 'bbox' feature: evaluation reports the classification accuracy "
        'and fidelity only; the box localization metrics (Top-1 Loc, GT-known Loc, MaxBoxAcc, '
        "MaxBoxAccV2) are skipped. For them use input.source='folder' with the shipped "
        'wsolevaluation metadata.',
        name,
        tsplit,
      )
    meta = Metadata(
      image_ids=ids,
      labels={},
      sizes={},
      boxes=boxes,
      masks={},
      dataset_name=name,
      split=tsplit,
      declared_num_classes=_tfds_num_classes(src),
    )
    return source, meta
  prepare_synthetic(input_cfg)
  meta = load_split(input_cfg, split)
  root = image_root(input_cfg, split, meta.image_ids)
  mask_root = get(input_cfg, 'mask_root') or input_cfg['data_root']
  return FolderSource(meta, root, mask_root=mask_root, skip_report=skip_report), meta


def split_length(input_cfg, split: str, *, train: bool = True) -> int:
  """Number of images of ``split`` (checks the layout as :func:`build_source`, reads less)."""
  if source_kind(input_cfg) == 'tfds':
    src, _ = tfds_data_source(input_cfg, tfds_split(input_cfg, split, train=train))
    return len(src)
  prepare_synthetic(input_cfg)
  meta = load_split(input_cfg, split)
  image_root(input_cfg, split, meta.image_ids)
  return len(meta)
