"""The experiment config schema: every field a config file may set, with defaults.

Config files in `configs/` start from `base_config()`, override what their dataset needs and
return the config locked, so a typo in a file or on the command line
(`--config.dual.lr=...`) is an error naming the field. `validate()` checks vocabularies and
numeric ranges; library code reads configs and never mutates them.

Sections: `model`, `input`, one per stage (`vanilla`, `dual`, each with its own
`init_checkpoint`), `checkpoint`, `eval`. Where a default comes from is said next to it:
[ref] the reference code (finallyupper/beyond-softmax), [sheet] wsolevaluation's settings sheet,
[paper] the paper's text, [here] a choice made in this project. README "Differences" lists
every point where the three disagree.
"""

from __future__ import annotations

import difflib

import ml_collections

from dualsig_jax import vocab

# The synthetic generator's shape/texture table size (data/synthetic_render.MAX_CLASSES).
SYNTHETIC_MAX_CLASSES = 10

# Vocabularies of config values (the names themselves are declared once in vocab.py).
STAGES = vocab.STAGES
SOURCES = vocab.SOURCES
DTYPES = vocab.DTYPES
CAM_METHODS = vocab.CAM_METHODS
FAMILIES = vocab.FAMILIES
PAPER_BACKBONES = vocab.PAPER_ARCHS
UNFREEZE = ('fc2', 'all')
# The sigmoid head's start: 'init' = the reference's fresh init (normal(0, 0.01) Linears,
# xavier_uniform for Inception's 1x1 conv head) [ref]; 'clone' = a copy of fc [paper].
HEAD_INIT = ('init', 'clone')
# The frozen backbone during the dual stage: 'train' = BatchNorm on batch statistics (running
# statistics never updated), dropout on [ref]; 'inference' = running statistics, no dropout [paper].
BACKBONE_MODES = ('train', 'inference')
# lr decay: 'reference' = x rate at the start of 1-based epoch e when e % frequency == 0 [ref];
# 'steplr' = torch StepLR stepped per epoch, x rate after every `frequency` epochs.
LR_SCHEDULES = ('reference', 'steplr')
# How a stage's lr follows the global batch B from the batch it was tuned at (base_batch_size):
# x B/base ('linear', Goyal et al. 2017), x sqrt(B/base) ('sqrt'), unchanged ('none').
LR_SCALINGS = ('linear', 'sqrt', 'none')
FIDELITY_TARGETS = ('pred', 'label')

# Fields that may differ between a run and its resume (the rest must match config.json).
# The process and device counts are not in config.json: a resume may change them too.
RESUME_SAFE_FIELDS = (
  'stages',  # each stage's checkpoint records and checks its own model
  'log_every_steps',
  'logging',
  'profile_steps',
  'input.num_workers',  # the saved data position is in global batches (data/train_loader.py)
  'input.data_root',
  'input.mask_root',
  'input.metadata_root',
  'input.skip_bad_images',
  'checkpoint.every_steps',
  'checkpoint.max_to_keep',
  'checkpoint.async_save',
  'eval',
  'vanilla.num_epochs',
  'vanilla.max_steps',
  'dual.num_epochs',
  'dual.max_steps',
)


def _stage_section(**overrides) -> ml_collections.ConfigDict:
  sec = ml_collections.ConfigDict(
    dict(
      init_checkpoint='',  # starting weights (see each stage below)
      num_epochs=10,
      lr=1e-3,
      lr_classifier_ratio=10.0,  # classifier group at lr x ratio [ref], [sheet]
      lr_decay_frequency=3,  # epochs between decays [ref]
      lr_decay_rate=0.1,
      lr_schedule='reference',  # see LR_SCHEDULES
      momentum=0.9,  # SGD Nesterov [ref]
      nesterov=True,
      weight_decay=1e-4,  # argparse default of the reference [ref]
      max_steps=0,  # > 0: run this many steps instead of num_epochs (smoke runs, benchmarks) [here]
      # The global batch lr was tuned at (the published recipes: 32 [ref]); at another
      # input.batch_size the lr follows lr_scaling (see LR_SCALINGS) [here].
      base_batch_size=32,
      lr_scaling='linear',
      warmup_epochs=0.0,  # linear lr ramp from ~0 over this many epochs (0: none) [here]
      # > 1: each step's global batch runs as this many micro-batches with their gradients
      # averaged (optax.MultiSteps), for a per-chip batch that does not fit; BatchNorm
      # statistics are then per micro-batch [here].
      accum_steps=1,
    )
  )
  sec.update(overrides)
  return sec


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults (unlocked; config files lock after overriding)."""
  c = ml_collections.ConfigDict()
  c.experiment = 'experiment'
  c.seed = 0
  c.stages = ('dual',)
  c.log_every_steps = 20
  # TensorBoard event files in <workdir>/tensorboard (train/summary.py): the metrics.jsonl
  # curves, the evaluation metrics, and at each epoch's end both heads' CAMs over the first
  # `tensorboard_images` images of the eval split (0: no images) [here].
  c.logging = ml_collections.ConfigDict(dict(tensorboard=True, tensorboard_images=4))
  # 'a,b': a jax.profiler trace of steps a..b (1-based, each stage) into <workdir>/profile/<stage>
  # (TensorBoard's profile plugin or Perfetto read it); '' = none [here].
  c.profile_steps = ''

  c.model = ml_collections.ConfigDict(
    dict(
      arch='resnet50',
      # 'cam': wsol_cam/ models (plain CAM); 'standard': wsol/ models, which the reference
      # uses for every gradient method (VGG16 with torchvision's MLP classifier) [ref].
      family='cam',
      num_classes=1000,
      large_feature_map=False,
      dtype='float32',
      dropout_rate=0.5,  # the backbones' dropout (Inception, standard VGG16's MLP) [ref]
    )
  )

  c.input = ml_collections.ConfigDict(
    dict(
      source='folder',
      dataset_name='ILSVRC',
      data_root='',
      mask_root='',  # OpenImages masks; '' = data_root
      metadata_root='metadata',  # 'metadata' = the wsolevaluation metadata shipped in the package
      train_split='train',
      eval_split='test',
      resize_size=256,  # train: resize 256, random crop 224, flip [sheet]
      crop_size=224,
      eval_size=224,  # eval: resize 224 [sheet]
      batch_size=32,  # global, split over all devices of all hosts [ref]
      # False: the training split in metadata order without random crop/flip (centre crop),
      # for parity checks and debugging [here].
      augment=True,
      num_workers=2,
      skip_bad_images=False,
    )
  )
  c.input.synthetic = ml_collections.ConfigDict(dict(generate=False, **vocab.SYNTHETIC))
  c.input.tfds = ml_collections.ConfigDict(
    dict(name='', data_dir='', train_split='train', eval_split='test')
  )

  # Vanilla stage: a softmax classifier. init_checkpoint: converted weights
  # (python -m dualsig_jax.convert) or '' for a random start.
  c.vanilla = _stage_section()
  # Dual stage (the paper's method): train the sigmoid head fc2 only. init_checkpoint: the
  # vanilla classifier (a converted file or a vanilla stage's checkpoint folder);
  # '' = this workdir's vanilla stage.
  c.dual = _stage_section(
    unfreeze='fc2',
    head_init='init',  # see HEAD_INIT
    backbone_mode='train',  # see BACKBONE_MODES
    pos_weight=-1.0,  # -1: C - 1 (class-balanced BCE) [ref]
    gamma=1.0,  # reference option: >= 1 plain BCE, < 1 scaled log-probs [ref]
    temp=1.0,  # logits / temp before the loss [ref]
  )

  # async_save: Orbax writes each step in the background while training goes on (the manifest
  # follows once the step is complete; SIGTERM waits for it) [here].
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, max_to_keep=2, async_save=True))

  c.eval = ml_collections.ConfigDict(
    dict(
      methods=('cam', 'gradcam'),
      batch_size=64,  # global, split over all devices of all hosts
      cam_curve_interval=0.001,  # [sheet]
      iou_threshold_list=(30, 50, 70),  # [sheet]
      multi_contour_eval=True,  # [sheet]
      loc_threshold=0.2,  # Top-1 / GT-known Loc threshold [ref]
      fidelity_target='pred',
      num_plot_images=8,
      save_scoremaps=False,
      max_batches=0,  # > 0: evaluate only this many batches (quick checks)
      # True: evaluate again a finished run (train.py on it otherwise prints its saved results).
      force=False,
    )
  )
  return c


def dataset_config(
  config_file: str,
  arch: str | None,
  *,
  dataset_name: str,
  num_classes: int,
  default_arch: str = 'resnet50',
) -> ml_collections.ConfigDict:
  """The common part of a real-dataset config: the paper's `dual` stage on one backbone with the
  shipped wsolevaluation metadata (unlocked; the config file sets its schedule and locks).

  `arch` is the config argument: 'vgg16', 'resnet50', 'inception_v3' (the paper's), 'resnet18'
  or 'resnet34', optionally with
  ',standard' for the reference's gradient-method models (e.g. `configs/cub.py:vgg16,standard`).
  """
  arch, _, family = (arch or default_arch).partition(',')
  family = family or 'cam'
  if arch not in vocab.CONFIG_ARCHS:
    raise ValueError(f'{config_file}: unknown backbone {arch!r}; valid: {list(vocab.CONFIG_ARCHS)}')
  if family not in FAMILIES:
    raise ValueError(f'{config_file}: unknown model family {family!r}; valid: {list(FAMILIES)}')
  c = base_config()
  c.experiment = f'{dataset_name.lower()}_{arch}' + ('' if family == 'cam' else f'_{family}')
  c.stages = ('dual',)
  c.model.arch = arch
  c.model.family = family
  c.model.num_classes = num_classes
  c.input.dataset_name = dataset_name
  c.input.metadata_root = 'metadata'
  # The reference's model per method: plain CAM on wsol_cam/, gradient methods on wsol/.
  c.eval.methods = ('cam',) if family == 'cam' else ('gradcam',)
  return c


def _check(value, allowed, name):
  if value not in allowed:
    raise ValueError(f'config.{name}={value!r} is not one of {list(allowed)}')


def _get(config, name):
  value = config
  for part in name.split('.'):
    value = value[part]
  return value


def _check_range(config, name, *, low=None, high=None, low_open=False, integer=False):
  value = _get(config, name)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f'config.{name}={value!r} must be a number')
  if value != value:  # NaN compares false with every bound: out of every range
    raise ValueError(f'config.{name}=nan is not a number; give a value in range')
  if integer and int(value) != value:
    raise ValueError(f'config.{name}={value!r} must be an integer')
  bad = (low is not None and (value <= low if low_open else value < low)) or (
    high is not None and value > high
  )
  if bad:
    lo = '' if low is None else ('> ' if low_open else '>= ') + f'{low}'
    hi = '' if high is None else f'<= {high}'
    raise ValueError(
      f'config.{name}={value!r} is out of range (must be {" and ".join(filter(None, (lo, hi)))})'
    )


def _check_nan(config):
  """Refuses a NaN in any float field, whatever its range (NaN passes every comparison)."""
  for name in field_names(config):
    value = _get(config, name)
    values = value if isinstance(value, (tuple, list)) else (value,)
    if any(isinstance(v, float) and v != v for v in values):
      raise ValueError(f'config.{name}={value!r} is not a number; give a value in range')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field whose value is outside its vocabulary or range.

  Every field is checked here, before JAX starts, so a bad value never costs a training run;
  only what needs the devices (batch sizes vs the device count) waits for
  `check_batch_split`."""
  _check_nan(config)
  if not config.stages:
    raise ValueError('config.stages is empty')
  for s in config.stages:
    _check(s, STAGES, 'stages')
  _check(config.model.arch, vocab.ARCHS, 'model.arch')
  _check(config.model.family, FAMILIES, 'model.family')
  _check(config.model.dtype, DTYPES, 'model.dtype')
  _check(config.input.source, SOURCES, 'input.source')
  _check(config.dual.unfreeze, UNFREEZE, 'dual.unfreeze')
  _check(config.dual.head_init, HEAD_INIT, 'dual.head_init')
  _check(config.dual.backbone_mode, BACKBONE_MODES, 'dual.backbone_mode')
  _check(config.eval.fidelity_target, FIDELITY_TARGETS, 'eval.fidelity_target')
  for m in config.eval.methods:
    _check(m, CAM_METHODS, 'eval.methods')
  _check_range(config, 'model.num_classes', low=2, integer=True)
  _check_range(config, 'model.dropout_rate', low=0.0, high=0.99)
  for stage in STAGES:
    _check(config[stage].lr_schedule, LR_SCHEDULES, f'{stage}.lr_schedule')
    _check_range(config, f'{stage}.lr', low=0.0, low_open=True, high=10.0)
    _check_range(config, f'{stage}.lr_classifier_ratio', low=0.0, low_open=True)
    _check_range(config, f'{stage}.weight_decay', low=0.0, high=1.0)
    _check_range(config, f'{stage}.momentum', low=0.0, high=0.999)
    _check_range(config, f'{stage}.num_epochs', low=1, integer=True)
    _check_range(config, f'{stage}.max_steps', low=0, integer=True)
    _check_range(config, f'{stage}.lr_decay_frequency', low=1, integer=True)
    _check_range(config, f'{stage}.lr_decay_rate', low=0.0, low_open=True, high=1.0)
    _check(config[stage].lr_scaling, LR_SCALINGS, f'{stage}.lr_scaling')
    _check_range(config, f'{stage}.base_batch_size', low=1, integer=True)
    _check_range(config, f'{stage}.warmup_epochs', low=0.0)
    _check_range(config, f'{stage}.accum_steps', low=1, integer=True)
  _check_range(config, 'dual.temp', low=0.0, low_open=True)
  _check_range(config, 'dual.gamma', low=0.0, low_open=True)
  _check_range(config, 'dual.pos_weight')  # < 0: C - 1; any number, not NaN
  _check_range(config, 'seed', low=0, integer=True)
  # Booleans and strings need no check: ml_collections refuses a value of another type.
  for name in ('input.resize_size', 'input.crop_size', 'input.eval_size'):
    _check_range(config, name, low=1, integer=True)
  syn = 'input.synthetic'
  _check_range(config, f'{syn}.num_classes', low=2, high=SYNTHETIC_MAX_CLASSES, integer=True)
  _check_range(config, f'{syn}.image_size', low=32, integer=True)
  _check_range(config, f'{syn}.num_train', low=1, integer=True)
  _check_range(config, f'{syn}.num_val', low=0, integer=True)
  _check_range(config, f'{syn}.num_test', low=0, integer=True)
  _check_range(config, f'{syn}.seed', low=0, integer=True)
  if not config.eval.methods:
    raise ValueError('config.eval.methods is empty; name at least one of ' + str(CAM_METHODS))
  ious = config.eval.iou_threshold_list
  if not ious or any(isinstance(t, bool) or t != int(t) or not 0 < t <= 100 for t in ious):
    raise ValueError(
      f'config.eval.iou_threshold_list={tuple(ious)!r} must hold integers in (0, 100] '
      '(IoU thresholds in percent)'
    )
  _check_range(config, 'eval.num_plot_images', low=0, integer=True)
  _check_range(config, 'eval.max_batches', low=0, integer=True)
  if 'vanilla' in config.stages and 'dual' in config.stages and config.dual.init_checkpoint:
    raise ValueError(
      f'config.dual.init_checkpoint={config.dual.init_checkpoint!r} is set, but config.stages '
      'also trains the vanilla stage, which the dual stage starts from; drop one of them'
    )
  _check_range(config, 'input.batch_size', low=1, integer=True)
  _check_range(config, 'input.num_workers', low=0, integer=True)
  _check_range(config, 'eval.batch_size', low=1, integer=True)
  low, high = vocab.CAM_CURVE_INTERVAL_RANGE
  _check_range(config, 'eval.cam_curve_interval', low=low, low_open=True, high=high)
  _check_range(config, 'eval.loc_threshold', low=0.0, high=1.0)
  _check_range(config, 'checkpoint.every_steps', low=1, integer=True)
  _check_range(config, 'checkpoint.max_to_keep', low=1, integer=True)
  _check_range(config, 'log_every_steps', low=1, integer=True)
  _check_range(config, 'logging.tensorboard_images', low=0, high=16, integer=True)
  profile_range(config.profile_steps)
  if config.input.crop_size > config.input.resize_size:
    raise ValueError('config.input.crop_size must be <= config.input.resize_size')
  if (
    'cam' in config.eval.methods
    and config.model.family == 'standard'
    and (config.model.arch.startswith('vgg'))
  ):
    raise ValueError(
      f'config.eval.methods has "cam", but the sigmoid head of {config.model.arch} (standard) is '
      f'an MLP (classifier_2); plain CAM needs a linear head: use model.family="cam" for CAM, '
      f'or one of {list(vocab.GRADIENT_METHODS)}'
    )


def profile_range(spec: str) -> tuple[int, int] | None:
  """(first, last) step of `config.profile_steps` ('a,b', 1 <= a <= b), None for ''."""
  if not spec:
    return None
  try:
    a, b = (int(v) for v in spec.split(','))
  except ValueError:
    a, b = 0, -1
  if not 1 <= a <= b:
    raise ValueError(
      f'config.profile_steps={spec!r} must be two steps "a,b" with 1 <= a <= b (e.g. "10,20"), '
      'or "" for no trace'
    )
  return a, b


class BatchSplitError(ValueError):
  """A global batch size does not split evenly over the run's devices or processes."""


def check_batch_split(config: ml_collections.ConfigDict, *, devices: int, processes: int) -> None:
  """Refuses global batch sizes that do not split evenly over `devices` devices of
  `processes` processes (input.batch_size; eval.batch_size when the run evaluates).

  Runs as soon as the device count is known, before data is generated or any stage trains."""
  names = ['input.batch_size'] + (['eval.batch_size'] if 'dual' in config.stages else [])
  for name in names:
    per_process_batch(name, _get(config, name), devices=devices, processes=processes)


def per_process_batch(name: str, global_batch: int, *, devices: int, processes: int) -> int:
  """The one batch-split rule: `global_batch` (the config field `name`) must divide by the
  device and the process count; returns each process's share. Raises BatchSplitError."""
  for n, what in ((devices, 'devices'), (processes, 'processes')):
    if global_batch % n:
      raise BatchSplitError(
        f'config.{name}={global_batch} does not split over the {n} {what} of this run; pick a '
        f'multiple of {n}'
      )
  return global_batch // processes


def field_names(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every leaf field of `config` as a dotted name (`dual.lr`, `input.tfds.name`, ...)."""
  out = []
  for k, v in config.items():
    name = f'{prefix}{k}'
    if isinstance(v, ml_collections.ConfigDict):
      out += field_names(v, name + '.')
    else:
      out.append(name)
  return out


def closest_fields(name: str, config: ml_collections.ConfigDict | None = None) -> list[str]:
  """Up to three valid dotted field names closest to `name` (for 'did you mean' messages)."""
  names = field_names(config if config is not None else base_config())
  close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
  if not close:
    # Same last part in another section (e.g. `optim.lr` -> `dual.lr`, `vanilla.lr`).
    last = name.rsplit('.', 1)[-1]
    close = [n for n in names if n.rsplit('.', 1)[-1] == last][:3]
  return close
