"""A run's records: evaluations with other settings never overwrite the run's own results, and a
finished run reuses saved results only when every setting that shapes them matches."""

import json
import logging
import os

import pytest
import smoke_helpers
from smoke_helpers import smoke_config

from dualsig_jax import evaluate, experiment

smoke_data = smoke_helpers.smoke_data


def _short(data_root, **overrides):
  """The smoke config cut to a few steps per stage (the records, not the accuracy, matter)."""
  short = {'vanilla.max_steps': 4, 'dual.max_steps': 2, 'checkpoint.every_steps': 2}
  return smoke_config(data_root, **{**short, **overrides})


@pytest.fixture(scope='module')
def finished(smoke_data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('records'))
  config = _short(smoke_data)
  out = experiment.run(config, workdir)
  return config, workdir, out


def _copy(finished, tmp_path):
  import shutil

  config, workdir, _ = finished
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  return config, copy


def _results_files(workdir):
  return sorted(p for p in os.listdir(workdir) if p.startswith('results') and p.endswith('.json'))


def test_other_settings_never_overwrite_the_runs_results(finished, smoke_data, capsys, caplog):
  """Day one: the main job, eval.py with another method, eval.py on another split, then the
  main job again: it prints the run's own CAM + Grad-CAM table on the test split (not the
  last evaluation's), and all three result sets are on disk."""
  config, workdir, first = finished
  own = json.load(open(os.path.join(workdir, 'results.json')))
  assert own['split'] == 'test' and list(own['methods']) == ['cam', 'gradcam']
  layercam = _short(smoke_data, **{'eval.methods': ('layercam',)})
  evaluate.evaluate(layercam, workdir)
  evaluate.evaluate(config, workdir, split='val')
  files = _results_files(workdir)
  assert len(files) == 3 and 'results.json' in files, files
  by_setting = {}
  for name in files:
    r = json.load(open(os.path.join(workdir, name)))
    by_setting[(r['split'], tuple(r['methods']))] = name
    assert os.path.isfile(os.path.join(workdir, name[:-5] + '.md'))
  assert set(by_setting) == {
    ('test', ('cam', 'gradcam')),
    ('test', ('layercam',)),
    ('val', ('cam', 'gradcam')),
  }
  assert by_setting[('test', ('cam', 'gradcam'))] == 'results.json'
  assert json.load(open(os.path.join(workdir, 'results.json'))) == own
  capsys.readouterr()
  with caplog.at_level(logging.INFO, logger='dualsig_jax'):
    out = experiment.run(config, workdir)
  printed = capsys.readouterr().out
  assert out['reused'], 'the unchanged run was evaluated again'
  assert out['results']['split'] == 'test' and list(out['results']['methods']) == ['cam', 'gradcam']
  assert '| cam | sigmoid (ours)' in printed and '| gradcam |' in printed
  assert 'layercam' not in printed and 'split "test"' in printed
  assert len(_results_files(workdir)) == 3


def test_reuse_compares_every_setting_that_shapes_results(finished, smoke_data, tmp_path):
  """A results.json written with another threshold, split or method is not the run's: the
  finished-run shortcut evaluates again (variants: a record that lost its settings, another
  evaluated dual step)."""
  import shutil

  config, workdir, _ = finished
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  assert experiment.saved_results(config, copy) is not None
  path = os.path.join(copy, 'results.json')
  saved = json.load(open(path))
  variants = {
    'threshold': {**saved, 'settings': {**saved['settings'], 'eval.loc_threshold': 0.5}},
    'split': {**saved, 'split': 'val', 'settings': {**saved['settings'], 'split': 'val'}},
    'methods': {**saved, 'settings': {**saved['settings'], 'eval.methods': ['layercam']}},
    'no settings': {k: v for k, v in saved.items() if k != 'settings'},
    'other step': {
      **saved,
      'checkpoints': {**saved['checkpoints'], 'dual': {**saved['checkpoints']['dual'], 'step': 1}},
    },
  }
  for name, record in variants.items():
    json.dump(record, open(path, 'w'))
    assert experiment.saved_results(config, copy) is None, name
  changed = _short(smoke_data, **{'eval.iou_threshold_list': (50,)})
  json.dump(saved, open(path, 'w'))
  assert experiment.saved_results(changed, copy) is None


def test_single_head_checkpoints_are_refused_for_evaluation(finished, tmp_path):
  """eval.py --checkpoint on a checkpoint whose fc2 was never trained is refused before any
  image is read: a vanilla stage folder, and converter outputs whose record says fc2: init or
  clone (variants: the vanilla folder named through evaluate(); the workdir's own dual folder
  still loads)."""
  from dualsig_jax import convert as convert_io
  from dualsig_jax.train import stage as stage_lib

  config, workdir, _ = finished
  vanilla = os.path.join(workdir, 'vanilla', 'checkpoints')
  with pytest.raises(ValueError, match='vanilla-stage checkpoint'):
    stage_lib.load_dual_checkpoint(config, vanilla)
  with pytest.raises(ValueError, match='vanilla-stage checkpoint'):
    evaluate.evaluate(config, str(tmp_path / 'eval'), checkpoint=vanilla)
  assert not (tmp_path / 'eval' / 'results.json').exists()
  variables, _ = stage_lib.load_dual_checkpoint(
    config, os.path.join(workdir, 'dual', 'checkpoints')
  )
  m = config.model
  for how in ('init', 'clone'):
    out = str(tmp_path / f'converted_{how}')
    convert_io.save_variables(
      variables,
      out,
      arch=m.arch,
      family=m.family,
      large_feature_map=m.large_feature_map,
      meta={'fc2': how},
    )
    with pytest.raises(ValueError, match=f'fc2: {how}'):
      stage_lib.load_dual_checkpoint(config, out)
  loaded = str(tmp_path / 'converted_loaded')
  convert_io.save_variables(
    variables,
    loaded,
    arch=m.arch,
    family=m.family,
    large_feature_map=m.large_feature_map,
    meta={'fc2': 'loaded'},
  )
  stage_lib.load_dual_checkpoint(config, loaded)


def test_a_step_of_this_version_without_its_manifest_is_damaged(finished, tmp_path, caplog):
  """checksums.json deleted from the newest step: the step is not read unverified (here one of
  its arrays is damaged too), the readers fall back to the previous step with a warning
  (variants: the vanilla and the dual folder, the manifest emptied instead of deleted, the only
  step of a folder: no readable checkpoint, one line naming the manifest)."""
  import glob

  from dualsig_jax.train import checkpoints

  config, wd = _copy(finished, tmp_path)
  vanilla = os.path.join(wd, 'vanilla', 'checkpoints')
  assert smoke_helpers.checkpoint_steps(wd) == [2, 4]
  os.remove(os.path.join(vanilla, '4', checkpoints.MANIFEST))
  data = max(
    glob.glob(os.path.join(vanilla, '4', 'state', '**', 'd', '*'), recursive=True),
    key=os.path.getsize,
  )
  with open(data, 'r+b') as f:  # same size, other bytes: no parser notices
    f.seek(os.path.getsize(data) // 2)
    f.write(b'\x7f\x7f\x7f\x7f')
  with caplog.at_level(logging.WARNING, logger='dualsig_jax'):
    _, info = checkpoints.restore_variables(vanilla)
  assert info['step'] == 2
  assert 'checksum manifest is missing' in caplog.text
  dual = os.path.join(wd, 'dual', 'checkpoints')
  steps = smoke_helpers.checkpoint_steps(wd, 'dual')
  open(os.path.join(dual, str(steps[-1]), checkpoints.MANIFEST), 'w').close()  # emptied
  if len(steps) > 1:
    assert checkpoints.restore_variables(dual)[1]['step'] == steps[-2]
  for step in steps[:-1]:
    os.remove(os.path.join(dual, str(step), checkpoints.MANIFEST))
  with pytest.raises(checkpoints.CheckpointCorruptError, match='checksums.json'):
    evaluate.evaluate(config, wd)


@pytest.mark.parametrize('how', ['deleted', 'garbled', 'deleted, vanilla changed'])
def test_a_lost_dual_source_record(finished, tmp_path, how):
  """dual/source.json lost: its checkpoints' own record of their origin takes over (a changed
  vanilla checkpoint still makes the dual stage stale), and with neither record the dual stage
  is stale, as eval.py warns."""
  from dualsig_jax.train import checkpoints
  from dualsig_jax.train import stage as stage_lib

  config, wd = _copy(finished, tmp_path)
  record = os.path.join(wd, 'dual', stage_lib.SOURCE_FILE)
  assert stage_lib.dual_source_change(config, wd) is None
  if how == 'garbled':
    open(record, 'w').write('{"pa')
  else:
    os.remove(record)
  if how.endswith('changed'):
    manifest = os.path.join(wd, 'vanilla', 'checkpoints', '4', checkpoints.MANIFEST)
    rec = json.load(open(manifest))
    rec['sha256']['other'] = '0' * 64  # another vanilla step 4 (its manifest digest differs)
    json.dump(rec, open(manifest, 'w'))
    assert 'now holds other weights' in stage_lib.dual_source_change(config, wd)
    return
  assert stage_lib.dual_source_change(config, wd) is None  # recovered from the dual steps
  for step in smoke_helpers.checkpoint_steps(wd, 'dual'):
    meta = os.path.join(wd, 'dual', 'checkpoints', str(step), 'meta', 'metadata')
    rec = json.load(open(meta))
    del rec['source']
    json.dump(rec, open(meta, 'w'))
  reason = stage_lib.dual_source_change(config, wd)
  assert reason is not None and 'cannot be established' in reason
  assert stage_lib.stage_progress(config, wd)['dual']['source_change'] == reason


@pytest.mark.parametrize(
  'field,value', [('vanilla.max_steps', 2), ('dual.max_steps', 1), ('vanilla.num_epochs', 1)]
)
def test_fewer_steps_on_a_finished_run_are_refused(finished, tmp_path, field, value):
  """Fewer steps or epochs than the checkpoints hold: refused before anything is written, so
  config.json never says 1 epoch while the checkpoints hold more (variants: either stage,
  max_steps or num_epochs, the latter on a workdir whose vanilla stage is at step 16)."""
  config, wd = _copy(finished, tmp_path)
  overrides = {field: value}
  if field.endswith('num_epochs'):
    overrides['vanilla.max_steps'] = 0
    os.rename(
      os.path.join(wd, 'vanilla', 'checkpoints', '4'),
      os.path.join(wd, 'vanilla', 'checkpoints', '16'),
    )
  before = open(os.path.join(wd, 'config.json')).read()
  shorter = _short(config.input.data_root, **overrides)
  with pytest.raises(experiment.resume.ConfigChangedError, match='never cut back') as e:
    experiment.run(shorter, wd)
  assert field.split('.')[0] in str(e.value) and '--config.' in str(e.value)
  assert open(os.path.join(wd, 'config.json')).read() == before


def test_a_finished_run_says_so_first_and_restores_nothing(finished, tmp_path, monkeypatch, caplog):
  """Rerunning a finished workdir: no stage is restored and no loader built (the saved results
  are shown at once); variants: --skip_eval, and a damaged newest step, which goes through the
  loop (set aside and trained again) rather than the shortcut."""
  from dualsig_jax.train import checkpoints, loop

  config, wd = _copy(finished, tmp_path)
  calls = []
  real = loop.train_stage
  monkeypatch.setattr(loop, 'train_stage', lambda c, w, s: calls.append(s) or real(c, w, s))
  with caplog.at_level(logging.INFO, logger='dualsig_jax'):
    out = experiment.run(config, wd)
  assert out['reused'] and calls == []
  assert out['stages']['vanilla']['step'] == 4 and out['stages']['dual']['step'] == 2
  assert 'is finished' in caplog.text and 'resumed from' not in caplog.text
  out = experiment.run(config, wd, evaluate=False)
  assert calls == [] and out['results'] is None
  manifest = os.path.join(wd, 'vanilla', 'checkpoints', '4', checkpoints.MANIFEST)
  rec = json.load(open(manifest))
  name = sorted(rec['sha256'])[0]
  rec['sha256'][name] = '0' * 64
  json.dump(rec, open(manifest, 'w'))
  experiment.run(config, wd, evaluate=False)
  assert calls == ['vanilla', 'dual']


def test_a_resume_on_another_device_count_says_so(finished, tmp_path, caplog):
  """A step saved on 8 devices resumed on this machine's count: the log says the device count
  changed (variant: the same count says nothing)."""
  import jax

  from dualsig_jax.train import checkpoints

  config, wd = _copy(finished, tmp_path)
  step = os.path.join(wd, 'vanilla', 'checkpoints', '4')
  meta_path = os.path.join(step, 'meta', 'metadata')
  meta = json.load(open(meta_path))
  assert meta['devices'] == jax.device_count()
  longer = _short(config.input.data_root, **{'vanilla.max_steps': 6})
  longer.unlock()
  longer.stages = ('vanilla',)
  meta['devices'] = 8 if jax.device_count() != 8 else 2
  json.dump(meta, open(meta_path, 'w'))
  checkpoints.write_manifest(step)  # an intact step written elsewhere
  with caplog.at_level(logging.WARNING, logger='dualsig_jax'):
    experiment.run(longer, wd, evaluate=False)
  assert f'step 4 was saved on {meta["devices"]} devices' in caplog.text
  assert f'this run has {jax.device_count()} devices' in caplog.text
