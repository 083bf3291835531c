"""Resuming a workdir: the saved config guards it, metrics.jsonl holds every step once, and a
damaged newest checkpoint falls back to the previous kept step."""

import glob
import json
import logging
import os

import pytest
import smoke_helpers
from smoke_helpers import checkpoint_steps, loss_steps, smoke_config

from dualsig_jax import experiment
from dualsig_jax.train import loop, resume

smoke_data = smoke_helpers.smoke_data


def _workdir_with_checkpoint(tmp_path, config):
  """A workdir as a run leaves it: config.json and a (fake) complete checkpoint step."""
  workdir = tmp_path / 'run'
  resume.check_and_write_config(config, str(workdir))
  os.makedirs(workdir / 'vanilla' / 'checkpoints' / '4')
  return str(workdir)


def _saved(workdir):
  with open(os.path.join(workdir, 'config.json')) as f:
    return json.load(f)


def test_resume_with_changed_batch_size_and_lr_is_refused(tmp_path):
  config = smoke_config(tmp_path / 'data')
  workdir = _workdir_with_checkpoint(tmp_path, config)
  before = _saved(workdir)
  changed = smoke_config(tmp_path / 'data', **{'input.batch_size': 64, 'vanilla.lr': 0.1})
  changed.eval.batch_size = 16  # safe: not named among the refused changes
  # Through experiment.run: refused before any data is generated or any step runs.
  with pytest.raises(resume.ConfigChangedError) as e:
    experiment.run(changed, workdir, evaluate=False)
  msg = str(e.value)
  assert 'input.batch_size: 32 -> 64' in msg and 'vanilla.lr: 0.05 -> 0.1' in msg
  assert 'eval.batch_size: ' not in msg
  assert 'may change on resume' in msg and 'checkpoint.every_steps' in msg and 'eval.*' in msg
  assert _saved(workdir) == before, 'config.json was overwritten'
  assert not (tmp_path / 'data').exists()


def test_safe_changes_are_accepted_and_the_old_config_is_kept(tmp_path):
  config = smoke_config(tmp_path / 'data')
  workdir = _workdir_with_checkpoint(tmp_path, config)
  same = resume.check_and_write_config(config, workdir)
  assert same == [] and glob.glob(os.path.join(workdir, 'config.*.json')) == []
  safe = smoke_config(
    tmp_path / 'data',
    **{'eval.batch_size': 16, 'checkpoint.every_steps': 8, 'vanilla.max_steps': 40},
  )
  changed = resume.check_and_write_config(safe, workdir)
  assert changed == ['checkpoint.every_steps', 'eval.batch_size', 'vanilla.max_steps']
  assert _saved(workdir)['eval']['batch_size'] == 16
  (old,) = glob.glob(os.path.join(workdir, 'config.*.json'))
  with open(old) as f:
    assert json.load(f)['eval']['batch_size'] == config.eval.batch_size


def test_without_checkpoint_the_config_is_simply_written(tmp_path):
  workdir = str(tmp_path / 'run')
  resume.check_and_write_config(smoke_config(tmp_path / 'data'), workdir)
  other = smoke_config(tmp_path / 'data', **{'input.batch_size': 64})
  resume.check_and_write_config(other, workdir)  # no checkpoint: nothing to protect
  assert _saved(workdir)['input']['batch_size'] == 64


def test_truncate_metrics_drops_later_records_of_the_stage_only(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  recs = [dict(stage='vanilla', step=s, loss=1.0) for s in (2, 4, 6, 8)]
  recs += [dict(stage='dual', step=s, loss=1.0) for s in (2, 4)]
  lines = [json.dumps(r) for r in recs] + ['{"stage": "vanilla", "st']  # cut by a kill
  path.write_text('\n'.join(lines))
  assert resume.truncate_metrics(str(path), 'vanilla', 4) == 3
  left = [json.loads(x) for x in path.read_text().splitlines()]
  assert [(r['stage'], r['step']) for r in left] == [
    ('vanilla', 2),
    ('vanilla', 4),
    ('dual', 2),
    ('dual', 4),
  ]
  assert resume.truncate_metrics(str(path), 'vanilla', 4) == 0


def test_damaged_newest_checkpoint_resumes_from_previous_and_logs_each_step_once(
  smoke_data, tmp_path, caplog
):
  """Steps 4 and 8 kept, step 8's tree metadata truncated (a full disk): the next run warns
  naming it, sets it aside, resumes from step 4 and writes steps 6 and 8 again, once."""
  workdir = str(tmp_path)
  c = smoke_config(smoke_data, **{'vanilla.max_steps': 8, 'checkpoint.every_steps': 4})
  loop.train_stage(c, workdir, 'vanilla')
  assert checkpoint_steps(workdir) == [4, 8]
  step8 = os.path.join(workdir, 'vanilla', 'checkpoints', '8')
  with open(os.path.join(step8, 'state', '_METADATA'), 'r+b') as f:
    f.truncate(100)
  c = smoke_config(smoke_data, **{'vanilla.max_steps': 12, 'checkpoint.every_steps': 4})
  with caplog.at_level(logging.WARNING, logger='dualsig_jax'):
    out = loop.train_stage(c, workdir, 'vanilla')
  assert out['step'] == 12
  warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert any(step8 in m and 'state/_METADATA' in m and 'damaged' in m for m in warned), warned
  assert checkpoint_steps(workdir) == [8, 12]
  assert glob.glob(step8 + '.unreadable-*')
  starts = [r for r in smoke_helpers.metrics(workdir) if r.get('event') == 'start']
  assert [r['origin'] for r in starts][-1] == 'resumed from step 4'
  assert loss_steps(workdir) == [2, 4, 6, 8, 10, 12]


def _workdir_with_real_checkpoint(tmp_path, config, *, record=True):
  """config.json and one real (tiny) checkpoint step whose record holds the run's config, as
  the loop writes it (stage.model_record)."""
  import numpy as np

  from dualsig_jax.train import checkpoints
  from dualsig_jax.train import stage as stage_lib

  workdir = str(tmp_path / 'run')
  resume.check_and_write_config(config, workdir)
  mgr = checkpoints.manager(stage_lib.checkpoint_dir(workdir, 'vanilla'), max_to_keep=2)
  meta = stage_lib.model_record(config, 'vanilla')
  if not record:
    meta.pop('config')
  checkpoints.save(mgr, 4, {'w': np.ones(3, np.float32)}, None, meta)
  return workdir


@pytest.mark.parametrize('damage', ['deleted', 'truncated', 'not an object'])
def test_a_lost_config_json_still_guards_the_resume(tmp_path, damage):
  """config.json deleted or cut: the checkpoint's copy of the config refuses a changed field
  (and, with the same config, the resume goes on and config.json is written again)."""
  config = smoke_config(tmp_path / 'data')
  workdir = _workdir_with_real_checkpoint(tmp_path, config)
  path = os.path.join(workdir, 'config.json')
  if damage == 'deleted':
    os.remove(path)
  elif damage == 'truncated':
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  else:
    with open(path, 'w') as f:
      f.write('[1, 2]')
  changed = smoke_config(tmp_path / 'data', **{'vanilla.lr': 0.1})
  with pytest.raises(resume.ConfigChangedError, match='vanilla.lr: 0.05 -> 0.1'):
    resume.check_and_write_config(changed, workdir)
  assert resume.check_and_write_config(config, workdir) == []
  assert _saved(workdir)['vanilla']['lr'] == 0.05


def test_without_config_json_nor_a_recorded_config_the_resume_is_refused(tmp_path):
  config = smoke_config(tmp_path / 'data')
  workdir = _workdir_with_real_checkpoint(tmp_path, config, record=False)
  os.remove(os.path.join(workdir, 'config.json'))
  with pytest.raises(
    resume.ConfigChangedError, match='config.json cannot be checked: it is missing'
  ):
    resume.check_and_write_config(config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'config.json'))


def test_changed_fields_are_logged_once(tmp_path, caplog):
  """train.py checks before JAX starts (write=False), then the run checks and writes: one line."""
  config = smoke_config(tmp_path / 'data')
  workdir = _workdir_with_checkpoint(tmp_path, config)
  safe = smoke_config(tmp_path / 'data', **{'eval.batch_size': 16})
  with caplog.at_level(logging.INFO, logger='dualsig_jax'):
    resume.check_and_write_config(safe, workdir, write=False)
    resume.check_and_write_config(safe, workdir)
  lines = [r for r in caplog.records if 'changed fields' in r.getMessage()]
  assert len(lines) == 1 and 'eval.batch_size: 32 -> 16' in lines[0].getMessage()
