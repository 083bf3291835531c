"""WSOL CLI (the evaluate_wsol drop-in) end to end, its input errors, and the plots."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from wsol_reference import (
  RefBoxEvaluator,
  assert_same,
  gt_boxes_near,
  realistic_set,
  ref_image_ious,
  ref_pxap,
)

from dualsig_jax.wsol import BoxEvaluator, MaskEvaluator
from dualsig_jax.wsol.cli import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# CLI end to end.
# --------------------------------------------------------------------------------------------
def _write(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


@pytest.fixture()
def box_dataset(tmp_path):
  maps, _, _ = realistic_set()
  rng = np.random.default_rng(3)
  meta = tmp_path / 'meta' / 'TOY' / 'test'
  ids, sizes, locs, gts = [], [], [], []
  for i, m in enumerate(maps[:20]):
    iid = f'cls{i % 3}/img_{i}.jpg'
    w, h = int(rng.integers(100, 500)), int(rng.integers(100, 500))
    ids.append(iid)
    sizes.append(f'{iid},{w},{h}')
    boxes = gt_boxes_near(rng, m)
    orig = []
    for b in boxes:  # to original pixels; the CLI maps back with int(x * 224 / w)
      o = [int(b[0] * w / 224), int(b[1] * h / 224), int(b[2] * w / 224), int(b[3] * h / 224)]
      orig.append(o)
      locs.append(f'{iid},{o[0]},{o[1]},{o[2]},{o[3]}')
    gts.append(
      np.array(
        [
          [int(x * 224.0 / w), int(y * 224.0 / h), int(x1 * 224.0 / w), int(y1 * 224.0 / h)]
          for x, y, x1, y1 in orig
        ]
      )
    )
    os.makedirs(tmp_path / 'maps' / os.path.dirname(iid), exist_ok=True)
    np.save(tmp_path / 'maps' / (iid + '.npy'), m)
  _write(str(meta / 'image_ids.txt'), ids)
  _write(str(meta / 'image_sizes.txt'), sizes)
  _write(str(meta / 'localization.txt'), locs)
  _write(str(meta / 'class_labels.txt'), [f'{i},0' for i in ids])
  return tmp_path, ids, maps[:20], gts


def test_cli_boxes_end_to_end(box_dataset):
  root, ids, maps, gts = box_dataset
  out = root / 'out.json'
  rc = cli_main(
    [
      '--scoremap_root',
      str(root / 'maps'),
      '--metadata_root',
      str(root / 'meta'),
      '--dataset_name',
      'TOY',
      '--split',
      'test',
      '--cam_curve_interval',
      '0.01',
      '--output_json',
      str(out),
      '--no_progress',
      '--num_workers',
      '2',
      '--pool',
      'process',
    ]
  )
  assert rc == 0
  got = json.loads(out.read_text())
  ref = RefBoxEvaluator((30, 50, 70), 0.01, True)
  for m, g in zip(maps, gts):
    ref.accumulate(ref_image_ious(m, g, ref.thr), True)
  want = ref.compute()
  assert got['num_images'] == 20
  for k in ('maxboxacc', 'maxboxacc_v2', 'maxboxacc_v1', 'gt_known_loc'):
    assert_same(got[k], want[k], k)


def test_cli_subprocess_largest_contour(box_dataset):
  root, _, maps, gts = box_dataset
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'dualsig_jax.wsol',
      '--scoremap_root',
      str(root / 'maps'),
      '--metadata_root',
      str(root / 'meta'),
      '--dataset_name',
      'TOY',
      '--split',
      'test',
      '--cam_curve_interval',
      '0.01',
      '--multi_contour_eval',
      'false',
      '--iou_threshold_list',
      '50',
      '--num_workers',
      '0',
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  got = json.loads(proc.stdout)
  ref = RefBoxEvaluator((50,), 0.01, False)
  for m, g in zip(maps, gts):
    ref.accumulate(ref_image_ious(m, g, ref.thr), True)
  assert_same(got['maxboxacc'], ref.compute()['maxboxacc'])


@pytest.mark.parametrize(
  'bad', ['missing', '3d', '1d', 'scalar', 'nan', 'range', 'empty', 'no_rows', 'no_cols', 'npz']
)
def test_cli_bad_map_names_the_file(box_dataset, bad, capsys):
  """Every unusable map is an error naming its file (empty ones used to fail deep in the
  evaluator with numpy's 'zero-size array' message and no file name)."""
  root, ids, _, _ = box_dataset
  f = root / 'maps' / (ids[4] + '.npy')
  if bad == 'missing':
    os.remove(f)
  elif bad == 'npz':  # an np.savez archive under the .npy name (np.load gives an NpzFile)
    m = np.load(f)
    with open(f, 'wb') as fh:
      np.savez(fh, cam=m)
  else:
    m = np.load(f)
    m = {
      '3d': m[None],
      '1d': m[0],
      'scalar': m[0, 0],
      'nan': np.where(m > 0.5, np.nan, m),
      'range': m * 1.5,
      'empty': np.zeros((0, 0), np.float32),
      'no_rows': np.zeros((0, 224), np.float32),
      'no_cols': np.zeros((224, 0), np.float32),
    }[bad]
    np.save(f, m)
  rc = cli_main(
    [
      '--scoremap_root',
      str(root / 'maps'),
      '--metadata_root',
      str(root / 'meta'),
      '--dataset_name',
      'TOY',
      '--split',
      'test',
      '--cam_curve_interval',
      '0.01',
      '--no_progress',
      '--num_workers',
      '0',
    ]
  )
  assert rc == 2
  err = capsys.readouterr().err
  assert str(f) in err and len(err.strip().splitlines()) == 1, err
  if bad == 'npz':
    assert 'np.savez' in err


def test_cli_masks_end_to_end(tmp_path):
  maps = realistic_set()[0][:10]
  rng = np.random.default_rng(11)
  meta = tmp_path / 'meta' / 'OpenImages' / 'test'
  ids, locs, gt_masks = [], [], []
  for i, m in enumerate(maps):
    iid = f'test/c/{i}.jpg'
    ids.append(iid)
    h, w = int(rng.integers(150, 400)), int(rng.integers(150, 400))
    big = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    inst = [(big > 0.6).astype(np.uint8) * 255, (big < 0.05).astype(np.uint8) * 255]
    ign = np.zeros((h, w), np.uint8)
    ign[: h // 3, : w // 3] = 255
    paths = [f'test/c/{i}_m{k}.png' for k in range(2)]
    for p, im in zip(paths, inst):
      os.makedirs(tmp_path / 'masks' / os.path.dirname(p), exist_ok=True)
      cv2.imwrite(str(tmp_path / 'masks' / p), im)
    cv2.imwrite(str(tmp_path / 'masks' / f'test/c/{i}_ignore.png'), ign)
    locs.append(f'{iid},{paths[0]},test/c/{i}_ignore.png')
    locs.append(f'{iid},{paths[1]},')
    os.makedirs(tmp_path / 'maps' / 'test' / 'c', exist_ok=True)
    np.save(tmp_path / 'maps' / (iid + '.npy'), m)
    # Expected GT exactly as the reference's get_mask (nearest resize to 224, > 0.5).
    rs = lambda a: cv2.resize(np.float32(a), (224, 224), interpolation=cv2.INTER_NEAREST) > 0.5  # noqa: E731
    all_inst = rs(inst[0]) | rs(inst[1])
    ignore = rs(ign) & ~all_inst
    gt_masks.append(all_inst.astype(np.uint8) + 255 * ignore.astype(np.uint8))
  _write(str(meta / 'image_ids.txt'), ids)
  _write(str(meta / 'class_labels.txt'), [f'{i},0' for i in ids])
  _write(str(meta / 'localization.txt'), locs)
  out = tmp_path / 'o.json'
  rc = cli_main(
    [
      '--scoremap_root',
      str(tmp_path / 'maps'),
      '--metadata_root',
      str(tmp_path / 'meta'),
      '--dataset_name',
      'OpenImages',
      '--split',
      'test',
      '--mask_root',
      str(tmp_path / 'masks'),
      '--output_json',
      str(out),
      '--no_progress',
    ]
  )
  assert rc == 0
  got = json.loads(out.read_text())
  assert got['num_images'] == 10 and 'maxboxacc' not in got
  assert abs(got['pxap'] - ref_pxap(maps, gt_masks, 0.001)) <= 1e-9


def test_cli_masks_without_mask_root_says_what_it_is(tmp_path, capsys):
  """A split with masks (SYNTH has boxes and masks) and no --mask_root: one line saying what
  the flag is for."""
  meta = tmp_path / 'meta' / 'SYNTH' / 'test'
  _write(str(meta / 'image_ids.txt'), ['test/0.jpg'])
  _write(str(meta / 'class_labels.txt'), ['test/0.jpg,0'])
  _write(str(meta / 'image_sizes.txt'), ['test/0.jpg,64,64'])
  _write(str(meta / 'localization.txt'), ['test/0.jpg,1,1,30,30'])
  _write(str(meta / 'localization_mask.txt'), ['test/0.jpg,masks/test/0.png,masks/test/0_i.png'])
  args = ['--scoremap_root', str(tmp_path), '--metadata_root', str(tmp_path / 'meta')]
  rc = cli_main(args + ['--dataset_name', 'SYNTH', '--split', 'test', '--no_progress'])
  assert rc == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and '--mask_root' in err and 'relative to' in err, err


def test_plots(tmp_path):
  from dualsig_jax.wsol.plots import plot_box_curves, plot_pr_curves

  maps, gts, correct = realistic_set()
  res = {}
  for head in ('softmax', 'sigmoid'):
    ev = BoxEvaluator(cam_curve_interval=0.05, num_workers=0)
    ev.accumulate(np.stack(maps[:6]), gts[:6], correct[:6])
    res[head] = ev.compute()
  p = plot_box_curves(res, str(tmp_path / 'box.png'))
  assert os.path.getsize(p) > 1000
  assert os.path.getsize(plot_box_curves(res, str(tmp_path / 't.png'), curve='top1')) > 1000
  mev = MaskEvaluator(0.01)
  mev.accumulate(np.stack(maps[:4]), (np.stack(maps[:4]) > 0.5).astype(np.uint8))
  assert os.path.getsize(plot_pr_curves({'a': mev.compute()}, str(tmp_path / 'pr.png'))) > 1000
  with pytest.raises(ValueError, match='valid'):
    plot_box_curves(res, str(tmp_path / 'x.png'), curve='nope')
