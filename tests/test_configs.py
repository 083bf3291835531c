"""Every shipped config loads, validates and rejects unknown backbones and fields."""

import importlib
import os
import sys

import pytest

from dualsig_jax import defaults, vocab

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REAL = {'cub': 200, 'imagenet': 1000, 'cars': 196, 'openimages': 100}


@pytest.mark.parametrize('name', sorted(REAL))
@pytest.mark.parametrize('arch', vocab.CONFIG_ARCHS)
def test_real_dataset_configs(name, arch):
  c = importlib.import_module(f'configs.{name}').get_config(arch)
  defaults.validate(c)
  assert c.model.arch == arch and c.model.num_classes == REAL[name]
  assert c.stages == ('dual',) and c.dual.unfreeze == 'fc2'
  with pytest.raises(AttributeError):
    c.dual.not_a_field = 1  # locked


@pytest.mark.parametrize('name', sorted(REAL))
def test_unknown_backbone_is_named(name):
  with pytest.raises(ValueError, match='resnet9000'):
    importlib.import_module(f'configs.{name}').get_config('resnet9000')


def test_imagenet_learning_rates_follow_the_reference():
  imagenet = importlib.import_module('configs.imagenet')
  assert {a: imagenet.get_config(a).dual.lr for a in defaults.PAPER_BACKBONES} == {
    'vgg16': 3e-3,
    'resnet50': 1e-4,
    'inception_v3': 5e-4,
  }


def test_imagenet_default_is_the_published_command():
  """VGG16, 3 epochs, batch 32, decay frequency 3, lr 0.003, weight decay 5e-4, no
  large_feature_map; dual stage as the reference runs it."""
  c = importlib.import_module('configs.imagenet').get_config()
  assert (c.model.arch, c.model.family, c.model.large_feature_map) == ('vgg16', 'cam', False)
  d = c.dual
  assert (d.num_epochs, d.lr_decay_frequency, d.lr, d.weight_decay) == (3, 3, 3e-3, 5e-4)
  assert c.input.batch_size == 32
  assert (d.head_init, d.backbone_mode, d.lr_schedule) == ('init', 'train', 'reference')


@pytest.mark.parametrize('name', sorted(REAL))
def test_standard_family_configs_evaluate_gradient_methods(name):
  c = importlib.import_module(f'configs.{name}').get_config('vgg16,standard')
  defaults.validate(c)
  assert c.model.family == 'standard'
  assert 'cam' not in c.eval.methods and c.eval.methods
  with pytest.raises(ValueError, match='family'):
    importlib.import_module(f'configs.{name}').get_config('vgg16,bogus')


def test_plain_cam_on_the_mlp_head_is_refused_by_validate():
  c = importlib.import_module('configs.cub').get_config('vgg16,standard')
  c.unlock()
  c.eval.methods = ('cam', 'gradcam')
  with pytest.raises(ValueError, match='MLP'):
    defaults.validate(c)


@pytest.mark.parametrize(
  'field,value',
  [
    ('dual.lr', -1.0),
    ('dual.lr', 0.0),
    ('vanilla.weight_decay', -1e-4),
    ('dual.num_epochs', 0),
    ('input.batch_size', 0),
    ('eval.cam_curve_interval', 0.0),
    ('checkpoint.every_steps', 0),
    ('dual.lr_decay_frequency', 0),
    ('dual.temp', 0.0),
  ],
)
def test_numeric_ranges_are_checked(field, value):
  c = importlib.import_module('configs.synthetic').get_config()
  c.unlock()
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    defaults.validate(c)


def test_closest_fields_suggest_the_renamed_section():
  assert 'dual.lr' in defaults.closest_fields('optim.lr')
  assert defaults.closest_fields('dual.lrr')[0] == 'dual.lr'


@pytest.mark.parametrize('arg', [None, 'smoke'])
def test_synthetic_config(arg):
  c = importlib.import_module('configs.synthetic').get_config(arg)
  defaults.validate(c)
  assert c.stages == ('vanilla', 'dual')
  with pytest.raises(ValueError, match='bogus'):
    importlib.import_module('configs.synthetic').get_config('bogus')


def test_dual_init_checkpoint_with_a_vanilla_stage_is_refused():
  """Both would name where the dual stage starts; the run must not silently ignore one."""
  c = importlib.import_module('configs.synthetic').get_config()
  c.unlock()
  c.dual.init_checkpoint = '/some/vanilla'
  with pytest.raises(ValueError, match='drop one of them'):
    defaults.validate(c)


def test_a_vanilla_workdir_names_its_checkpoints(tmp_path):
  from dualsig_jax.train import stage

  c = importlib.import_module('configs.cub').get_config('resnet50')
  c.unlock()
  (tmp_path / 'vanilla' / 'checkpoints').mkdir(parents=True)
  c.dual.init_checkpoint = str(tmp_path)
  assert stage.vanilla_source(c, 'w') == str(tmp_path / 'vanilla' / 'checkpoints')
  c.dual.init_checkpoint = str(tmp_path / 'converted')
  assert stage.vanilla_source(c, 'w') == str(tmp_path / 'converted')


def test_large_feature_map_mismatch_with_the_vanilla_checkpoint_is_refused(tmp_path):
  """ResNet50/InceptionV3 have the same keys with and without large_feature_map: only the
  record written by the converter tells them apart, and the dual stage checks it."""
  from dualsig_jax import convert, models
  from dualsig_jax.train import stage

  model = models.build_model('resnet_tiny', 10, large_feature_map=True, frozen_backbone=False)
  meta = dict(arch='resnet_tiny', family='cam', num_classes=10, large_feature_map=True)
  convert.save_variables(models.init_variables(model, 0), str(tmp_path / 'ckpt'), meta=meta)
  c = importlib.import_module('configs.synthetic').get_config()
  c.unlock()
  c.stages = ('dual',)
  c.dual.init_checkpoint = str(tmp_path / 'ckpt')
  c.model.large_feature_map = False
  with pytest.raises(ValueError, match='large_feature_map=True'):
    stage.initial_variables(c, str(tmp_path / 'w'), 'dual', stage.build_stage_model(c, 'dual'))
  c.model.large_feature_map = True  # the matching config starts from it
  variables, origin = stage.initial_variables(
    c, str(tmp_path / 'w'), 'dual', stage.build_stage_model(c, 'dual')
  )
  assert 'fc2' in variables['params'] and 'freshly initialised' in origin


def _float_fields():
  c = defaults.base_config()
  return [n for n in defaults.field_names(c) if isinstance(_get(c, n), float)]


def _get(c, name):
  for part in name.split('.'):
    c = c[part]
  return c


def _set(c, name, value):
  *sections, last = name.split('.')
  for part in sections:
    c = c[part]
  c[last] = value


@pytest.mark.parametrize('field', _float_fields())
def test_nan_is_out_of_every_range(field):
  c = importlib.import_module('configs.synthetic').get_config()
  c.unlock()
  _set(c, field, float('nan'))
  with pytest.raises(ValueError, match=field.replace('.', r'\.') + '=nan'):
    defaults.validate(c)


@pytest.mark.parametrize(
  'field,value',
  [
    ('eval.iou_threshold_list', (30, 150)),
    ('eval.iou_threshold_list', (0, 50)),
    ('eval.iou_threshold_list', ()),
    ('eval.num_plot_images', -1),
    ('eval.max_batches', -1),
    ('eval.methods', ()),
    ('input.eval_size', 0),
    ('input.synthetic.num_train', 0),
    ('input.synthetic.image_size', 8),
    ('dual.gamma', 0.0),
    ('seed', -1),
    ('logging.tensorboard_images', -1),
    ('logging.tensorboard_images', 17),
  ],
)
def test_every_field_is_checked_before_training(field, value):
  c = importlib.import_module('configs.synthetic').get_config()
  c.unlock()
  _set(c, field, value)
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    defaults.validate(c)


@pytest.mark.parametrize(
  'field,value,devices,processes',
  [('input.batch_size', 36, 8, 1), ('eval.batch_size', 30, 8, 1), ('eval.batch_size', 24, 8, 16)],
)
def test_batches_that_do_not_split_over_the_devices_are_named(field, value, devices, processes):
  c = importlib.import_module('configs.synthetic').get_config('smoke')
  c.unlock()
  _set(c, field, value)
  with pytest.raises(ValueError, match=field.replace('.', r'\.') + f'={value}'):
    defaults.check_batch_split(c, devices=devices, processes=processes)
  _set(c, field, 64)
  defaults.check_batch_split(c, devices=8, processes=2)
