"""``python -m dualsig_jax.wsol``: a drop-in for wsolevaluation's ``evaluate_wsol``.

Reads ``<scoremap_root>/<image_id>.npy`` for every id of ``<metadata_root>/<NAME>/<SPLIT>``
(the layout ``eval.save_scoremaps=True`` writes). Box metrics (MaxBoxAcc(V2), GT-known Loc) when
the split has boxes: GT boxes are rescaled from ``image_sizes.txt`` to each map's size with the
reference's ``int(x * W / w)``. PxAP when the split has masks (OpenImages; SYNTH has boxes and
masks): ``--mask_root`` is the folder the mask paths of ``localization.txt`` /
``localization_mask.txt`` are relative to (SYNTH: its data root; OpenImages: the folder holding
``test/...`` or ``OpenImages/test/...``); GT masks are instances > 0.5 after a nearest resize,
the ignore region minus the instances = 255. Prints every metric the split has as one JSON
(box metrics and ``pxap`` together) and writes it to ``--output_json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import cv2
import numpy as np

from dualsig_jax.arguments import OneLineParser
from dualsig_jax.data.transforms import rescale_boxes
from dualsig_jax.wsol.box import POOLS, BoxEvaluator
from dualsig_jax.wsol.mask import MaskEvaluator

_BATCH = 64


def str2bool(v: str) -> bool:
  """'true'/'false' (and 1/0, yes/no) -> bool; anything else is an argparse error."""
  s = str(v).lower()
  if s in ('true', '1', 'yes', 'y', 't'):
    return True
  if s in ('false', '0', 'no', 'n', 'f'):
    return False
  raise argparse.ArgumentTypeError(f'expected true or false, got {v!r}')


def load_scoremap(path: str) -> np.ndarray:
  """Loads one ``.npy`` map; ``ValueError`` naming the file if missing, unreadable, not a plain
  array (an ``np.savez`` archive), not 2-D, empty, NaN, or outside [0, 1]."""
  if not os.path.isfile(path):
    raise ValueError(f'{path}: score map file is missing')
  try:
    m = np.load(path, allow_pickle=False)
  except Exception as e:  # noqa: BLE001 - any unreadable file is reported with its name
    raise ValueError(f'{path}: cannot read score map ({e})') from None
  if not isinstance(m, np.ndarray):  # np.load gives an NpzFile for an np.savez archive
    if hasattr(m, 'close'):
      m.close()
    raise ValueError(
      f'{path}: not a .npy array but a {type(m).__name__} (an np.savez archive?); '
      'save each map with np.save'
    )
  if m.ndim != 2:
    raise ValueError(f'{path}: score map must be 2-D; got shape {m.shape}')
  if m.size == 0:
    raise ValueError(f'{path}: score map is empty; got shape {m.shape}')
  if not np.issubdtype(m.dtype, np.floating):
    raise ValueError(f'{path}: score map must be floating point; got {m.dtype}')
  if np.isnan(m).any():
    raise ValueError(f'{path}: score map contains NaN')
  if (m < 0).any() or (m > 1).any():
    raise ValueError(f'{path}: score map must lie in [0, 1]; min={m.min()}, max={m.max()}')
  return m


def _mask_file(mask_root, dataset_name, path):
  for cand in (os.path.join(mask_root, path), os.path.join(mask_root, dataset_name, path)):
    if os.path.isfile(cand):
      return cand
  raise ValueError(
    f'mask file {path!r} not found under {mask_root!r} '
    f'(nor under {os.path.join(mask_root, dataset_name)!r})'
  )


def _read_mask(file, size):
  img = cv2.imread(file, cv2.IMREAD_GRAYSCALE)
  if img is None:
    raise ValueError(f'{file}: cannot read mask image')
  return cv2.resize(np.float32(img), size, interpolation=cv2.INTER_NEAREST) > 0.5


def load_gt_mask(mask_root, dataset_name, mask_paths, ignore_path, size):
  """GT mask as the reference's ``get_mask``: uint8 ``[H, W]`` 1 object, 0 background, 255 ignore.

  Args: size (w, h) of the score map.
  """
  inst = np.stack(
    [_read_mask(_mask_file(mask_root, dataset_name, p), size) for p in mask_paths]
  ).any(axis=0)
  ignore = np.zeros_like(inst)
  if ignore_path:
    ignore = _read_mask(_mask_file(mask_root, dataset_name, ignore_path), size) & ~inst
  return inst.astype(np.uint8) + 255 * ignore.astype(np.uint8)


_BOX_KEYS = (
  'maxboxacc',
  'maxboxacc_v2',
  'maxboxacc_v1',
  'gt_known_loc',
  'best_threshold',
  'loc_threshold',
  'multi_contour_eval',
)


def _evaluators(meta, mask_root, box_kwargs, cam_curve_interval):
  """(BoxEvaluator or None, MaskEvaluator or None) for what the split localizes."""
  where = f'{meta.dataset_name}/{meta.split}'
  box_eval = mask_eval = None
  if meta.boxes:
    if not meta.sizes:
      raise ValueError(f'{where}: boxes need image_sizes.txt to be rescaled')
    box_eval = BoxEvaluator(cam_curve_interval=cam_curve_interval, **box_kwargs)
  if meta.masks:
    if mask_root is None:
      raise ValueError(
        f'{where} has GT masks (PxAP): pass --mask_root, the folder its mask paths are '
        'relative to (SYNTH: its data root)'
      )
    mask_eval = MaskEvaluator(cam_curve_interval)
  if box_eval is None and mask_eval is None:
    raise ValueError(f'{where}: no localization.txt / localization_mask.txt')
  return box_eval, mask_eval


def _accumulate(pending, meta, box_eval, mask_eval, mask_root):
  """Adds ``pending`` [(map, image_id)], maps of one shape, to the evaluators."""
  maps = np.stack([m for m, _ in pending])
  h, w = maps.shape[1:]
  if box_eval is not None:
    boxes = [
      rescale_boxes(meta.boxes[i], meta.sizes[i], (w, h)).astype(np.int64) for _, i in pending
    ]
    box_eval.accumulate(maps, boxes)
  if mask_eval is not None:
    masks = np.stack(
      [load_gt_mask(mask_root, meta.dataset_name, *meta.masks[i], (w, h)) for _, i in pending]
    )
    mask_eval.accumulate(maps, masks)


def _map_batches(scoremap_root, meta, need_boxes, progress):
  """Yields lists of (map, image_id): at most _BATCH maps of one shape, in image_ids order."""
  from tqdm import tqdm

  pending = []
  desc = f'wsol {meta.dataset_name}/{meta.split}'
  for image_id in tqdm(meta.image_ids, desc=desc, disable=not progress, file=sys.stderr):
    m = load_scoremap(os.path.join(scoremap_root, image_id + '.npy'))
    if need_boxes and image_id not in meta.boxes:
      raise ValueError(f'{image_id}: no box in localization.txt')
    if pending and (m.shape != pending[0][0].shape or len(pending) >= _BATCH):
      yield pending
      pending = []
    pending.append((m, image_id))
  if pending:
    yield pending


def evaluate_wsol(
  scoremap_root,
  metadata_root,
  dataset_name,
  split,
  mask_root=None,
  cam_curve_interval=0.001,
  iou_threshold_list=(30, 50, 70),
  multi_contour_eval=True,
  loc_threshold=0.2,
  num_workers=None,
  progress=True,
  pool='thread',
) -> dict:
  """Evaluates saved maps (see the module docstring).

  Returns:
    the JSON-able dict: box metrics (``maxboxacc`` {iou: %}, ``maxboxacc_v2``, ``maxboxacc_v1``,
    ``gt_known_loc``, ``best_threshold``, ``loc_threshold``, ``multi_contour_eval``) when the
    split has boxes, ``pxap`` when it has masks, and ``num_images``.
  """
  from dualsig_jax.data.metadata import load_metadata  # the shared metadata reader

  meta = load_metadata(metadata_root, dataset_name, split, require_labels=False)
  box_kwargs = dict(
    iou_threshold_list=iou_threshold_list,
    multi_contour_eval=multi_contour_eval,
    loc_threshold=loc_threshold,
    num_workers=num_workers,
    pool=pool,
  )
  box_eval, mask_eval = _evaluators(meta, mask_root, box_kwargs, cam_curve_interval)
  for pending in _map_batches(scoremap_root, meta, box_eval is not None, progress):
    _accumulate(pending, meta, box_eval, mask_eval, mask_root)
  result = {}
  if box_eval is not None:
    r = box_eval.compute()
    result.update({k: r[k] for k in _BOX_KEYS})
  if mask_eval is not None:
    result['pxap'] = mask_eval.compute()['pxap']
  result['num_images'] = len(meta.image_ids)
  return result


def main(argv=None):
  p = OneLineParser(
    prog='python -m dualsig_jax.wsol',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument('--scoremap_root', required=True)
  p.add_argument('--metadata_root', required=True)
  p.add_argument('--dataset_name', required=True)
  p.add_argument('--split', required=True)
  p.add_argument(
    '--mask_root',
    default=None,
    help='folder the GT mask paths are relative to; needed when the split has masks (PxAP): '
    'OpenImages, and SYNTH (its data root)',
  )
  p.add_argument('--cam_curve_interval', type=float, default=0.001)
  p.add_argument('--iou_threshold_list', type=int, nargs='+', default=[30, 50, 70])
  p.add_argument('--multi_contour_eval', type=str2bool, nargs='?', const=True, default=True)
  p.add_argument('--loc_threshold', type=float, default=0.2)
  p.add_argument(
    '--num_workers',
    type=int,
    default=None,
    help='parallel workers for box evaluation (default: all cores; 0: in the main thread)',
  )
  p.add_argument(
    '--pool',
    choices=POOLS,
    default='thread',
    help='where the workers run: threads (default) or spawned processes',
  )
  p.add_argument('--output_json', default=None)
  p.add_argument('--no_progress', action='store_true')
  args = p.parse_args(argv)
  try:
    if args.output_json:  # before the (long) evaluation, not after it
      check_writable(args.output_json)
    for flag in ('scoremap_root', 'mask_root'):
      folder = getattr(args, flag)
      if folder is not None and not os.path.isdir(folder):
        raise ValueError(f'--{flag} {folder} is not a folder')
    result = evaluate_wsol(
      args.scoremap_root,
      args.metadata_root,
      args.dataset_name,
      args.split,
      args.mask_root,
      args.cam_curve_interval,
      args.iou_threshold_list,
      args.multi_contour_eval,
      args.loc_threshold,
      args.num_workers,
      not args.no_progress,
      args.pool,
    )
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  text = json.dumps(result, indent=2)
  print(text)  # the result is on stdout even if the file cannot be written
  if args.output_json:
    try:
      _write_atomically(args.output_json, text + '\n')
    except OSError as e:
      print(f'error: cannot write --output_json {args.output_json}: {e.strerror or e}; the '
            'result is printed above', file=sys.stderr)  # fmt: skip
      return 2
  return 0


def check_writable(path: str) -> None:
  """``ValueError`` (one line) unless a file can be written at ``path``: its folder is made if
  missing and a scratch file is created and removed there (permission bits alone do not say it
  for root, nor on a read-only mount)."""
  import tempfile

  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise ValueError(f'--output_json {path} is a folder; name a file')
  folder = os.path.dirname(path)
  while not os.path.isdir(folder):  # the nearest folder that exists must not be a file
    if os.path.exists(folder):
      raise ValueError(f'cannot write --output_json {path}: {folder} is a file, not a folder')
    folder = os.path.dirname(folder)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), prefix='.probe-'):
      pass
    if os.path.exists(path) and not os.access(path, os.W_OK):
      raise PermissionError(13, 'the file is read-only')
  except OSError as e:
    raise ValueError(
      f'cannot write --output_json {path}: {e.strerror or e}; name a writable path'
    ) from None


def _write_atomically(path: str, text: str) -> None:
  """A reader never sees half a file; an old file stays whole if this fails."""
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
