"""What a resumed run checks and repairs in its workdir: the saved config and metrics.jsonl.

A workdir with checkpoints belongs to the config saved next to them (`config.json`): resuming
with another batch size or learning rate would silently mix two experiments, so only the
fields of `defaults.RESUME_SAFE_FIELDS` may change. metrics.jsonl is cut back to the step a
stage resumes from, so the records a killed run wrote after its last checkpoint are not
repeated. Every checkpoint step also records the config (`stage.model_record`): when
config.json is missing, unreadable or incomplete (a field it lacks cannot be checked), that copy
guards the resume, and with neither the resume is refused. No JAX here (the entry points may call it before JAX starts).
"""

from __future__ import annotations

import json
import logging
import os
import time

import ml_collections

from dualsig_jax import defaults
from dualsig_jax import workdir as workdir_lib

log = logging.getLogger('dualsig_jax')

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'


class ConfigChangedError(ValueError):
  """A run resumes a workdir whose saved config differs in fields that must not change."""


def _flatten(tree: dict, prefix: str = '') -> dict:
  """A config as JSON stores it (nested dicts) -> dotted field name -> value."""
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
  return any(workdir_lib.steps(workdir, stage) for stage in defaults.STAGES)


def _read_saved(path: str) -> tuple[dict | None, str]:
  """(flattened config.json, '') or (None, why it cannot be read)."""
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError('not a JSON object')
    return _flatten(saved), ''
  except FileNotFoundError:
    return None, 'it is missing'
  except (OSError, ValueError, UnicodeDecodeError) as e:
    return None, f'it is unreadable ({e})'


def saved_values(workdir: str) -> dict | None:
  """The workdir's config.json as dotted name -> value, or None when missing or unreadable."""
  return _read_saved(os.path.join(workdir, CONFIG_FILE))[0]


def checkpoint_config(workdir: str) -> tuple[dict | None, str]:
  """(config recorded in the newest checkpoint step that has one, where) or (None, '').

  Reads `<step>/meta/metadata` (the step's JSON record, see stage.model_record) as plain JSON.
  """
  found = []
  for stage in defaults.STAGES:
    for step in workdir_lib.steps(workdir, stage):
      found.append((step, stage))
  for step, stage in sorted(found, reverse=True):
    path = os.path.join(workdir_lib.checkpoint_dir(workdir, stage), str(step), 'meta', 'metadata')
    try:
      with open(path, encoding='utf-8') as f:
        record = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
      continue
    if isinstance(record, dict) and isinstance(record.get('config'), dict):
      return dict(record['config']), path
  return None, ''


# Fields every version of config.json held (a record without one of them is not a record).
_CORE_FIELDS = (
  'seed',
  'model.arch',
  'model.num_classes',
  'input.batch_size',
  'vanilla.lr',
  'dual.lr',
)


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
  resuming = has_checkpoint(workdir)
  old, lost = None, False
  if resuming:
    old, why = _read_saved(path)
    gaps = [] if old is None else [k for k in new if k not in old and not is_resume_safe(k)]
    if gaps:
      # A record that parses but lacks fields ({} or a hand-edited file) cannot vouch for
      # them: the checkpoint's own copy fills them in (config.json wins where both have one).
      recorded, where = checkpoint_config(workdir)
      if recorded is not None:
        if write:
          log.warning(
            '%s lacks %d fields (%s); checking this resume against the config recorded in %s',
            path,
            len(gaps),
            ', '.join(gaps[:6]) + (' ...' if len(gaps) > 6 else ''),
            where,
          )
        old = {**recorded, **old}
        lost = True
    if old is not None and any(k not in old for k in _CORE_FIELDS):
      # Fields every version recorded: without them it is no record of a run at all.
      old, why = None, f'it lacks {[k for k in _CORE_FIELDS if k not in old]}'
    if old is None:
      # Without config.json the checkpoint's own copy of the config guards the resume.
      old, where = checkpoint_config(workdir)
      if old is None:
        raise ConfigChangedError(
          f'{workdir} holds checkpoints, but its saved config {path} cannot be checked: {why}, '
          'and no checkpoint step records its config; resuming could mix two experiments. '
          'Restore config.json (a config.<time>.json next to it is an earlier one), or use a '
          'fresh --workdir'
        )
      if write:
        log.warning(
          '%s: %s; checking this resume against the config recorded in %s', path, why, where
        )
      path, lost = where, True
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
    # Logged by the writing call only (the entry point checks first with write=False).
    if schema and write:
      log.warning('%s and this config differ in which fields exist: %s', path, schema)
    if changed and write:
      log.info(
        'resuming %s with changed fields: %s',
        workdir,
        '; '.join(f'{k}: {_show(old[k])} -> {_show(new[k])}' for k in changed),
      )
    elif not schema and not lost:
      return []
  if write:
    os.makedirs(workdir, exist_ok=True)
    saved = os.path.join(workdir, CONFIG_FILE)
    if resuming and os.path.exists(saved):
      os.replace(saved, os.path.join(workdir, f'config.{time.strftime("%Y%m%d-%H%M%S")}.json'))
    tmp = saved + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, saved)
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
