"""Orbax checkpoints of a stage: train state, grain iterator state and a small JSON record.

Layout: `<workdir>/<stage>/checkpoints/<step>/{state,data,meta,checksums.json}`. The JSON
record names the experiment's model (arch, classes, shapes) so a workdir holding another
experiment's checkpoint is refused with a clear message instead of an opaque shape error.

A damaged step (a file truncated by a full disk or a copy cut short) is reported as damage,
naming the step folder and the file (`CheckpointCorruptError`), never as a model mismatch;
readers fall back to the newest readable step with a warning (`restore_newest`).

Each step also gets `checksums.json` (sha256 of every file of the step, written once the step is
complete): a file whose bytes changed at the same size, which no parser notices, is damage like
a truncated one. Steps written before the manifest existed (their record holds no config) are
read unverified; a step whose record holds the config but whose manifest is gone is damaged.

Saves may be asynchronous (`manager(async_save=True)`): `save` returns once the arrays and
the data position are copied to the host, Orbax writes the step into a temporary folder in the
background and renames it into place when complete, so a process killed mid-save leaves no
step folder that a reader would take (the previous complete step is read). `finish` waits for
the save in flight on every process and only then writes its manifest; the next `save`, and
the training loop on every exit path (including SIGTERM), call it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import grain.python as grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from dualsig_jax import checksums
from dualsig_jax.checksums import MANIFEST

log = logging.getLogger('dualsig_jax')

# The JSON files of a step (relative to the step folder) and the item folder each belongs to.
_JSON_FILES = (('meta', 'meta/metadata'), ('state', 'state/_METADATA'))


class CheckpointCorruptError(RuntimeError):
  """A checkpoint step cannot be read: a file is missing, truncated or damaged.

  Attributes: step_dir (the step folder, or the checkpoint folder when no step is readable),
  file (relative to step_dir, '' when unknown).
  """

  def __init__(self, message: str, *, step_dir: str = '', file: str = ''):
    super().__init__(message)
    self.step_dir = step_dir
    self.file = file


def _corrupt(step_dir: str, file: str, detail: str) -> CheckpointCorruptError:
  what = f'{file} in {step_dir}' if file else step_dir
  return CheckpointCorruptError(
    f'checkpoint {step_dir} is damaged (truncated or corrupt): cannot read {what}: {detail}',
    step_dir=step_dir,
    file=file,
  )


# Attributes this module keeps on a manager: whether it saves asynchronously, and the step of
# its save in flight (None when none).
_ASYNC, _PENDING = '_dualsig_async', '_dualsig_pending_step'


def manager(
  directory: str, *, max_to_keep: int, async_save: bool = False, writer: bool = False
) -> ocp.CheckpointManager:
  """An Orbax manager of a stage's checkpoint folder; `async_save`: saves write in the
  background (see the module docstring). `writer`: the training run that owns the folder,
  which removes the temporary folders of saves a killed process left half-written (a reader
  must not: they may be another process's saves in flight)."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    create=True,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=writer,
  )
  mgr = ocp.CheckpointManager(os.path.abspath(directory), options=options)
  setattr(mgr, _ASYNC, async_save)
  if writer and jax.process_index() == 0:
    _remove_orphan_marks(str(mgr.directory))
  return mgr


def _remove_orphan_marks(directory: str) -> None:
  """Removes `<step>.manifest-pending` marks whose step folder does not exist: a save killed
  before Orbax renamed its temporary folder into place (that folder is gone too). A mark next
  to an existing step is kept: it says the step was complete and only its manifest is missing."""
  for mark in glob.glob(os.path.join(glob.escape(directory), '*' + PENDING)):
    if not os.path.isdir(mark[: -len(PENDING)]):
      os.remove(mark)


def step_dir(mgr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mgr.directory), str(step))


PENDING = '.manifest-pending'  # next to a step folder while its manifest is not written yet


def _step_files(path: str):
  """Every file of the step folder `path` but its manifest (and the manifest's temporary)."""
  for dirpath, _, files in os.walk(path):
    for name in files:
      full = os.path.join(dirpath, name)
      if os.path.relpath(full, path) not in (MANIFEST, MANIFEST + '.tmp'):
        yield full


def write_manifest(path: str) -> None:
  """Writes `path/checksums.json` (atomically) for the complete step folder `path`."""
  checksums.write(path, checksums.digests(path, _step_files(path)))


def verify_manifest(path: str) -> bool:
  """Checks every file of the step folder `path` against its manifest.

  Returns False for a step without a manifest (written before manifests existed).
  Raises:
    CheckpointCorruptError naming the first file that is missing or whose bytes changed.
  """
  try:
    recorded = checksums.read(path)
  except ValueError as e:
    raise _corrupt(path, MANIFEST, f'the checksum manifest is unreadable ({e})') from e
  if recorded is None:
    return False
  diff = checksums.first_difference(recorded, checksums.digests(path, _step_files(path)))
  if diff is not None:
    rel, kind = diff
    detail = {
      'missing': 'the file is missing',
      'changed': 'its bytes differ from those saved (checksum mismatch)',
    }[kind]
    raise _corrupt(path, rel, detail)
  return True


def manifest_digest(path: str) -> str | None:
  """sha256 of the step folder `path`'s manifest (identifies the step's exact contents), or
  None when it has none."""
  try:
    return checksums.file_sha256(os.path.join(path, MANIFEST))
  except OSError:
    return None


class _DataPosition:
  """The data iterator's state captured when a save starts (the loop moves the iterator on
  while an asynchronous save is written)."""

  def __init__(self, data_iter):
    state = data_iter.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state).encode()

  def get_state(self) -> bytes:
    return self._state


def save(mgr: ocp.CheckpointManager, step: int, state, data_iter, meta: dict) -> None:
  """Saves one step (state, data iterator when given, JSON record) and its checksum manifest.

  With an async manager, returns while the files are written; `finish(mgr)` completes it.
  A previous save still in flight is finished first."""
  finish(mgr)
  items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  if data_iter is not None:
    items['data'] = grain.PyGrainCheckpointSave(_DataPosition(data_iter))
  # `<step>.manifest-pending` says a kill between Orbax's rename and the manifest is no damage.
  pending = step_dir(mgr, step) + PENDING
  if jax.process_index() == 0:
    open(pending, 'w').close()
  mgr.save(step, args=ocp.args.Composite(**items), force=True)
  setattr(mgr, _PENDING, step)
  if not getattr(mgr, _ASYNC, False):
    finish(mgr)


def finish(mgr: ocp.CheckpointManager) -> None:
  """Waits until the manager's save in flight is written on every process, then writes its
  checksum manifest (process 0). No-op without one. Every process must call it."""
  mgr.wait_until_finished()
  step = getattr(mgr, _PENDING, None)
  if step is None:
    return
  setattr(mgr, _PENDING, None)
  # The step folder is complete (renamed into place): every process's files are in it.
  if jax.process_index() == 0:
    write_manifest(step_dir(mgr, step))
    os.remove(step_dir(mgr, step) + PENDING)


def _short(e: BaseException) -> str:
  """The first line of an error, without TensorStore's multi-kilobyte spec dump."""
  text = str(e).split(' [tensorstore_spec=', 1)[0].strip().splitlines()
  return f'{type(e).__name__}: {text[0] if text else ""}'


def _culprit(e: BaseException, where: str) -> str:
  """The file of `where` that an Orbax / TensorStore error names (relative), or ''."""
  text = ' '.join(str(x) for x in (e, e.__cause__, e.__context__) if x is not None)
  root = os.path.abspath(where).rstrip('/') + '/'
  files = [f for f in re.findall(r'local file "([^"]+)"', text) if f.startswith(root)]
  if not files:
    return ''
  path = max(files, key=len)  # the most specific one (a manifest rather than its folder)
  rel = path[len(root) :] or '.'
  array = re.search(r'Error reading "([^"/]+)', text)
  if rel.endswith('/') and array:
    return f'{rel} (data of {array.group(1)})'
  return rel


def _records_config(path: str) -> bool:
  """Whether the step's JSON record holds the run's config (this version's steps, which all
  get a manifest); False for older steps or an unreadable record (parsed and named later)."""
  try:
    with open(os.path.join(path, 'meta', 'metadata'), encoding='utf-8') as f:
      return isinstance(json.load(f).get('config'), dict)
  except (OSError, ValueError, UnicodeDecodeError, AttributeError):
    return False


def check_files(path: str, *, data: bool, verify: bool = True) -> None:
  """Checks the files of the step folder `path` against its checksum manifest (`verify`), then
  parses its JSON files (names the broken file in both cases).

  Raises:
    CheckpointCorruptError: a file's bytes differ from the manifest, the state folder is
      missing, or a JSON file (the model record, Orbax's tree metadata, the grain iterator
      state when `data`) is missing or unparsable.
  """
  if not os.path.isdir(os.path.join(path, 'state')):
    raise _corrupt(path, 'state', 'the folder is missing')
  if (
    verify
    and not verify_manifest(path)
    and _records_config(path)
    and not os.path.exists(path.rstrip('/') + PENDING)
  ):
    # Every step whose record holds the config was written with a manifest (or left a pending
    # mark when killed before it): one without either is damage, not a pre-manifest step.
    raise _corrupt(
      path, MANIFEST, 'the checksum manifest is missing, so its arrays cannot be verified'
    )
  files = [f for item, f in _JSON_FILES if os.path.isdir(os.path.join(path, item))]
  if data:
    found = sorted(glob.glob(os.path.join(path, 'data', '*.json')))
    if not found:
      raise _corrupt(path, 'data', 'the data loader state is missing')
    files += [os.path.relpath(f, path) for f in found]
  for rel in files:
    full = os.path.join(path, rel)
    if not os.path.isfile(full):
      raise _corrupt(path, rel, 'the file is missing')
    try:
      with open(full, encoding='utf-8') as f:
        json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
      size = os.path.getsize(full)
      raise _corrupt(path, rel, f'not valid JSON ({size} bytes; {e})') from e


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
  """The step's JSON record of its model ({} for checkpoints written before it existed)."""
  path = step_dir(mgr, step)
  if not os.path.isdir(os.path.join(path, 'meta')):
    return {}
  check_files(path, data=False, verify=False)  # the callers verify the step once
  return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def check_compatible(meta: dict, expected: dict, where: str) -> None:
  """Raises ValueError when a checkpoint was written by an experiment with another model."""
  for key in ('arch', 'num_classes', 'stage', 'family', 'large_feature_map'):
    if key in expected and key in meta and meta[key] != expected[key]:
      raise ValueError(
        f'{where} holds a checkpoint of another experiment: its {key} is {meta.get(key)!r}, '
        f'this config asks for {expected[key]!r}. Use a fresh --workdir or remove it.'
      )


# Orbax's value types of empty tree nodes (orbax/checkpoint/_src/metadata/empty_values.py).
_EMPTY_TYPES = ('None', 'Dict', 'List', 'Tuple', 'NamedTuple')


def _tree_names(path: str) -> set[str]:
  """Leaf names ('params/fc/kernel') recorded in a state item's Orbax tree metadata."""
  with open(os.path.join(path, 'state', '_METADATA'), encoding='utf-8') as f:
    tree = json.load(f).get('tree_metadata', {})
  out = set()
  for entry in tree.values():
    # Empty nodes (optax's masked-out leaves, an empty batch_stats) are no arrays.
    if entry.get('value_metadata', {}).get('value_type') in _EMPTY_TYPES:
      continue
    out.add('/'.join(str(k.get('key')) for k in entry.get('key_metadata', ())))
  return out


def _path_name(path) -> str:
  def one(k):
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)

  return '/'.join(one(k) for k in path)


def _target_names(target) -> set[str]:
  return {_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]}


def restore(
  mgr: ocp.CheckpointManager, step: int, target_state, data_iter=None, expected: dict | None = None
) -> Any:
  """Restores (state, meta) at `step` into the structure of `target_state`; the data iterator,
  when given, is restored in place.

  Raises:
    ValueError: the checkpoint is of another experiment (its record differs from `expected`,
      or its arrays do not fit `target_state`).
    CheckpointCorruptError: a file of the step is missing or damaged.
  """
  path = step_dir(mgr, step)
  where = str(mgr.directory)
  check_files(path, data=data_iter is not None)
  meta = read_meta(mgr, step)
  if expected is not None:
    check_compatible(meta, expected, where)
  have, want = _tree_names(path), _target_names(target_state)
  if have and have != want:
    diff = sorted(have ^ want)[:4]
    raise ValueError(
      f'cannot restore step {step} from {where}: the checkpoint does not match this '
      f"experiment's model (arrays only in one of them: {diff}). Use a fresh --workdir."
    )
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  try:
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  except Exception as e:  # noqa: BLE001 (classified below)
    try:  # readable without the target: the arrays are intact but do not fit the model
      mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    except Exception:  # noqa: BLE001
      raise _corrupt(path, _culprit(e, path), _short(e)) from e
    raise ValueError(
      f'cannot restore step {step} from {where}: the checkpoint does not match this '
      f"experiment's model ({_short(e)})"
    ) from e
  # Orbax restores arrays at their saved shape whatever the target says: compare them here.
  flat = jax.tree_util.tree_flatten_with_path
  got = {_path_name(p): np.shape(v) for p, v in flat(state['state'])[0]}
  for p, v in flat(target_state)[0]:
    name = _path_name(p)
    if got.get(name) != np.shape(v):
      raise ValueError(
        f'cannot restore step {step} from {where}: the checkpoint does not match this '
        f"experiment's model ({name} has shape {got.get(name)} there, {np.shape(v)} here). "
        'Use a fresh --workdir.'
      )
  if data_iter is not None:
    try:
      if hasattr(data_iter, 'load_state_dir'):  # the train loader: any process count
        data_iter.load_state_dir(os.path.join(path, 'data'), step=step)
      else:
        mgr.restore(step, args=ocp.args.Composite(data=grain.PyGrainCheckpointRestore(data_iter)))
    except Exception as e:  # noqa: BLE001 (the JSON parsed: the loader refuses its content)
      raise ValueError(
        f'cannot restore the data loader state of step {step} from {where}: it does not match '
        f"this config's input pipeline ({_short(e)}); resume with the input settings of the "
        'run that wrote it (its config.json)'
      ) from e
  return state['state'], meta


def restore_newest(mgr: ocp.CheckpointManager, fn: Callable[[int], Any]) -> tuple:
  """`fn(step)` on the newest step it can read: (step, fn's result, skipped step folders).

  A step whose `fn` raises CheckpointCorruptError is skipped with a WARNING naming it; other
  errors (a real model mismatch) propagate at once. (None, None, []) when there is no step.

  Raises:
    CheckpointCorruptError: every kept step is damaged (the message lists each).
  """
  problems = []
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      return step, fn(step), [p.step_dir for p in problems]
    except CheckpointCorruptError as e:
      log.warning('%s; trying the previous kept step', e)
      problems.append(e)
  if problems:
    raise CheckpointCorruptError(
      f'no readable checkpoint in {mgr.directory}: every kept step is damaged ('
      + '; '.join(str(p) for p in problems)
      + '). Restore the files from a backup, or remove the folder to start this stage over.',
      step_dir=str(mgr.directory),
    )
  return None, None, []


def set_aside(mgr: ocp.CheckpointManager, step_dirs: list[str]) -> None:
  """Renames damaged step folders to `<step>.unreadable-<time>` (kept for inspection) so a
  resumed run can write those steps again; Orbax ignores the renamed folders."""
  if jax.process_index() == 0:
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for d in step_dirs:
      os.rename(d, f'{d}.unreadable-{stamp}')
      log.warning('moved the damaged checkpoint %s to %s.unreadable-%s', d, d, stamp)
  mgr.reload()


def restore_variables(path: str) -> tuple[dict, dict]:
  """{'params', 'batch_stats'} of any checkpoint kind, and what it records of its model.

  `path` is a stage's checkpoint folder (`<workdir>/<stage>/checkpoints`, newest readable
  step: a damaged newer step is skipped with a warning) or a folder written by the converter
  (`python -m dualsig_jax.convert`). The record (arch, family, num_classes, large_feature_map,
  where known) is {} for checkpoints that predate it.

  Raises:
    FileNotFoundError: no such folder. CheckpointCorruptError: no step is readable.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no checkpoint at {path}')
  mgr = manager(path, max_to_keep=10)
  if mgr.latest_step() is None:
    # Weights converted from PyTorch: DIR/variables (+ the converter's record).
    from dualsig_jax import convert

    info_fn = getattr(convert, 'read_checkpoint_info', None)
    info = info_fn(path) if info_fn is not None else {}
    return convert.load_variables(path), dict(info or {})

  def read(step):
    where = step_dir(mgr, step)
    check_files(where, data=False)
    info = read_meta(mgr, step)
    try:
      args = ocp.args.Composite(state=ocp.args.StandardRestore())
      restored = mgr.restore(step, args=args)['state']
    except Exception as e:  # noqa: BLE001 (no target: any failure is a damaged file)
      raise _corrupt(where, _culprit(e, where), _short(e)) from e
    variables = {'params': restored['params'], 'batch_stats': restored.get('batch_stats', {})}
    from dualsig_jax.convert.integrity import check_finite  # every reader refuses NaN / Inf

    check_finite(variables, where)  # ValueError: a diverged run, not a damaged file to skip
    return variables, {**info, 'step': int(step)}

  _, (variables, info), _ = restore_newest(mgr, read)
  return variables, info
