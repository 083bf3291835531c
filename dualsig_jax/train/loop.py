"""The training loop of one stage: data, sharded jit step, logging, checkpoints, resume."""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dualsig_jax import data, defaults, models
from dualsig_jax.train import checkpoints, optim, sharding
from dualsig_jax.train.state import create_state, predict_step, train_step

log = logging.getLogger('dualsig_jax')

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def checkpoint_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, 'checkpoints')


def stage_settings(config: ml_collections.ConfigDict, stage: str):
  """(optimizer section, frozen_backbone) of a stage."""
  if stage == 'vanilla':
    return config.vanilla, False
  return config.optim, config.optim.unfreeze == 'fc2'


def build_stage_model(config: ml_collections.ConfigDict, stage: str):
  _, frozen = stage_settings(config, stage)
  return models.build_model(
    config.model.arch,
    config.model.num_classes,
    large_feature_map=config.model.large_feature_map,
    dtype=DTYPES[config.model.dtype],
    dual=frozen,
  )


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


def latest_variables(workdir_or_ckpt: str, stage: str | None = None) -> dict:
  """{'params', 'batch_stats'} of the newest checkpoint of a stage's checkpoint folder.

  Accepts a workdir (with `stage`) or a checkpoint folder written by a stage / the converter.
  """
  path = checkpoint_dir(workdir_or_ckpt, stage) if stage else workdir_or_ckpt
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no checkpoint at {path}')
  mgr = checkpoints.manager(path, max_to_keep=10)
  step = mgr.latest_step()
  if step is None:
    # Weights converted from PyTorch (python -m dualsig_jax.convert): DIR/variables.
    from dualsig_jax import convert

    return convert.load_variables(path)
  restored = mgr.restore(
    step, args=checkpoints.ocp.args.Composite(state=checkpoints.ocp.args.StandardRestore())
  )['state']
  return {'params': restored['params'], 'batch_stats': restored.get('batch_stats', {})}


def vanilla_source(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the dual stage (and eval's vanilla accuracy) reads the vanilla classifier."""
  return config.optim.init_checkpoint or checkpoint_dir(workdir, 'vanilla')


def fresh_variables(config: ml_collections.ConfigDict, model) -> dict:
  """Randomly initialised variables of the stage's model (also the restore target's shape)."""
  return models.init_variables(model, jax.random.PRNGKey(config.seed), config.input.crop_size)


def initial_variables(config: ml_collections.ConfigDict, workdir: str, stage: str, model):
  """Starting weights of a stage, and a note on where they came from."""
  fresh = fresh_variables(config, model)
  if stage == 'vanilla':
    if not config.model.init_checkpoint:
      return fresh, 'random initialisation'
    loaded = latest_variables(config.model.init_checkpoint)
    merged, left = overlay_variables(fresh, loaded, where=config.model.init_checkpoint)
    return merged, f'{config.model.init_checkpoint} (initialised here: {left})'
  src = vanilla_source(config, workdir)
  if not os.path.isdir(src):
    raise FileNotFoundError(
      f'stage "dual" starts from a vanilla checkpoint, but {src} does not exist; set '
      f'--config.optim.init_checkpoint=DIR or run the vanilla stage first'
    )
  loaded = latest_variables(src)
  merged, left = overlay_variables(fresh, loaded, where=src)
  missing = [n for n in left if not n.startswith('params/fc2/')]
  if missing:
    raise ValueError(f'{src}: the vanilla checkpoint lacks {missing}')
  merged = models.clone_head(
    merged, mode=config.model.fc2_init, rng=jax.random.PRNGKey(config.seed + 1)
  )
  return (
    merged,
    f'{src} with fc2 {"cloned from fc" if config.model.fc2_init == "clone" else "re-initialised"}',
  )


class _Log:
  """metrics.jsonl writer (process 0 only)."""

  def __init__(self, workdir: str):
    self.on = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')

  def write(self, record: dict) -> None:
    if self.on:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))


def train_stage(config: ml_collections.ConfigDict, workdir: str, stage: str) -> dict:
  """Trains one stage ('vanilla' or 'dual'), resuming from the workdir's checkpoint if any.

  Returns:
    {'step': final step, 'checkpoint_dir': path, 'loss': last logged loss}.
  """
  defaults.validate(config)
  if stage not in defaults.STAGES:
    raise ValueError(f'unknown stage {stage!r}; valid: {list(defaults.STAGES)}')
  o, frozen = stage_settings(config, stage)
  mesh = sharding.make_mesh()
  local_batch = sharding.check_global_batch(config.input.batch_size, mesh)
  model = build_stage_model(config, stage)
  spe = data.steps_per_epoch(config.input, config.input.batch_size)
  total = o.max_steps if o.max_steps > 0 else o.num_epochs * spe
  mgr = checkpoints.manager(
    checkpoint_dir(workdir, stage), max_to_keep=config.checkpoint.max_to_keep
  )
  meta = dict(
    stage=stage,
    arch=config.model.arch,
    num_classes=config.model.num_classes,
    experiment=config.experiment,
  )
  start = mgr.latest_step()
  if start is not None:
    checkpoints.check_compatible(
      checkpoints.read_meta(mgr, start), meta, checkpoint_dir(workdir, stage)
    )
    # Resuming: the checkpoint overwrites every leaf, so only the structure is needed here.
    variables, origin = fresh_variables(config, model), f'resumed from step {start}'
  else:
    variables, origin = initial_variables(config, workdir, stage, model)

  unfreeze = config.optim.unfreeze if stage == 'dual' else 'all'
  tx, labels, schedules = optim.make_optimizer(
    variables['params'],
    arch=config.model.arch,
    stage=stage,
    optim_cfg=o,
    steps_per_epoch=spe,
    unfreeze=unfreeze,
  )
  groups = optim.describe_labels(labels)
  state = create_state(variables, tx, config.seed)

  loader = data.make_train_loader(
    config.input,
    seed=config.seed + (stage == 'dual'),
    # Endless sampler (the loop counts steps): its repr, which grain
    # checks on restore, must not depend on max_steps / num_epochs.
    num_epochs=None,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    batch_size=local_batch,
  )
  data_iter = iter(loader)
  if start is not None:
    state, _ = checkpoints.restore(mgr, start, state, data_iter)

  repl = sharding.replicated(mesh)
  state = jax.device_put(state, repl)
  loss_kwargs = dict(
    stage=stage,
    train_mode=not frozen,
    pos_weight=(
      config.model.num_classes - 1.0
      if config.optim.pos_weight < 0
      else float(config.optim.pos_weight)
    ),
    gamma=config.optim.gamma,
    temp=config.optim.temp,
  )
  step_fn = jax.jit(
    functools.partial(train_step, model=model, tx=tx, **loss_kwargs),
    in_shardings=(repl, sharding.data_sharded(mesh)),
    out_shardings=(repl, repl),
    donate_argnums=(0,),
  )

  logger = _Log(workdir)
  first = int(state.step)
  if jax.process_index() == 0:
    n_train = sum(len(v) for k, v in groups.items() if k != 'frozen')
    log.info(
      'stage %s: %s; %d steps (%d per epoch), batch %d on %d devices',
      stage,
      origin,
      total,
      spe,
      config.input.batch_size,
      mesh.devices.size,
    )
    log.info(
      'stage %s trains %d parameter arrays (feature lr group: %s; classifier lr x%g: %s)'
      '; %d frozen',
      stage,
      n_train,
      groups['feature'],
      o.lr_classifier_ratio,
      groups['classifier'],
      len(groups['frozen']),
    )
    logger.write(
      dict(
        stage=stage,
        step=first,
        event='start',
        origin=origin,
        trainable=groups['feature'] + groups['classifier'],
        lr_groups={k: v for k, v in groups.items() if k != 'frozen'},
      )
    )

  bar = tqdm(
    total=total,
    initial=first,
    desc=f'{stage}',
    disable=jax.process_index() != 0,
    dynamic_ncols=True,
  )
  last_loss, t0, t_images = float('nan'), time.perf_counter(), 0
  step = first

  def check_finite(metrics, at):
    v = float(metrics['loss'])
    if not np.isfinite(v):
      raise FloatingPointError(
        f'stage {stage}: loss became {v} at step {at}; stopping. The last good checkpoint '
        f'(step {mgr.latest_step()}) is kept in {checkpoint_dir(workdir, stage)}'
      )
    return v

  metrics = None
  while step < total:
    batch = next(data_iter)  # endless sampler, see make_train_loader above
    gbatch = sharding.to_global({'image': batch['image'], 'label': batch['label']}, mesh)
    state, metrics = step_fn(state, gbatch)
    step += 1
    t_images += config.input.batch_size
    bar.update(1)
    if step % config.log_every_steps == 0 or step == total:
      last_loss = check_finite(metrics, step)
      dt = time.perf_counter() - t0
      rec = {k: float(v) for k, v in metrics.items()}
      rec.update(
        stage=stage,
        step=step,
        lr=float(schedules['feature'](step - 1)),
        lr_classifier=float(schedules['classifier'](step - 1)),
        images_per_s=t_images / max(dt, 1e-9),
      )
      logger.write(rec)
      bar.set_postfix(
        loss=f'{last_loss:.4f}', lr=f'{rec["lr"]:.2g}', img_s=f'{rec["images_per_s"]:.0f}'
      )
      t0, t_images = time.perf_counter(), 0
    if step % config.checkpoint.every_steps == 0 or step == total:
      last_loss = check_finite(metrics, step)
      checkpoints.save(mgr, step, jax.device_get(state), data_iter, meta)
  bar.close()
  if metrics is None and start is None:
    checkpoints.save(mgr, step, jax.device_get(state), data_iter, meta)
  return {'step': step, 'checkpoint_dir': checkpoint_dir(workdir, stage), 'loss': last_loss}


def evaluate_accuracy(
  config: ml_collections.ConfigDict,
  variables: dict,
  *,
  split: str | None = None,
  model=None,
  max_batches: int = 0,
) -> dict:
  """Top-1 of both heads on an eval split: {'softmax_top1': %, 'sigmoid_top1': %, 'num_images'}."""
  model = model or build_stage_model(config, 'dual')
  loader = data.make_eval_loader(
    config.input, split or config.input.eval_split, batch_size=config.eval.batch_size
  )
  fn = jax.jit(functools.partial(predict_step, model=model))
  correct = {'softmax': 0, 'sigmoid': 0}
  n = 0
  for i, batch in enumerate(loader):
    if max_batches and i >= max_batches:
      break
    out = fn(variables, jnp.asarray(batch['image']))
    valid = np.asarray(batch['valid'])
    for head in correct:
      pred = np.asarray(out[f'{head}_logits']).argmax(-1)
      correct[head] += int(((pred == batch['label']) & valid).sum())
    n += int(valid.sum())
  return {
    'softmax_top1': 100.0 * correct['softmax'] / n,
    'sigmoid_top1': 100.0 * correct['sigmoid'] / n,
    'num_images': n,
  }
