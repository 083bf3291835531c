"""What a stage trains and where its weights come from.

A stage ('vanilla' or 'dual') is defined by its config section (`config.vanilla`,
`config.dual`): optimizer settings, its starting checkpoint, and for the dual stage how the
frozen backbone runs. This module builds the stage's model, finds its checkpoint folders and
assembles its starting variables; the loop (`train/loop.py`) only runs steps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualsig_jax import models, vocab
from dualsig_jax import workdir as workdir_lib
from dualsig_jax.train import checkpoints, resume

log = logging.getLogger('dualsig_jax')

# Config dtype name -> compute dtype (the names are vocab.DTYPES).
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
assert tuple(COMPUTE_DTYPES) == vocab.DTYPES


@dataclasses.dataclass(frozen=True)
class StageSettings:
  """How a stage trains.

  section: the stage's config section (optimizer fields, init_checkpoint).
  frozen_backbone: only the sigmoid head trains (stop-gradient upstream of it).
  train_mode: the forward pass runs in training mode (BatchNorm on batch statistics, dropout).
  keep_batch_stats: the BatchNorm running statistics are updated (vanilla, and dual with
    unfreeze='all', which trains the whole model; the reference's dual stage with the frozen
    backbone normalises with batch statistics but never moves the running ones).
    With unfreeze='all' the stage always runs in train mode (dual.backbone_mode is unused).
  unfreeze: 'fc2' or 'all' (which parameters the optimizer updates).
  """

  stage: str
  section: ml_collections.ConfigDict
  frozen_backbone: bool
  train_mode: bool
  keep_batch_stats: bool
  unfreeze: str


def stage_settings(config: ml_collections.ConfigDict, stage: str) -> StageSettings:
  if stage == 'vanilla':
    return StageSettings(stage, config.vanilla, False, True, True, 'all')
  if stage != 'dual':
    raise ValueError(f"unknown stage {stage!r}; valid: ['vanilla', 'dual']")
  d = config.dual
  frozen = d.unfreeze == 'fc2'
  return StageSettings(
    stage,
    d,
    frozen_backbone=frozen,
    train_mode=(not frozen) or d.backbone_mode == 'train',
    keep_batch_stats=not frozen,
    unfreeze=d.unfreeze,
  )


def step_kwargs(config: ml_collections.ConfigDict, stage: str) -> dict:
  """The loss settings `state.train_step` is bound with for a stage (functools.partial):
  stage, train_mode, keep_batch_stats, pos_weight (`dual.pos_weight` < 0: C - 1), gamma, temp."""
  s = stage_settings(config, stage)
  d = config.dual
  return dict(
    stage=stage,
    train_mode=s.train_mode,
    keep_batch_stats=s.keep_batch_stats,
    pos_weight=config.model.num_classes - 1.0 if d.pos_weight < 0 else float(d.pos_weight),
    gamma=d.gamma,
    temp=d.temp,
  )


def build_stage_model(config: ml_collections.ConfigDict, stage: str = 'dual'):
  """The Flax model of a stage (`dual` is also the evaluation model: both heads)."""
  s = stage_settings(config, stage)
  return models.build_model(
    config.model.arch,
    config.model.num_classes,
    family=config.model.family,
    large_feature_map=config.model.large_feature_map,
    dtype=COMPUTE_DTYPES[config.model.dtype],
    frozen_backbone=s.frozen_backbone,
    dropout_rate=config.model.dropout_rate,
  )


checkpoint_dir = workdir_lib.checkpoint_dir  # `<workdir>/<stage>/checkpoints`, defined once


def vanilla_source(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the dual stage (and eval's vanilla accuracy) reads the vanilla classifier.

  `dual.init_checkpoint` may name a converted folder, a stage's checkpoint folder, or the
  workdir of a vanilla run (its `vanilla/checkpoints` is used)."""
  src = config.dual.init_checkpoint
  if not src:
    return checkpoint_dir(workdir, 'vanilla')
  inner = checkpoint_dir(src, 'vanilla')
  return inner if os.path.isdir(inner) else src


def model_record(config: ml_collections.ConfigDict, stage: str) -> dict:
  """What a checkpoint records of the model that wrote it (checked on load and resume), and
  the run's whole config (`config`: dotted name -> value), which guards a resume whose
  config.json is lost (resume.check_and_write_config)."""
  return dict(
    stage=stage,
    arch=config.model.arch,
    family=config.model.family,
    num_classes=int(config.model.num_classes),
    large_feature_map=bool(config.model.large_feature_map),
    experiment=config.experiment,
    config=resume.config_values(config),
  )


def check_source_matches(info: dict, config: ml_collections.ConfigDict, where: str) -> None:
  """Refuses starting weights recorded with another arch, family, class count or feature-map
  size. ResNet50/InceptionV3 have the same keys with and without `large_feature_map`, so the
  record is the only way to catch that mismatch; old checkpoints without a record pass.

  Raises:
    ValueError naming every field that differs at once, and the overrides that make this
    config fit the checkpoint (they work with any config file).
  """
  want = model_record(config, 'dual')
  keys = ('arch', 'family', 'num_classes', 'large_feature_map')
  wrong = [k for k in keys if info.get(k) is not None and info[k] != want[k]]
  if not wrong:
    return
  detail = ', '.join(f'model.{k}={info[k]!r} (this config: {want[k]!r})' for k in wrong)
  fix = ' '.join(f'--config.model.{k}={_flag_value(info[k])}' for k in wrong)
  raise ValueError(
    f'{where} was written for {detail}; use the matching checkpoint, or run with {fix}'
  )


def _flag_value(v) -> str:
  """A value as an ml_collections override takes it on a command line."""
  return str(v) if isinstance(v, (bool, int)) else v


def _names(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def overlay_variables(fresh: dict, loaded: dict, *, where: str) -> tuple[dict, list[str]]:
  """Takes every leaf of `loaded` into `fresh`; returns (variables, names left at their init).

  A loaded leaf that the model does not have, or whose shape differs, is an error naming it.
  """
  fresh_flat = {_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(fresh)[0]}
  loaded_flat = {_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  for name, v in loaded_flat.items():
    if name not in fresh_flat:
      raise ValueError(f'{where}: unexpected parameter {name!r} (not in the model)')
    if tuple(np.shape(v)) != tuple(np.shape(fresh_flat[name])):
      raise ValueError(
        f'{where}: parameter {name!r} has shape {np.shape(v)}, the model '
        f'expects {np.shape(fresh_flat[name])}'
      )

  def pick(path, v):
    return jnp.asarray(loaded_flat.get(_names(path), v))

  merged = jax.tree_util.tree_map_with_path(pick, fresh)
  return merged, sorted(set(fresh_flat) - set(loaded_flat))


def fresh_variables(config: ml_collections.ConfigDict, model) -> dict:
  """Randomly initialised variables of the stage's model (also the restore target's shape)."""
  # Parameter shapes do not depend on the input size: the model's smallest valid size is enough.
  return models.init_variables(model, jax.random.PRNGKey(config.seed))


def initial_variables(config: ml_collections.ConfigDict, workdir: str, stage: str, model):
  """Starting weights of a stage, and a note on where they came from."""
  fresh = fresh_variables(config, model)
  if stage == 'vanilla':
    src = config.vanilla.init_checkpoint
    if not src:
      return fresh, 'random initialisation'
    loaded, info = checkpoints.restore_variables(src)
    check_source_matches(info, config, src)
    merged, left = overlay_variables(fresh, loaded, where=src)
    return merged, f'{src} (initialised here: {left})'
  src = vanilla_source(config, workdir)
  if not os.path.isdir(src):
    raise FileNotFoundError(
      f'stage "dual" starts from a vanilla checkpoint, but {src} does not exist; set '
      f'--config.dual.init_checkpoint=DIR or run the vanilla stage first'
    )
  loaded, info = checkpoints.restore_variables(src)
  check_source_matches(info, config, src)
  if jax.process_index() == 0:
    _write_source_record(workdir, src, info.get('step'))
  merged, left = overlay_variables(fresh, loaded, where=src)
  missing = [n for n in left if not n.startswith('params/fc2/')]
  if missing:
    raise ValueError(f'{src}: the vanilla checkpoint lacks {missing}')
  mode = config.dual.head_init
  merged = models.clone_head(
    merged,
    mode=mode,
    rng=jax.random.PRNGKey(config.seed + 1),
    arch=config.model.arch,
    family=config.model.family,
  )
  how = 'cloned from fc' if mode == 'clone' else "freshly initialised (the reference's init)"
  return merged, f'{src} with fc2 {how}'


def check_structure(variables: dict, config: ml_collections.ConfigDict, model, *, where: str):
  """Raises ValueError naming the first array that `variables` lacks, has extra, or has in
  another shape than the variables of `model` (built from `config`)."""
  size = models.init_input_size(model)
  expected = jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
  )
  expected = {'params': expected['params'], 'batch_stats': expected.get('batch_stats', {})}
  flat = jax.tree_util.tree_flatten_with_path
  have = {_names(p): tuple(np.shape(v)) for p, v in flat(variables)[0]}
  want = {_names(p): tuple(v.shape) for p, v in flat(expected)[0]}
  for name in sorted(set(have) | set(want)):
    if name not in want:
      problem = f'has {name!r}, which the model does not have'
    elif name not in have:
      problem = f'lacks {name!r}'
    elif have[name] != want[name]:
      problem = f'has {name!r} of shape {have[name]}, the model expects {want[name]}'
    else:
      continue
    m = config.model
    raise ValueError(
      f'{where} does not fit the model of this config (model.arch={m.arch!r}, '
      f'family={m.family!r}, num_classes={m.num_classes}): it {problem}; use the config the '
      'checkpoint was trained with'
    )


def _untrained_head(variables: dict, info: dict) -> str:
  """Why the checkpoint's sigmoid head fc2 is not a trained one, or ''."""
  if 'fc2' not in variables.get('params', {}):
    return 'has no sigmoid head (fc2)'
  if info.get('stage') == 'vanilla':
    # The vanilla stage trains the dual model's softmax head only: its fc2 is the random init.
    return 'is a vanilla-stage checkpoint (its fc2 is the untrained initialisation)'
  if info.get('fc2') not in (None, 'loaded'):
    return f'was converted without a sigmoid head (its record says fc2: {info["fc2"]})'
  if info.get('stage') == 'dual' and info.get('step') == 0:
    return 'is the dual stage at step 0 (its fc2 has not trained a step)'
  return ''


def load_dual_checkpoint(config: ml_collections.ConfigDict, path: str, model=None):
  """(variables, record) of the dual-branch checkpoint folder `path` (a stage's checkpoint
  folder, newest readable step, or a converter output), checked against this config's model
  before any Flax code sees them. The record has the `step` read (stage folders).

  `model`: the dual model if already built (else built from `config`).
  Raises:
    FileNotFoundError: no checkpoint folder. CheckpointCorruptError: no readable step.
    ValueError: the checkpoint's record or arrays belong to another model (names the field),
      or its sigmoid head `fc2` is not a trained one: missing, a vanilla-stage checkpoint
      (whose fc2 is the random init), a converter output whose record says `fc2: init` /
      `clone`, or a dual stage at step 0.
  """
  variables, info = checkpoints.restore_variables(path)
  check_source_matches(info, config, path)
  untrained = _untrained_head(variables, info)
  if untrained:
    raise ValueError(
      f'{path} {untrained}: it is a single-head classifier, and its fc2 would be evaluated as '
      '"sigmoid (ours)"; train the dual stage on it (--config.dual.init_checkpoint) or convert '
      'a dual-branch checkpoint'
    )
  model = model if model is not None else build_stage_model(config, 'dual')
  check_structure(variables, config, model, where=path)
  return variables, info


def load_dual_variables(config: ml_collections.ConfigDict, workdir: str, model=None) -> dict:
  """{'params', 'batch_stats'} of the newest readable dual-stage checkpoint of `workdir`
  (`load_dual_checkpoint` of `<workdir>/dual/checkpoints`)."""
  return load_dual_checkpoint(config, checkpoint_dir(workdir, 'dual'), model)[0]


# ------------------------------------------------------------------- what each stage stands on

SOURCE_FILE = 'source.json'  # <workdir>/dual/source.json: the vanilla step the dual stage read


def _source_identity(src: str, step: int | None) -> dict:
  """The vanilla checkpoint `src` at `step`: its path, step and manifest digest (None for a
  converted folder, which has no steps)."""
  digest = None if step is None else checkpoints.manifest_digest(os.path.join(src, str(step)))
  return {'path': os.path.abspath(src), 'step': step, 'digest': digest}


def _write_source_record(workdir: str, src: str, step: int | None) -> None:
  path = os.path.join(workdir, 'dual', SOURCE_FILE)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(_source_identity(src, step), f)
  os.replace(path + '.tmp', path)


def source_identity_now(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The identity of the vanilla checkpoint the dual stage would start from now (its newest
  step), recorded in each dual step's record; None when that folder has no steps."""
  src = vanilla_source(config, workdir)
  numbered = workdir_lib.folder_steps(src)
  return _source_identity(src, numbered[-1]) if numbered else None


def _recorded_source(workdir: str) -> dict | None:
  """What the dual stage started from: dual/source.json, else the record of its newest step
  (a lost or damaged source.json is recovered from there); None when neither says."""
  try:
    with open(os.path.join(workdir, 'dual', SOURCE_FILE), encoding='utf-8') as f:
      rec = json.load(f)
    if isinstance(rec, dict) and 'step' in rec:
      return rec
  except (OSError, ValueError):
    pass
  for step in reversed(workdir_lib.steps(workdir, 'dual')):
    meta = os.path.join(checkpoint_dir(workdir, 'dual'), str(step), 'meta', 'metadata')
    try:
      with open(meta, encoding='utf-8') as f:
        rec = json.load(f).get('source')
    except (OSError, ValueError, AttributeError):
      continue
    if isinstance(rec, dict) and 'step' in rec:
      return rec
  return None


def dual_source_change(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Why the dual stage's checkpoints no longer match the vanilla checkpoint they started
  from (e.g. the vanilla stage trained on after `vanilla.num_epochs` grew), or None.

  The origin is `dual/source.json`, or the record of the newest dual step when that file is
  lost; a dual stage whose origin neither establishes is stale too (it may come from any
  vanilla checkpoint). None when there is nothing to compare: no dual checkpoint, a converted
  starting folder, or a vanilla folder without steps."""
  if not workdir_lib.steps(workdir, 'dual'):
    return None
  src = vanilla_source(config, workdir)
  numbered = workdir_lib.folder_steps(src)
  if not numbered:
    return None
  rec = _recorded_source(workdir)
  if rec is None:
    return (
      f'the origin of the dual stage of {workdir} cannot be established ({SOURCE_FILE} is '
      'missing or unreadable and its checkpoints do not record it), so it may come from '
      f'another vanilla checkpoint than {src}'
    )
  if rec.get('step') is None:
    return None
  now = _source_identity(src, numbered[-1])
  if (now['step'], now['digest']) == (rec['step'], rec.get('digest')):
    return None
  if now['step'] != rec['step']:
    what = f'is now at step {now["step"]}'
  else:
    what = f'step {now["step"]} now holds other weights'
  return (
    f'the dual stage of {workdir} was trained from the vanilla checkpoint {src} at step '
    f'{rec["step"]}, which {what}'
  )


def retire_dual_stage(workdir: str, reason: str) -> str:
  """Moves `<workdir>/dual/checkpoints` (and its source record) aside to
  `<workdir>/dual/checkpoints.stale-<time>` so the dual stage trains again from the current
  vanilla weights; returns the new folder. Call on process 0."""
  stamp = time.strftime('%Y%m%d-%H%M%S')
  old = checkpoint_dir(workdir, 'dual')
  new = f'{old}.stale-{stamp}'
  os.rename(old, new)
  record = os.path.join(workdir, 'dual', SOURCE_FILE)
  if os.path.exists(record):
    os.replace(record, os.path.join(new, SOURCE_FILE))
  log.warning('%s: the dual stage is trained again from it (its old checkpoints: %s)', reason, new)
  return new


def total_steps(config: ml_collections.ConfigDict, stage: str, steps_per_epoch: int) -> int:
  """The step a stage trains to: `max_steps` when > 0, else `num_epochs` epochs."""
  sec = config[stage]
  return int(sec.max_steps) if sec.max_steps > 0 else int(sec.num_epochs) * int(steps_per_epoch)


def stage_progress(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Where each stage of `config.stages` stands in `workdir` (for reports and eval.py):
  {stage: {'step': newest checkpoint step or None, 'total': the step the config trains it
  to, 'finished': step >= total}}. The dual entry also has 'source_change': the reason its
  vanilla input changed since it trained (`dual_source_change`), or None.

  Reads the train split's metadata (its size sets the steps per epoch)."""
  from dualsig_jax import data  # the loaders: only needed here

  spe = data.steps_per_epoch(config.input, config.input.batch_size)
  out = {}
  for stage in config.stages:
    numbered = workdir_lib.steps(workdir, stage)
    step = numbered[-1] if numbered else None
    total = total_steps(config, stage, spe)
    out[stage] = {'step': step, 'total': total, 'finished': step is not None and step >= total}
    if stage == 'dual':
      out[stage]['source_change'] = dual_source_change(config, workdir)
  return out
