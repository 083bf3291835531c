"""Files of the converter: reading torch state dicts, writing and reading converted checkpoints.

``load_state_dict`` reads ``.pth/.pt/.tar`` (weights only), ``.safetensors`` and ``.npz``;
``save_variables`` / ``load_variables`` write and read ``DIR/variables`` (Orbax) and
``read_checkpoint_info`` the ``DIR/conversion.json`` record next to it. ``dualsig_jax.convert``
re-exports them.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dualsig_jax.convert.integrity import (
  MANIFEST,
  check_finite,
  check_zip_crcs,
  verify_manifest,
  write_manifest,
)
from dualsig_jax.convert.layouts import BN_COUNTER, expected_keys


# ----------------------------------------------------------------------------- reading files
def _to_numpy(value: Any, key: str) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch
    import torch

    t = value.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
      t = t.float()
    return t.numpy()  # shares memory with the tensor: torch_to_flax copies what it keeps
  if isinstance(value, (np.ndarray, jax.Array, np.generic, int, float)):
    return np.asarray(value)
  raise ValueError(f'state dict entry {key!r} is a {type(value).__name__}, not a tensor')


def _last(e: BaseException) -> str:
  """A short description of a reader's error: its type and first line."""
  lines = [x for x in str(e).splitlines() if x.strip()]
  return f'{type(e).__name__}: {lines[0][:200]}' if lines else type(e).__name__


def _load_npz(path: str) -> dict[str, np.ndarray]:
  try:
    z = np.load(path, allow_pickle=False)
  except Exception as e:  # noqa: BLE001 (numpy raises several kinds on damaged files)
    raise ValueError(f'cannot read {path}: not a valid .npz file ({_last(e)})') from None
  if not isinstance(z, np.lib.npyio.NpzFile):  # a single array (.npy) under an .npz name
    raise ValueError(
      f'cannot read {path}: it holds one array (an .npy file), not named arrays; save the '
      'state dict with np.savez(path, **state_dict)'
    )
  with z:
    try:
      return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
      raise ValueError(f'cannot read {path}: a damaged .npz file ({_last(e)})') from None


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Read ``.pth/.pt/.tar`` (``torch.load(weights_only=True)``), ``.safetensors`` or ``.npz``.

  Returns a flat ``{key: np.ndarray}`` (``'state_dict'`` wrapper and ``module.`` prefixes
  still present; ``dualsig_jax.convert.torch_to_flax`` removes them). Raises ``ValueError``
  naming the file for a pickle that needs arbitrary code to load and for a file that is not
  what its name says (random bytes, an .npy renamed .npz), ``ImportError`` for a missing
  optional reader.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint not found: {path}')
  lower = path.lower()
  if lower.endswith('.npz'):
    check_zip_crcs(path)  # numpy checks a member's CRC only when it reads to its end
    return _load_npz(path)
  if lower.endswith('.safetensors'):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError(
        f"reading {path} needs the 'safetensors' package "
        '(pip install safetensors), or convert it to .npz'
      ) from e
    return dict(load_file(path))
  with open(path, 'rb') as f:
    magic = f.read(4)
  # torch.save writes a zip archive (PK..) or, before torch 1.6, a pickle (protocol >= 2: 0x80).
  if not (magic.startswith(b'PK\x03\x04') or magic[:1] == b'\x80'):
    raise ValueError(f'cannot read {path}: not a PyTorch checkpoint (neither a zip nor a pickle)')
  if magic.startswith(b'PK\x03\x04'):
    check_zip_crcs(path)  # torch's reader ignores the CRCs: a changed byte is another weight
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"reading {path} needs torch (pip install 'dualsig-jax[torch]'); "
      'or pass a .npz / .safetensors file'
    ) from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    if 'GLOBAL' not in str(e):  # damaged bytes, not a pickle asking to run code
      raise ValueError(f'cannot read {path}: a damaged PyTorch checkpoint ({_last(e)})') from None
    raise ValueError(
      f'refusing to load {path}: it is a pickle that needs arbitrary code to load '
      f'(torch.load(weights_only=True) rejected it: {str(e).splitlines()[0]}). '
      "Re-save only tensors, e.g. torch.save({'state_dict': model.state_dict()}, f), "
      'or export to .safetensors/.npz.'
    ) from None
  except Exception as e:  # noqa: BLE001 (torch raises anything on damaged bytes)
    raise ValueError(f'cannot read {path}: a damaged PyTorch checkpoint ({_last(e)})') from None
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state dict')
  return dict(obj)


def normalise_state_dict(state_dict: Mapping) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Unwrap ``{'state_dict': ...}``, strip ``module.``, split off BN counters.

  Returns ``({key: np.ndarray}, {bn counter key: int})``. A NaN or Inf value, and a weight
  stored as integers, are a ``ValueError`` naming the key: a diverged run's weights never train
  or explain anything, and integer weights lost their values.
  """
  if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], Mapping):
    state_dict = state_dict['state_dict']
  out, counters = {}, {}
  for key, value in state_dict.items():
    key = str(key)
    while key.startswith('module.'):
      key = key[len('module.') :]
    arr = _to_numpy(value, key)
    if key.endswith(BN_COUNTER):
      counters[key] = int(arr)
      continue
    if key in out:
      raise ValueError(f"duplicate key {key!r} after stripping 'module.' prefixes")
    if not np.issubdtype(arr.dtype, np.floating):
      # Weights stored as integers (or bools) lost their fractions when they were written.
      raise ValueError(
        f'state dict entry {key!r} is stored as {arr.dtype}, not as floating point: weights '
        'saved as integers have lost their values; save the float weights again'
      )
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
      bad = int(arr.size - np.isfinite(arr).sum())
      raise ValueError(
        f'state dict entry {key!r} holds {bad} non-finite value(s) (nan/inf); refusing to '
        'convert weights of a diverged or damaged model'
      )
    out[key] = arr
  return out, counters


# ----------------------------------------------------------------------------- Orbax I/O
_INFO_KEYS = ('arch', 'family', 'num_classes', 'large_feature_map')


def check_target(directory: str, overwrite: bool) -> str:
  """``DIR/variables`` (absolute); ``FileExistsError`` if it exists and not ``overwrite``,
  ``ValueError`` if ``DIR`` cannot be written (checked before a slow conversion: a scratch file
  is made and removed in its nearest existing folder; permission bits do not say it for root)."""
  import tempfile

  directory = os.path.abspath(directory)
  path = os.path.join(directory, 'variables')
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(
      f'{path} already exists; pass --overwrite (or overwrite=True) to replace it'
    )
  folder = directory
  while not os.path.isdir(folder):
    if os.path.exists(folder):
      raise ValueError(f'cannot write the output {directory}: {folder} is a file, not a folder')
    folder = os.path.dirname(folder)
  try:
    with tempfile.NamedTemporaryFile(dir=folder, prefix='.probe-'):
      pass
  except OSError as e:
    raise ValueError(
      f'cannot write the output {directory}: {folder} is not writable ({e.strerror or e}); '
      'name another --output'
    ) from None
  return path


def conversion_record(
  variables: Mapping,
  *,
  arch: str,
  family: str = 'cam',
  large_feature_map: bool = False,
) -> dict:
  """The four keys every ``conversion.json`` holds (arch, family, num_classes,
  large_feature_map), after checking that ``variables`` are those of that model (so the record
  cannot name another one). ``ValueError`` names the first array that does not fit."""
  from dualsig_jax.models import build_model  # late: models imports flax
  from dualsig_jax.models.naming import head_num_classes

  num_classes = head_num_classes(variables['params']['fc'])
  model = build_model(arch, num_classes, family=family, large_feature_map=large_feature_map)
  want = {(c, p): s for c, p, s in expected_keys(arch, model, family).values()}
  have = {}
  for coll in ('params', 'batch_stats'):
    for path, leaf in _leaves(variables.get(coll, {}) or {}):
      have[(coll, path)] = tuple(np.shape(leaf))
  for key in sorted(set(want) | set(have)):
    if want.get(key) != have.get(key):
      where = f'{key[0]}/{"/".join(key[1])}'
      raise ValueError(
        f'these variables are not those of {arch} ({family}, {num_classes} classes, '
        f'large_feature_map={large_feature_map}): {where} is {have.get(key, "missing")}, the '
        f'model has {want.get(key, "nothing")}; pass the arch / family / large_feature_map '
        'they were made for'
      )
  return dict(
    arch=arch, family=family, num_classes=num_classes, large_feature_map=bool(large_feature_map)
  )


def _leaves(tree: Mapping, prefix: tuple = ()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _leaves(v, prefix + (str(k),))
    else:
      yield prefix + (str(k),), v


def save_variables(
  variables: Mapping,
  directory: str,
  *,
  arch: str | None = None,
  family: str | None = None,
  large_feature_map: bool | None = None,
  meta: Mapping | None = None,
  overwrite: bool = False,
) -> str:
  """Write ``DIR/variables`` (Orbax StandardCheckpointer) and ``DIR/conversion.json``, the
  record the CLI writes: arch, family ('cam' unless given), num_classes (from the head) and
  large_feature_map (False unless given), plus ``meta`` (e.g. ``ConversionInfo.to_json()``,
  which may also supply those four). The record is checked against ``variables``
  (``ValueError`` if they are another model's, hold NaN / Inf, or no arch is given). An
  existing ``DIR/variables`` is an error unless ``overwrite``. ``DIR/checksums.json`` (sha256 of
  every file written) comes last; :func:`load_variables` verifies it. Returns the absolute
  ``DIR``."""
  import orbax.checkpoint as ocp

  meta = dict(meta or {})
  arch = arch if arch is not None else meta.get('arch')
  if arch is None:
    raise ValueError(
      "save_variables needs arch= (and family= / large_feature_map= when not 'cam' / False) "
      'to write the conversion record training and evaluation check'
    )
  family = family if family is not None else meta.get('family', 'cam')
  lfm = large_feature_map if large_feature_map is not None else meta.get('large_feature_map')
  record = conversion_record(variables, arch=arch, family=family, large_feature_map=bool(lfm))
  check_finite(variables, f'variables to save in {directory}')  # never write what no one reads
  path = check_target(directory, overwrite)
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  tree = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {}) or {}}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, tree, force=overwrite)
  ckptr.wait_until_finished()
  with open(os.path.join(directory, 'conversion.json'), 'w') as f:
    json.dump(meta | record | {'checksums': MANIFEST}, f, indent=2)
  write_manifest(directory)  # last: its presence says the output is complete
  return directory


def load_variables(directory: str) -> dict:
  """Read what :func:`save_variables` (or the CLI) wrote -> ``{'params', 'batch_stats'}``
  (nested dicts of float32 arrays).

  Every file is first checked against ``DIR/checksums.json`` (outputs of versions before it
  existed are read unverified), and every weight must be finite. Raises
  ``FileNotFoundError`` (no output there) or ``ValueError`` naming the damaged file or leaf.
  """
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  path = os.path.join(directory, 'variables')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no converted checkpoint at {path}')
  try:
    required = load_meta(directory).get('checksums') == MANIFEST
  except (OSError, ValueError, AttributeError):  # no record (or not ours): nothing promised
    required = os.path.isfile(os.path.join(directory, 'conversion.json'))
  verify_manifest(directory, required=required)
  try:
    tree = ocp.StandardCheckpointer().restore(path)
  except Exception as e:  # noqa: BLE001 (Orbax raises many kinds on damaged files)
    lines = str(e).strip().splitlines() or ['']
    raise ValueError(
      f'cannot read {path}: damaged or incomplete ({type(e).__name__}: {lines[0][:200]})'
    ) from None
  variables = {'params': tree['params'], 'batch_stats': tree.get('batch_stats', {}) or {}}
  check_finite(variables, path)
  return variables


def load_meta(directory: str) -> dict:
  """The ``conversion.json`` next to a converted checkpoint (arch, num_classes, ...)."""
  with open(os.path.join(directory, 'conversion.json')) as f:
    return json.load(f)


def read_checkpoint_info(path: str) -> dict:
  """What a converted checkpoint was made for: its ``conversion.json`` as a dict with at
  least ``arch``, ``family`` ('cam' | 'standard'), ``num_classes``, ``large_feature_map``.

  ``path``: the converter's output folder or its ``variables`` subfolder. ResNet50 and
  InceptionV3 weights have the same keys with and without ``large_feature_map``, so compare
  this record with the run's config. Files written before the standard family existed have
  no ``family``: they are 'cam'. Raises ``FileNotFoundError`` (no record) or ``ValueError``
  (a record without the keys above).
  """
  directory = os.path.abspath(path)
  if os.path.basename(directory.rstrip(os.sep)) == 'variables':
    directory = os.path.dirname(directory)
  record = os.path.join(directory, 'conversion.json')
  if not os.path.isfile(record):
    raise FileNotFoundError(
      f'no conversion record at {record} (not written by dualsig_jax.convert)'
    )
  info = load_meta(directory)
  info.setdefault('family', 'cam')
  lacking = [k for k in _INFO_KEYS if k not in info]
  if lacking:
    raise ValueError(f'{record} lacks {lacking}')
  return info
