"""Checkpoints written before the one-model-system change (issue 16) still load and give the
same outputs. The fixtures were written by tests/fixtures/pre_v16/make_fixtures.py with the
code of main at 7d0f8e0; never regenerate them with later code."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from dualsig_jax import convert, defaults, models
from dualsig_jax.train import stage

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'pre_v16')


@pytest.fixture(scope='module')
def expected():
  with np.load(os.path.join(FIXTURES, 'expected.npz')) as z:
    return {k: z[k] for k in z.files}


def _check_logits(out, expected, prefix):
  for key in ('softmax_logits', 'sigmoid_logits'):
    np.testing.assert_allclose(np.asarray(out[key]), expected[f'{prefix}_{key}'], atol=1e-5)


def test_converted_checkpoint_loads_and_gives_the_same_logits(expected):
  path = os.path.join(FIXTURES, 'converted')
  info = convert.read_checkpoint_info(path)
  assert (info['arch'], info['family'], info['num_classes']) == ('resnet_tiny', 'cam', 3)
  model = models.build_model(info['arch'], info['num_classes'], family=info['family'])
  variables = convert.load_variables(path)
  out = model.apply(variables, jnp.asarray(expected['image']), train=False)
  _check_logits(out, expected, 'converted')


def test_trained_dual_stage_checkpoint_loads_and_gives_the_same_logits(expected, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(os.path.join(FIXTURES, 'trained'), workdir)  # readers may rename damage
  config = defaults.base_config()
  config.model.arch, config.model.family, config.model.num_classes = 'resnet_tiny', 'standard', 3
  model = stage.build_stage_model(config, 'dual')
  variables = stage.load_dual_variables(config, workdir, model)
  out = model.apply(variables, jnp.asarray(expected['image']), train=False)
  _check_logits(out, expected, 'trained')
  # The trained stage moved fc2 away from its init; fc is the untouched softmax head.
  assert not np.allclose(out['softmax_logits'], out['sigmoid_logits'])
