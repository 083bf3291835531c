"""Where split metadata lives: the copy shipped with the package, or a user's folder.

Light on purpose (os and importlib only): the entry points' preflight check reads it before
JAX or grain are imported.
"""

from __future__ import annotations

import importlib.util
import os

# Config values (input.metadata_root) that name the shipped copy.
SHIPPED_NAMES = ('', 'metadata', 'metadata/')
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _find_shipped() -> str | None:
  # The wsolevaluation metadata is package data of `dualsig_jax.metadata` (pyproject maps the
  # repository's top-level metadata/ folder there), so it is found after `pip install .` and
  # from any working directory. A source checkout that is not installed (or was installed in
  # editable mode before the mapping existed) has no such package: use its metadata/ folder.
  spec = importlib.util.find_spec('dualsig_jax.metadata')
  for loc in (spec.submodule_search_locations or []) if spec else []:
    if os.path.isdir(os.path.join(loc, 'CUB')):
      return os.path.abspath(loc)
  if os.path.isfile(os.path.join(_REPO, 'pyproject.toml')) and os.path.isdir(
    os.path.join(_REPO, 'metadata', 'CUB')
  ):
    return os.path.join(_REPO, 'metadata')
  return None


SHIPPED_METADATA = _find_shipped() or os.path.join(_REPO, 'metadata')


def shipped_metadata_root() -> str:
  """Absolute path of the wsolevaluation metadata shipped with the package.

  Raises:
    FileNotFoundError when the installation lacks it.
  """
  found = _find_shipped()
  if found is None:
    raise FileNotFoundError(
      'the wsolevaluation metadata shipped with dualsig_jax is missing from this installation '
      '(expected the package data folder dualsig_jax/metadata); reinstall with `pip install .`'
    )
  return found


def resolve_metadata_root(metadata_root: str) -> str:
  """``input.metadata_root`` -> the folder to read.

  ``''`` or ``'metadata'`` mean the metadata shipped with the package (found whatever the
  working directory, also after a non-editable install). Any other path is the user's, used as
  given (a relative path is relative to the working directory; write ``./metadata`` for a
  folder named ``metadata`` there) and must exist.

  Raises:
    FileNotFoundError naming the path and the working directory.
  """
  if metadata_root is None or metadata_root in SHIPPED_NAMES:
    return shipped_metadata_root()
  if not os.path.isdir(metadata_root):
    raise FileNotFoundError(
      f'input.metadata_root {metadata_root!r} does not exist (relative paths are resolved '
      f"against the working directory {os.getcwd()}); use 'metadata' (or '') for the metadata "
      'shipped with dualsig_jax'
    )
  return metadata_root


def split_metadata_dir(input_cfg, split: str) -> str:
  """`<metadata root>/<dataset>/<split>` for `config.input` (never raises: preflight lists).

  `input.metadata_root` 'metadata' (or '') is the shipped copy; SYNTH defaults to
  `<data_root>/metadata`. A user folder that lacks a split falls back to the shipped copy of
  that split, so `make_metadata --out MY --split train` for ILSVRC plus the shipped test split
  work with `metadata_root=MY`.
  """
  name = input_cfg['dataset_name']
  root = input_cfg.get('metadata_root') or ''
  if name == 'SYNTH' and root in SHIPPED_NAMES:
    return os.path.join(input_cfg['data_root'], 'metadata', name, split)
  if root in SHIPPED_NAMES:
    return os.path.join(SHIPPED_METADATA, name, split)
  mine = os.path.join(root, name, split)
  shipped = os.path.join(SHIPPED_METADATA, name, split)
  if not os.path.isdir(mine) and os.path.isdir(shipped):
    return shipped
  return mine
