"""Damaged checkpoints: fallback to the newest readable step, corruption reported as such.

Tiny states (a few arrays, a grain iterator over a range) saved with the project's own
`checkpoints.save`; each test truncates one file the way a full disk or a cut copy does.
"""

import glob
import logging
import os

import grain.python as grain
import numpy as np
import pytest

from dualsig_jax.train import checkpoints

RECORD = {'stage': 'vanilla', 'arch': 'resnet_tiny', 'family': 'cam', 'num_classes': 10}


def _state(step: int) -> dict:
  # Random values: constant arrays compress to a few bytes stored inline in Orbax's index,
  # and truncating the array files would then damage nothing.
  rng = np.random.default_rng(step)
  return {
    'step': np.asarray(step, np.int32),
    'params': {'fc': {'kernel': rng.normal(size=(64, 32)).astype(np.float32)}},
    'batch_stats': {'bn': {'mean': np.full((2,), step, np.float32)}},
  }


def _data_iter():
  loader = grain.DataLoader(
    data_source=grain.RangeDataSource(0, 64, 1),
    sampler=grain.IndexSampler(
      64, shard_options=grain.NoSharding(), shuffle=True, num_epochs=None, seed=0
    ),
    worker_count=0,
  )
  return iter(loader)


@pytest.fixture
def ckpt(tmp_path):
  """Steps 4 and 8 (state filled with the step number, data iterator 4 / 8 records in)."""
  path = str(tmp_path / 'checkpoints')
  mgr = checkpoints.manager(path, max_to_keep=2)
  it = _data_iter()
  for step in (4, 8):
    for _ in range(4):
      next(it)
    checkpoints.save(mgr, step, _state(step), it, RECORD)
  return path


def _truncate(path: str) -> None:
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _biggest_array_file(step_dir: str) -> str:
  files = glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd', '*'))
  return max(files, key=os.path.getsize)


# (file to truncate, relative to the step folder; what the error must name)
DAMAGE = [
  ('state/_METADATA', 'state/_METADATA'),
  ('state/manifest.ocdbt', 'state/manifest.ocdbt'),
  ('meta/metadata', 'meta/metadata'),
  ('ARRAYS', 'state/'),
]


def _damage(step_dir: str, rel: str) -> None:
  _truncate(_biggest_array_file(step_dir) if rel == 'ARRAYS' else os.path.join(step_dir, rel))


@pytest.mark.parametrize('rel,named', DAMAGE)
def test_restore_variables_falls_back_past_a_damaged_step(ckpt, rel, named, caplog):
  _damage(os.path.join(ckpt, '8'), rel)
  with caplog.at_level(logging.WARNING, logger='dualsig_jax'):
    variables, info = checkpoints.restore_variables(ckpt)
  # Step 4's arrays and record.
  np.testing.assert_array_equal(
    variables['params']['fc']['kernel'], _state(4)['params']['fc']['kernel']
  )
  np.testing.assert_array_equal(variables['batch_stats']['bn']['mean'], np.full((2,), 4.0))
  assert info == {**RECORD, 'step': 4}
  warning = ' '.join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert os.path.join(ckpt, '8') in warning and named in warning and 'damaged' in warning


@pytest.mark.parametrize('rel,named', DAMAGE)
def test_restore_into_a_target_reports_damage_not_another_model(ckpt, rel, named):
  """The resume path (a target state and the data iterator) on a damaged step: a
  CheckpointCorruptError naming the step folder and file, not a model-mismatch ValueError."""
  _damage(os.path.join(ckpt, '8'), rel)
  mgr = checkpoints.manager(ckpt, max_to_keep=2)
  with pytest.raises(checkpoints.CheckpointCorruptError) as e:
    checkpoints.restore(mgr, 8, _state(0), _data_iter(), expected=RECORD)
  assert e.value.step_dir == os.path.join(ckpt, '8') and e.value.file.startswith(named)
  assert 'another experiment' not in str(e.value) and "experiment's model" not in str(e.value)
  assert len(str(e.value).splitlines()) == 1


def test_damaged_grain_state_is_damage_and_restore_newest_falls_back(ckpt, caplog):
  step8 = os.path.join(ckpt, '8')
  _truncate(os.path.join(step8, 'data', 'process_0-of-1.json'))
  mgr = checkpoints.manager(ckpt, max_to_keep=2)
  it = _data_iter()
  with caplog.at_level(logging.WARNING, logger='dualsig_jax'):
    step, state, skipped = checkpoints.restore_newest(
      mgr, lambda s: checkpoints.restore(mgr, s, _state(0), it, expected=RECORD)[0]
    )
  assert (step, skipped) == (4, [step8])
  assert int(state['step']) == 4
  assert 'data/process_0-of-1.json' in caplog.text and step8 in caplog.text
  # The iterator continues where step 4 left it: the 5th record of the fresh order.
  fresh = _data_iter()
  expected = [next(fresh) for _ in range(5)][-1]
  assert next(it) == expected
  # Set aside, step 8 can be written again (Orbax refuses to overwrite an existing step).
  checkpoints.set_aside(mgr, skipped)
  assert mgr.all_steps() == [4]
  checkpoints.save(mgr, 8, _state(8), it, RECORD)
  assert mgr.all_steps() == [4, 8]
  assert glob.glob(step8 + '.unreadable-*')


def test_no_readable_step_is_an_error_listing_each(ckpt):
  _truncate(os.path.join(ckpt, '8', 'state', '_METADATA'))
  _truncate(os.path.join(ckpt, '4', 'state', 'manifest.ocdbt'))
  with pytest.raises(checkpoints.CheckpointCorruptError, match='no readable checkpoint') as e:
    checkpoints.restore_variables(ckpt)
  msg = str(e.value)
  assert 'state/_METADATA' in msg and 'state/manifest.ocdbt' in msg
  assert os.path.join(ckpt, '8') in msg and os.path.join(ckpt, '4') in msg


def test_a_real_mismatch_is_still_reported_as_another_model(ckpt):
  mgr = checkpoints.manager(ckpt, max_to_keep=2)
  other = dict(RECORD, arch='vgg_tiny')
  with pytest.raises(ValueError, match='another experiment'):
    checkpoints.restore(mgr, 8, _state(0), expected=other)
  # Same record, other arrays (a model changed without its record saying so).
  target = _state(0)
  target['params']['fc2'] = {'kernel': np.zeros((64, 32), np.float32)}
  with pytest.raises(ValueError, match="does not match this experiment's model") as e:
    checkpoints.restore(mgr, 8, target, expected=RECORD)
  assert not isinstance(e.value, checkpoints.CheckpointCorruptError)
  # Same names, other shapes.
  target = _state(0)
  target['params']['fc']['kernel'] = np.zeros((64, 5), np.float32)
  with pytest.raises(ValueError, match="does not match this experiment's model"):
    checkpoints.restore(mgr, 8, target, expected=RECORD)


def _scribble(path: str) -> None:
  """256 random bytes over the middle of a file, its size unchanged (silent corruption)."""
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.seek(max(0, size // 2 - 128))
    f.write(np.random.default_rng(0).integers(0, 256, min(256, size), np.uint8).tobytes())
  assert os.path.getsize(path) == size


def test_silent_corruption_is_damage_falls_back_and_is_set_aside(ckpt, caplog):
  step8 = os.path.join(ckpt, '8')
  victim = _biggest_array_file(step8)
  _scribble(victim)
  mgr = checkpoints.manager(ckpt, max_to_keep=2)
  with caplog.at_level(logging.WARNING, logger='dualsig_jax'):
    step, state, skipped = checkpoints.restore_newest(
      mgr, lambda s: checkpoints.restore(mgr, s, _state(0), _data_iter(), expected=RECORD)[0]
    )
  assert (step, skipped) == (4, [step8])
  np.testing.assert_array_equal(
    state['params']['fc']['kernel'], _state(4)['params']['fc']['kernel']
  )
  assert os.path.relpath(victim, step8) in caplog.text and 'checksum' in caplog.text
  checkpoints.set_aside(mgr, skipped)
  assert mgr.all_steps() == [4] and glob.glob(step8 + '.unreadable-*')
  # The weights reader (dual stage start, evaluation) falls back the same way.
  _scribble(os.path.join(ckpt, '4', 'meta', 'metadata'))
  with pytest.raises(checkpoints.CheckpointCorruptError, match='meta/metadata'):
    checkpoints.restore_variables(ckpt)


def test_a_step_without_a_manifest_is_read_as_before(ckpt):
  """Checkpoints written before the manifest existed (the pre-change fixture too) still load."""
  os.remove(os.path.join(ckpt, '8', checkpoints.MANIFEST))
  variables, info = checkpoints.restore_variables(ckpt)
  assert info['step'] == 8
  np.testing.assert_array_equal(variables['batch_stats']['bn']['mean'], np.full((2,), 8.0))
