"""What a resumed run checks and repairs in its workdir: the saved config and metrics.jsonl.

A workdir with checkpoints belongs to the config saved next to them (`config.json`): resuming
with another batch size or learning rate would silently mix two experiments, so only the
fields of `defaults.RESUME_SAFE_FIELDS` may change. metrics.jsonl is cut back to the step a
stage resumes from, so the records a killed run wrote after its last checkpoint are not
repeated. No JAX here (the entry points may call it before JAX starts).
"""

from __future__ import annotations

import json
import logging
import os
import time

import ml_collections

from dualsig_jax import defaults

log = logging.getLogger('dualsig_jax')

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'


class ConfigChangedError(ValueError):
  """A run resumes a workdir whose saved config differs in fields that must not change."""


def _flatten(tree, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_values(config: ml_collections.ConfigDict) -> dict:
  """Dotted field name -> value, as JSON stores it (tuples are lists)."""
  return _flatten(json.loads(config.to_json_best_effort()))


def is_resume_safe(name: str) -> bool:
  """Whether field `name` may differ on resume (a section name covers all its fields)."""
  return any(name == s or name.startswith(s + '.') for s in defaults.RESUME_SAFE_FIELDS)


def has_checkpoint(workdir: str) -> bool:
  """Whether any stage of `workdir` has a complete checkpoint step (a numeric folder)."""
  for stage in defaults.STAGES:
    d = os.path.join(workdir, stage, 'checkpoints')
    if os.path.isdir(d) and any(p.isdigit() for p in os.listdir(d)):
      return True
  return False


def _read_saved(path: str) -> dict | None:
  try:
    with open(path, encoding='utf-8') as f:
      return _flatten(json.load(f))
  except (OSError, ValueError) as e:
    log.warning('cannot read %s (%s): the config of this resume is not checked', path, e)
    return None


def _show(v) -> str:
  return json.dumps(v)


def check_and_write_config(
  config: ml_collections.ConfigDict, workdir: str, *, write: bool = True
) -> list[str]:
  """Refuses to resume `workdir` with a config that differs from its saved one in a field
  outside RESUME_SAFE_FIELDS; writes config.json when it is new or changed.

  On an accepted resume with changed (safe) fields the old file is kept as
  `config.<YYYYmmdd-HHMMSS>.json` and config.json becomes this run's config; an unchanged
  config is not rewritten. Without a checkpoint the workdir holds no run yet: config.json is
  simply written. `write`: False on processes other than 0 (they check, process 0 writes).

  Returns:
    The changed (safe) field names, [] for a new or unchanged run.
  Raises:
    ConfigChangedError naming every changed field (old -> new) and the fields that may change.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  new = config_values(config)
  changed: list[str] = []
  resuming = os.path.isfile(path) and has_checkpoint(workdir)
  old = _read_saved(path) if resuming else None
  if old is not None:
    common = sorted(set(old) & set(new))
    changed = [k for k in common if old[k] != new[k]]
    refused = [k for k in changed if not is_resume_safe(k)]
    if refused:
      detail = '; '.join(f'{k}: {_show(old[k])} -> {_show(new[k])}' for k in refused)
      safe = ', '.join(
        f'{s}.*' if isinstance(config.get(s, None), ml_collections.ConfigDict) else s
        for s in defaults.RESUME_SAFE_FIELDS
      )
      raise ConfigChangedError(
        f'{workdir} holds checkpoints of a run with another config ({path}); resuming it with '
        f'these changes would mix two experiments: {detail}. Use a fresh --workdir, or the '
        f'saved values. Fields that may change on resume: {safe}'
      )
    schema = sorted(set(old) ^ set(new))
    if schema:
      log.warning('%s and this config differ in which fields exist: %s', path, schema)
    if changed:
      log.info(
        'resuming %s with changed fields: %s',
        workdir,
        '; '.join(f'{k}: {_show(old[k])} -> {_show(new[k])}' for k in changed),
      )
    elif not schema:
      return []
  if write:
    os.makedirs(workdir, exist_ok=True)
    if resuming:
      os.replace(path, os.path.join(workdir, f'config.{time.strftime("%Y%m%d-%H%M%S")}.json'))
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, path)
  return changed


def truncate_metrics(path: str, stage: str, step: int) -> int:
  """Drops the records of `stage` after `step` from metrics.jsonl (and unreadable lines, such
  as one cut by a kill), rewriting the file atomically; returns how many lines were dropped.

  A stage that resumes from `step` writes those records again; without this a killed run's
  records between its last checkpoint and the kill would appear twice."""
  if not os.path.isfile(path):
    return 0
  keep, dropped = [], 0
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:
        dropped += 1
        continue
      if rec.get('stage') == stage and int(rec.get('step', 0)) > step:
        dropped += 1
        continue
      keep.append(line if line.endswith('\n') else line + '\n')
  if dropped:
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(keep)
    os.replace(tmp, path)
    log.info('%s: dropped %d records of stage %s after step %d', path, dropped, stage, step)
  return dropped
