"""The one lazy-export pattern of the package's `__init__` files.

A package lists names that resolve from a submodule on first use (to keep an import light:
matplotlib for plots, grain/JAX for loaders, the training loop for evaluation):

    __getattr__ = lazy.exports(__name__, {'save_cam_grid': 'plots'})

Import-light itself: importlib only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def exports(package: str, table: Mapping[str, str]) -> Callable[[str], object]:
  """A module-level `__getattr__` for `package`: `name` -> `package.<table[name]>.name`."""
  table = dict(table)

  def __getattr__(name: str):
    if name in table:
      return getattr(importlib.import_module(f'{package}.{table[name]}'), name)
    raise AttributeError(f'module {package!r} has no attribute {name!r}')

  return __getattr__
