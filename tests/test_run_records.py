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
  return smoke_config(data_root, **{'vanilla.max_steps': 4, 'dual.max_steps': 2, **overrides})


@pytest.fixture(scope='module')
def finished(smoke_data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('records'))
  config = _short(smoke_data)
  out = experiment.run(config, workdir)
  return config, workdir, out


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
  from dualsig_jax import convert_io
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
