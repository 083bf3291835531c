"""The experiment config schema: every field a config file may set, with defaults.

Config files in `configs/` start from `base_config()`, override what their dataset needs and
return the config locked, so a typo in a file or on the command line
(`--config.optim.lr=...`) is an error naming the field. `validate()` checks the values that
have a fixed vocabulary; library code reads configs and never mutates them.
"""
from __future__ import annotations

import ml_collections

STAGES = ('vanilla', 'dual')
SOURCES = ('folder', 'tfds')
DTYPES = ('float32', 'bfloat16')
CAM_METHODS = ('cam', 'gradcam', 'gradcam++', 'xgradcam', 'layercam')
UNFREEZE = ('fc2', 'all')
FC2_INIT = ('clone', 'init')
FIDELITY_TARGETS = ('pred', 'label')


def _optim_section(**overrides) -> ml_collections.ConfigDict:
  sec = ml_collections.ConfigDict(dict(
      num_epochs=10,
      lr=1e-3,
      lr_classifier_ratio=10.0,   # classifier group at lr x ratio (wsolevaluation)
      lr_decay_frequency=3,       # epochs between x lr_decay_rate steps
      lr_decay_rate=0.1,
      momentum=0.9,
      nesterov=True,
      weight_decay=1e-4,
      max_steps=0,                # > 0: stop after this many steps (smoke runs, benchmarks)
  ))
  sec.update(overrides)
  return sec


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults (unlocked; config files lock after overriding)."""
  c = ml_collections.ConfigDict()
  c.experiment = 'experiment'
  c.seed = 0
  c.stages = ('dual',)
  c.log_every_steps = 20

  c.model = ml_collections.ConfigDict(dict(
      arch='resnet50',
      num_classes=1000,
      large_feature_map=False,
      dtype='float32',
      init_checkpoint='',   # vanilla stage: converted weights (python -m dualsig_jax.convert)
      fc2_init='clone',     # dual stage: 'clone' fc into fc2 (the paper) or fresh 'init'
  ))

  c.input = ml_collections.ConfigDict(dict(
      source='folder',
      dataset_name='ILSVRC',
      data_root='',
      metadata_root='metadata',
      train_split='train',
      eval_split='test',
      resize_size=256,
      crop_size=224,
      eval_size=224,
      batch_size=32,        # global, split over all devices of all hosts
      num_workers=2,
      skip_bad_images=False,
  ))
  c.input.synthetic = ml_collections.ConfigDict(dict(
      generate=False, num_classes=10, image_size=112,
      num_train=3000, num_val=300, num_test=600, seed=0))
  c.input.tfds = ml_collections.ConfigDict(dict(
      name='', data_dir='', train_split='train', eval_split='test'))

  c.vanilla = _optim_section()
  # The paper's stage: train the sigmoid head fc2 only.
  c.optim = _optim_section(
      unfreeze='fc2',
      pos_weight=-1.0,      # -1: C - 1 (class-balanced BCE), as the reference
      gamma=1.0,            # reference option: >= 1 plain BCE, < 1 scaled log-probs
      temp=1.0,             # logits / temp before the loss
      init_checkpoint='',   # vanilla checkpoint dir; '' = this workdir's vanilla stage
  )

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, max_to_keep=2))

  c.eval = ml_collections.ConfigDict(dict(
      methods=('cam', 'gradcam'),
      batch_size=64,
      cam_curve_interval=0.001,
      iou_threshold_list=(30, 50, 70),
      multi_contour_eval=True,
      loc_threshold=0.2,
      fidelity_target='pred',
      num_plot_images=8,
      save_scoremaps=False,
      max_batches=0,        # > 0: evaluate only this many batches (quick checks)
  ))
  return c


PAPER_BACKBONES = ('vgg16', 'resnet50', 'inception_v3')


def dataset_config(config_file: str, arch: str | None, *, dataset_name: str, num_classes: int,
                   default_arch: str = 'resnet50') -> ml_collections.ConfigDict:
  """The common part of a real-dataset config: the paper's `dual` stage on one backbone with the
  shipped wsolevaluation metadata (unlocked; the config file sets its schedule and locks)."""
  arch = arch or default_arch
  if arch not in PAPER_BACKBONES:
    raise ValueError(f'{config_file}: unknown backbone {arch!r}; valid: {list(PAPER_BACKBONES)}')
  c = base_config()
  c.experiment = f'{dataset_name.lower()}_{arch}'
  c.stages = ('dual',)
  c.model.arch = arch
  c.model.num_classes = num_classes
  c.input.dataset_name = dataset_name
  c.input.metadata_root = 'metadata'
  return c


def _check(value, allowed, name):
  if value not in allowed:
    raise ValueError(f'config.{name}={value!r} is not one of {list(allowed)}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field whose value is outside its vocabulary."""
  from dualsig_jax import models  # late import: configs stay importable without jax
  for s in config.stages:
    _check(s, STAGES, 'stages')
  if not config.stages:
    raise ValueError('config.stages is empty')
  _check(config.model.arch, tuple(models.MODELS), 'model.arch')
  _check(config.model.dtype, DTYPES, 'model.dtype')
  _check(config.model.fc2_init, FC2_INIT, 'model.fc2_init')
  _check(config.input.source, SOURCES, 'input.source')
  _check(config.optim.unfreeze, UNFREEZE, 'optim.unfreeze')
  _check(config.eval.fidelity_target, FIDELITY_TARGETS, 'eval.fidelity_target')
  for m in config.eval.methods:
    _check(m, CAM_METHODS, 'eval.methods')
  if config.model.num_classes < 2:
    raise ValueError(f'config.model.num_classes={config.model.num_classes} must be >= 2')
  for name in ('batch_size',):
    if config.input[name] <= 0:
      raise ValueError(f'config.input.{name} must be positive')
  if config.input.crop_size > config.input.resize_size:
    raise ValueError('config.input.crop_size must be <= config.input.resize_size')
