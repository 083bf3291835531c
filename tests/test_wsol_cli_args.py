"""The WSOL CLI's arguments (issue 23, one line instead of a traceback): an unwritable
``--output_json`` is refused before anything is computed, a value the evaluator would clamp or
ignore (``--loc_threshold 2``, ``--num_workers -3``) is refused, and a write that fails after
the evaluation keeps the result on stdout. Each is one line and exit status 2."""

import errno
import json
import os

import numpy as np
import pytest

from dualsig_jax.wsol import BoxEvaluator, cli


@pytest.fixture()
def toy(tmp_path):
  """Two 16x16 maps with one box each (dataset TOY, split test)."""
  meta = tmp_path / 'meta' / 'TOY' / 'test'
  meta.mkdir(parents=True)
  (tmp_path / 'maps').mkdir()
  ids = ['a.jpg', 'b.jpg']
  for k, iid in enumerate(ids):
    m = np.zeros((16, 16), np.float32)
    m[2 + k : 9 + k, 3:12] = 1.0
    np.save(tmp_path / 'maps' / f'{iid}.npy', m)
  (meta / 'image_ids.txt').write_text('\n'.join(ids) + '\n')
  (meta / 'image_sizes.txt').write_text(''.join(f'{i},16,16\n' for i in ids))
  (meta / 'localization.txt').write_text(''.join(f'{i},3,2,11,9\n' for i in ids))
  (meta / 'class_labels.txt').write_text(''.join(f'{i},0\n' for i in ids))
  args = ['--scoremap_root', str(tmp_path / 'maps'), '--metadata_root', str(tmp_path / 'meta')]
  args += ['--dataset_name', 'TOY', '--split', 'test', '--no_progress', '--num_workers', '0']
  args += ['--cam_curve_interval', '0.05']
  return tmp_path, args


def _one_line_error(capsys, argv) -> str:
  try:
    rc = cli.main(argv)
  except SystemExit as e:  # argparse's own errors
    rc = e.code
  assert rc == 2
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  return lines[0]


def test_unwritable_output_json_is_refused_before_computing(toy, capsys, monkeypatch):
  root, args = toy
  a_file = root / 'a_file'
  a_file.write_text('x')
  (root / 'a_folder').mkdir()
  computed = []
  real = cli.evaluate_wsol
  monkeypatch.setattr(cli, 'evaluate_wsol', lambda *a, **k: computed.append(1) or real(*a, **k))
  for target, why in [
    (a_file / 'out.json', 'is a file, not a folder'),
    (a_file / 'sub' / 'out.json', 'is a file, not a folder'),
    (root / 'a_folder', 'is a folder'),
    ('/proc/dualsig_out.json', 'cannot write'),  # a read-only mount, even for root
  ]:
    line = _one_line_error(capsys, args + ['--output_json', str(target)])
    assert '--output_json' in line and why in line, line
  assert computed == []  # refused before the evaluation
  assert a_file.read_text() == 'x'


def test_output_json_written_whole_or_result_kept_on_stdout(toy, capsys, monkeypatch):
  root, args = toy
  out = root / 'new' / 'out.json'
  assert cli.main(args + ['--output_json', str(out)]) == 0
  assert json.loads(out.read_text())['num_images'] == 2
  assert not [p for p in os.listdir(out.parent) if p != 'out.json']  # no scratch files left
  capsys.readouterr()

  def full(path, text):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(cli, '_write_atomically', full)
  assert cli.main(args + ['--output_json', str(out)]) == 2
  captured = capsys.readouterr()
  assert json.loads(captured.out)['num_images'] == 2  # the result is not lost
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and 'No space left' in lines[0], captured.err


@pytest.mark.parametrize(
  'flag, value, words',
  [
    ('--loc_threshold', '2', 'loc_threshold must be'),
    ('--loc_threshold', '-0.1', 'loc_threshold must be'),
    ('--loc_threshold', 'nan', 'loc_threshold must be'),
    ('--loc_threshold', 'inf', 'loc_threshold must be'),
    ('--num_workers', '-3', 'num_workers must be'),
    ('--cam_curve_interval', '0', 'cam_curve_interval must be'),
    ('--cam_curve_interval', 'nan', 'cam_curve_interval must be'),
    ('--iou_threshold_list', '150', 'iou_threshold_list must'),
    ('--iou_threshold_list', '30.5', 'invalid int value'),
    ('--mask_root', '/nonexistent', '--mask_root /nonexistent is not a folder'),
    ('--num_workers', '1.5', 'invalid int value'),
  ],
)
def test_out_of_range_options_are_one_line(toy, capsys, flag, value, words):
  _, args = toy
  line = _one_line_error(capsys, args + [flag, value])
  assert words in line, line


@pytest.mark.parametrize(
  'kwargs',
  [
    dict(loc_threshold=2),
    dict(loc_threshold=float('nan')),
    dict(loc_threshold=True),
    dict(num_workers=-3),
    dict(num_workers=2.5),
    dict(num_workers=True),
    dict(iou_threshold_list=[30.5]),
    dict(iou_threshold_list=[True]),
  ],
)
def test_box_evaluator_refuses_what_it_would_clamp_or_truncate(kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    BoxEvaluator(**kwargs)


def test_box_evaluator_accepts_the_edges():
  assert BoxEvaluator(loc_threshold=1.0, num_workers=0).loc_threshold == 1.0
  assert BoxEvaluator(loc_threshold=0, num_workers=np.int64(2), iou_threshold_list=[50.0])


def test_a_missing_scoremap_root_is_named_up_front(toy, capsys):
  root, args = toy
  args = [a if a != str(root / 'maps') else str(root / 'nowhere') for a in args]
  line = _one_line_error(capsys, args)
  assert f'--scoremap_root {root / "nowhere"} is not a folder' in line, line
