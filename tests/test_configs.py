"""Every shipped config loads, validates and rejects unknown backbones and fields."""

import importlib
import os
import sys

import pytest

from dualsig_jax import defaults

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REAL = {'cub': 200, 'imagenet': 1000, 'cars': 196, 'openimages': 100}


@pytest.mark.parametrize('name', sorted(REAL))
@pytest.mark.parametrize('arch', defaults.PAPER_BACKBONES)
def test_real_dataset_configs(name, arch):
  c = importlib.import_module(f'configs.{name}').get_config(arch)
  defaults.validate(c)
  assert c.model.arch == arch and c.model.num_classes == REAL[name]
  assert c.stages == ('dual',) and c.optim.unfreeze == 'fc2'
  with pytest.raises(AttributeError):
    c.optim.not_a_field = 1  # locked


@pytest.mark.parametrize('name', sorted(REAL))
def test_unknown_backbone_is_named(name):
  with pytest.raises(ValueError, match='resnet9000'):
    importlib.import_module(f'configs.{name}').get_config('resnet9000')


def test_imagenet_learning_rates_follow_the_reference():
  imagenet = importlib.import_module('configs.imagenet')
  assert {a: imagenet.get_config(a).optim.lr for a in defaults.PAPER_BACKBONES} == {
    'vgg16': 3e-3,
    'resnet50': 1e-4,
    'inception_v3': 5e-4,
  }


@pytest.mark.parametrize('arg', [None, 'smoke'])
def test_synthetic_config(arg):
  c = importlib.import_module('configs.synthetic').get_config(arg)
  defaults.validate(c)
  assert c.stages == ('vanilla', 'dual')
  with pytest.raises(ValueError, match='bogus'):
    importlib.import_module('configs.synthetic').get_config('bogus')
