"""runs.load_run opens what a user has after training: a train.py workdir, one stage's
checkpoint folder, a converter output; with eval.py --checkpoint's checks, and a model that
cam.explain can differentiate down to any layer. One tiny smoke run (2 + 2 steps, 64 px) serves
every test."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke_helpers

from dualsig_jax import cam, convert, runs
from dualsig_jax.train import checkpoints, stage

smoke_data = smoke_helpers.smoke_data


def _config(data_root, **overrides):
  c = smoke_helpers.smoke_config(
    data_root,
    **{
      'input.resize_size': 72,
      'input.crop_size': 64,
      'input.eval_size': 64,
      'vanilla.max_steps': 2,
      'dual.max_steps': 2,
      **overrides,
    },
  )
  return c


@pytest.fixture(scope='module')
def run(smoke_data, tmp_path_factory):
  from dualsig_jax import experiment

  workdir = str(tmp_path_factory.mktemp('load_run') / 'run')
  experiment.run(_config(smoke_data), workdir, evaluate=False)
  return workdir


def _same(a, b):
  fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (p, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_workdir_opens_the_newest_dual_step_and_explains(run):
  model, variables = runs.load_run(run)
  want, info = checkpoints.restore_variables(stage.checkpoint_dir(run, 'dual'))
  assert info['step'] == 2
  _same(variables, want)
  assert model.arch == 'resnet_tiny'
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  out = model.apply(variables, images, train=False)
  assert out['sigmoid_logits'].shape == (2, 10)
  # The sigmoid head's Grad-CAM at a backbone layer: non-zero only because the model returned
  # lets gradients through the backbone (the training model stops them upstream of fc2).
  maps, targets = cam.explain(
    model,
    variables,
    images,
    target_layer='layer3',
    methods=('gradcam',),
    logits_fn='sigmoid_logits',
    train=False,
  )
  assert maps['gradcam'].shape == (2, 64, 64) and targets.shape == (2,)
  assert float(jnp.max(maps['gradcam'])) > 0.5


def test_checkpoint_folder_and_converter_output_open_the_same_weights(run, tmp_path):
  _, from_workdir = runs.load_run(run)
  _, from_folder = runs.load_run(stage.checkpoint_dir(run, 'dual'))
  _same(from_folder, from_workdir)
  out = convert.save_variables(
    from_workdir, str(tmp_path / 'converted'), arch='resnet_tiny', large_feature_map=True
  )
  model, converted = runs.load_run(out)
  _same(converted, from_workdir)
  assert model.arch == 'resnet_tiny'


def test_checkpoint_folder_without_config_json_uses_its_record(run, tmp_path):
  copy = tmp_path / 'copy'
  shutil.copytree(run, copy)
  os.remove(copy / 'config.json')
  config = runs.config_of_run(str(copy / 'dual' / 'checkpoints'))
  assert (config.model.arch, config.model.num_classes, config.model.large_feature_map) == (
    'resnet_tiny',
    10,
    True,
  )
  runs.load_run(str(copy / 'dual' / 'checkpoints'))


def test_config_of_another_model_is_refused_naming_the_field(run, smoke_data):
  wrong = _config(smoke_data, **{'model.num_classes': 5})
  with pytest.raises(ValueError, match='num_classes'):
    runs.load_run(run, config=wrong)


def test_vanilla_only_and_missing_runs_say_what_to_do(run, tmp_path):
  # As eval.py --checkpoint: a vanilla step's fc2 is the random init, never a sigmoid head.
  with pytest.raises(ValueError, match='single-head classifier'):
    runs.load_run(stage.checkpoint_dir(run, 'vanilla'))
  vanilla_only = tmp_path / 'vanilla_only'
  shutil.copytree(os.path.join(run, 'vanilla'), vanilla_only / 'vanilla')
  with pytest.raises(ValueError, match='no dual stage'):
    runs.load_run(str(vanilla_only))
  with pytest.raises(FileNotFoundError, match='no run at'):
    runs.load_run(str(tmp_path / 'nothing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='neither a workdir'):
    runs.load_run(str(tmp_path / 'empty'))
