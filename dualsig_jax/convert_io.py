"""Files of the converter: reading torch state dicts, writing and reading converted checkpoints.

``load_state_dict`` reads ``.pth/.pt/.tar`` (weights only), ``.safetensors`` and ``.npz``;
``save_variables`` / ``load_variables`` write and read ``DIR/variables`` (Orbax) and
``read_checkpoint_info`` the ``DIR/conversion.json`` record next to it. ``dualsig_jax.convert``
re-exports all of them.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

BN_COUNTER = '.num_batches_tracked'


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


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Read ``.pth/.pt/.tar`` (``torch.load(weights_only=True)``), ``.safetensors`` or ``.npz``.

  Returns a flat ``{key: np.ndarray}`` (``'state_dict'`` wrapper and ``module.`` prefixes
  still present; ``dualsig_jax.convert.torch_to_flax`` removes them). Raises ``ValueError``
  for a pickle that needs arbitrary code to load, ``ImportError`` for a missing optional
  reader.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint not found: {path}')
  lower = path.lower()
  if lower.endswith('.npz'):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  if lower.endswith('.safetensors'):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError(
        f"reading {path} needs the 'safetensors' package "
        '(pip install safetensors), or convert it to .npz'
      ) from e
    return dict(load_file(path))
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
    raise ValueError(
      f'refusing to load {path}: it is a pickle that needs arbitrary code to load '
      f'(torch.load(weights_only=True) rejected it: {str(e).splitlines()[0]}). '
      "Re-save only tensors, e.g. torch.save({'state_dict': model.state_dict()}, f), "
      'or export to .safetensors/.npz.'
    ) from None
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state dict')
  return dict(obj)


def normalise_state_dict(state_dict: Mapping) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Unwrap ``{'state_dict': ...}``, strip ``module.``, split off BN counters.

  Returns ``({key: np.ndarray}, {bn counter key: int})``.
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
    out[key] = arr
  return out, counters


# ----------------------------------------------------------------------------- Orbax I/O
_INFO_KEYS = ('arch', 'family', 'num_classes', 'large_feature_map')


def check_target(directory: str, overwrite: bool) -> str:
  """``DIR/variables`` (absolute); ``FileExistsError`` if it exists and not ``overwrite``."""
  path = os.path.join(os.path.abspath(directory), 'variables')
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(
      f'{path} already exists; pass --overwrite (or overwrite=True) to replace it'
    )
  return path


def save_variables(
  variables: Mapping, directory: str, *, meta: Mapping | None = None, overwrite: bool = False
) -> str:
  """Write ``DIR/variables`` (Orbax StandardCheckpointer) and ``DIR/conversion.json``
  (``meta``, e.g. ``ConversionInfo.to_json()``). An existing ``DIR/variables`` is an error
  unless ``overwrite``. Returns the absolute ``DIR``."""
  import orbax.checkpoint as ocp

  path = check_target(directory, overwrite)
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  tree = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {}) or {}}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, tree, force=overwrite)
  ckptr.wait_until_finished()
  with open(os.path.join(directory, 'conversion.json'), 'w') as f:
    json.dump(dict(meta or {}), f, indent=2)
  return directory


def load_variables(directory: str) -> dict:
  """Read what :func:`save_variables` (or the CLI) wrote -> ``{'params', 'batch_stats'}``."""
  import orbax.checkpoint as ocp

  path = os.path.join(os.path.abspath(directory), 'variables')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no converted checkpoint at {path}')
  tree = ocp.StandardCheckpointer().restore(path)
  return {'params': tree['params'], 'batch_stats': tree.get('batch_stats', {}) or {}}


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
