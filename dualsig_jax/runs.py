"""A trained run, opened in Python: ``load_run(path) -> (model, variables)`` for ``cam.explain``.

It lives above ``models`` and ``train`` (it reads checkpoints through ``train.stage`` and
eval.py's warnings in ``evaluate``, which both import ``models``), so it is a top-level module
and not part of ``models``: ``from dualsig_jax import runs; runs.load_run(...)``.

``path`` is what a user has after training or converting: a workdir of ``train.py`` (its newest
dual-stage step), one stage's checkpoint folder (``<workdir>/<stage>/checkpoints``) or a
converter output (``python -m dualsig_jax.convert``). The checks are eval.py ``--checkpoint``'s
own (``train.stage.load_dual_checkpoint``: the record against the config, the arrays against the
model, the sigmoid head present); only finding the config is added here.
"""

from __future__ import annotations

import json
import os

import ml_collections

from dualsig_jax.train import resume  # no JAX: config.json's name and reading

_CONVERSION_FILE = 'conversion.json'
# Which recorded fields rebuild the model when no config is given (the rest keep their defaults,
# which the model does not read).
_MODEL_FIELDS = ('arch', 'family', 'num_classes', 'large_feature_map', 'dtype', 'dropout_rate')


def _locate(path: str) -> tuple[str, str | None]:
  """(checkpoint folder, workdir or None) for a workdir, a stage checkpoint folder or a
  converter output; FileNotFoundError naming what was looked for."""
  from dualsig_jax import workdir as workdir_lib

  if not os.path.isdir(path):
    raise FileNotFoundError(
      f'no run at {path}: give a workdir, a checkpoint folder or a converter output'
    )
  dual = workdir_lib.checkpoint_dir(path, 'dual')
  if os.path.isdir(dual):
    return dual, path
  if os.path.isdir(workdir_lib.checkpoint_dir(path, 'vanilla')):
    raise ValueError(
      f'{path} has a vanilla stage but no dual stage (no {dual}): it has no sigmoid head yet; '
      'finish train.py on it (its dual stage trains the sigmoid head)'
    )
  if workdir_lib.folder_steps(path):  # <workdir>/<stage>/checkpoints
    parent = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return path, parent if os.path.isfile(os.path.join(parent, resume.CONFIG_FILE)) else None
  if os.path.isdir(os.path.join(path, 'variables')):
    return path, None
  raise FileNotFoundError(
    f'{path} is neither a workdir (no dual/checkpoints), a checkpoint folder (no numbered '
    'steps) nor a converter output (no variables/); give one of those'
  )


def _newest_step_record(checkpoint: str) -> dict:
  """The JSON record (stage.model_record) of the newest step of a checkpoint folder that has
  a readable one, read as plain JSON (the arrays are read once, by load_dual_checkpoint)."""
  from dualsig_jax import workdir as workdir_lib

  for step in reversed(workdir_lib.folder_steps(checkpoint)):
    try:
      with open(os.path.join(checkpoint, str(step), 'meta', 'metadata'), encoding='utf-8') as f:
        record = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
      continue
    if isinstance(record, dict):
      return record
  return {}


def _recorded_values(checkpoint: str, workdir: str | None) -> tuple[dict, str]:
  """(dotted config values the run recorded, where): the workdir's config.json, else the newest
  step's record, else the converter's conversion.json (model fields only)."""
  if workdir is not None:
    saved = resume.saved_values(workdir)  # None when lost: the checkpoint's own record below
    if saved is not None:
      return saved, os.path.join(workdir, resume.CONFIG_FILE)
  conversion = os.path.join(checkpoint, _CONVERSION_FILE)
  if os.path.isfile(conversion):
    with open(conversion, encoding='utf-8') as f:
      rec = json.load(f)
    rec.setdefault('family', 'cam')  # records older than the standard family
    return {f'model.{k}': rec[k] for k in _MODEL_FIELDS if k in rec}, conversion
  info = _newest_step_record(checkpoint)
  values = dict(info.get('config') or {})
  for k in _MODEL_FIELDS:
    if k in info and info[k] is not None:
      values[f'model.{k}'] = info[k]
  return values, checkpoint


def config_of_run(path: str) -> ml_collections.ConfigDict:
  """The locked config a run was trained with, rebuilt from what it recorded (see
  :func:`load_run`); fields it did not record keep ``defaults.base_config()``'s values.

  Raises ValueError when the run recorded no model (a checkpoint that predates records: pass
  ``config=`` to :func:`load_run`)."""
  from dualsig_jax import defaults

  checkpoint, workdir = _locate(path)
  values, where = _recorded_values(checkpoint, workdir)
  if 'model.arch' not in values:
    raise ValueError(
      f'{where} records no model (arch, num_classes): pass config= to load_run, e.g. '
      'get_config() of the configs/*.py file it was trained with'
    )
  config = defaults.base_config()
  known = set(defaults.field_names(config))
  for name, value in values.items():
    if name not in known:
      continue  # a field of another version of the project
    *sections, field = name.split('.')
    holder = config
    for part in sections:
      holder = holder[part]
    if isinstance(holder[field], tuple) and isinstance(value, list):
      value = tuple(value)
    holder[field] = value
  config.lock()
  return config


def load_run(path: str, *, config: ml_collections.ConfigDict | None = None):
  """Open a trained run for ``cam.explain``: ``(model, variables)``.

  Args:
    path: a ``train.py`` workdir (its newest readable dual-stage step), a stage's checkpoint
      folder (``<workdir>/dual/checkpoints``) or a converter output folder.
    config: the run's config (e.g. ``configs/synthetic.py``'s ``get_config()``); default: the
      config the run recorded (``<workdir>/config.json``, else the checkpoint's record, else the
      converter's ``conversion.json``).
  Returns:
    ``model``: the dual-branch model (``frozen_backbone=False``: same parameters, but gradients
    flow from either head down to any layer, which ``cam.explain`` needs; ``apply(variables,
    x [B, H, W, 3] float32, train=False)`` -> ``{'features', 'softmax_logits' [B, K],
    'sigmoid_logits' [B, K]}``). ``variables``: ``{'params', 'batch_stats'}`` float32 arrays.
  Raises:
    FileNotFoundError: no run there. CheckpointCorruptError: no readable step. ValueError: the
    checkpoint belongs to another model than ``config`` (names the field), has no sigmoid head,
    or records no model and no ``config`` was given. A workdir whose dual stage is unfinished or
    stale is opened with a warning, as eval.py does.
  """
  from dualsig_jax import models
  from dualsig_jax.train import stage

  checkpoint, workdir = _locate(path)
  config = config_of_run(path) if config is None else config
  variables, info = stage.load_dual_checkpoint(config, checkpoint)
  if workdir is not None and checkpoint == stage.checkpoint_dir(workdir, 'dual'):
    from dualsig_jax import evaluate  # eval.py's warnings on an unfinished or stale dual stage

    evaluate.dual_progress(config, workdir, info.get('step'))
  m = config.model
  model = models.build_model(
    m.arch,
    m.num_classes,
    family=m.family,
    large_feature_map=m.large_feature_map,
    dtype=stage.COMPUTE_DTYPES[m.dtype],
    frozen_backbone=False,
    dropout_rate=m.dropout_rate,
  )
  return model, variables
