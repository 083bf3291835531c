"""What makes a converter's input or output trusted: the archive's own CRCs, a checksum manifest,
float dtypes and finite weights.

- A ``.pth`` written by ``torch.save`` is a zip archive whose members carry CRC-32s, but torch's
  reader does not check them: a byte changed inside a tensor is read as another number (a weight
  of 3.6e37). :func:`check_zip_crcs` checks every member first.
- A converter output (``DIR/variables`` + ``DIR/conversion.json``) gets ``DIR/checksums.json``,
  the sha256 of every file, as stage checkpoints do (:func:`write_manifest`); readers verify it
  (:func:`verify_manifest`). An output whose record says it was written with a manifest and has
  none is damaged, not trusted; outputs of versions before manifests are read unverified.
- Every reader of weights refuses NaN / Inf (:func:`check_finite`): a diverged or damaged model
  never trains or explains anything.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping

import numpy as np

from dualsig_jax import checksums
from dualsig_jax.checksums import MANIFEST

__all__ = ['MANIFEST', 'check_zip_crcs', 'write_manifest', 'verify_manifest', 'check_finite']


def check_zip_crcs(path: str) -> None:
  """``ValueError`` naming the member when a zip archive (a ``.pth`` of ``torch.save``, an
  ``.npz``) is damaged: a member whose bytes do not match its CRC-32, or a broken directory.
  Reads the whole file once."""
  try:
    with zipfile.ZipFile(path) as z:
      bad = z.testzip()
  except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
    raise ValueError(f'cannot read {path}: a damaged zip archive ({e})') from None
  except Exception as e:  # noqa: BLE001 (zipfile raises other kinds on garbled headers)
    raise ValueError(
      f'cannot read {path}: a damaged zip archive ({type(e).__name__}: {e})'
    ) from None
  if bad is not None:
    raise ValueError(
      f'cannot read {path}: it is damaged ({bad!r} does not match its CRC-32: bytes changed '
      'after it was saved); use an intact copy'
    )


# What the converter writes into its output folder (a user's other files there are not ours).
_MEMBERS = ('variables', 'conversion.json')


def _files(directory: str):
  for member in _MEMBERS:
    top = os.path.join(directory, member)
    if os.path.isfile(top):
      yield top
    for dirpath, _, files in os.walk(top):
      for name in files:
        yield os.path.join(dirpath, name)


def write_manifest(directory: str) -> str:
  """Writes ``directory/checksums.json`` (``{'sha256': {file: digest}}``, atomically) for the
  complete output folder ``directory`` (``variables/`` and ``conversion.json``); returns its
  path."""
  return checksums.write(directory, checksums.digests(directory, _files(directory)))


def verify_manifest(directory: str, *, required: bool) -> bool:
  """Checks every file of the converter output ``directory`` against its manifest.

  ``required``: the output's record says a manifest was written (a missing one is then damage).
  Returns False when there is none and none is required (an output of an older version).
  Raises ``ValueError`` naming the first file that is missing, added to ``variables``, or whose
  bytes changed, and for a missing or unreadable manifest that is required.
  """
  try:
    recorded = checksums.read(directory)
  except ValueError as e:
    raise ValueError(f'{directory} is damaged: {MANIFEST} is unreadable ({e})') from None
  if recorded is None:
    if required:
      raise ValueError(
        f'{directory} is damaged: its checksum manifest {MANIFEST} is missing (its '
        'conversion.json says one was written); convert the PyTorch checkpoint again'
      )
    return False
  actual = checksums.digests(directory, _files(directory))
  diff = checksums.first_difference(recorded, actual)
  if diff is not None:
    rel, kind = diff
    if kind == 'missing':
      raise ValueError(f'{directory} is damaged: {rel} is missing; convert it again')
    raise ValueError(
      f'{directory} is damaged: the bytes of {rel} differ from those written (checksum '
      'mismatch); convert it again'
    )
  added = sorted(r for r in actual if r not in recorded and r.startswith('variables' + os.sep))
  if added:
    raise ValueError(f'{directory} is damaged: {added[0]} was not written by the converter')
  return True


def _leaves(tree, prefix: tuple = ()):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _leaves(v, prefix + (str(k),))
  else:
    yield prefix, tree


def check_finite(variables: Mapping, where: str) -> None:
  """``ValueError`` naming the first leaf of ``variables`` (``{'params', 'batch_stats'}``, any
  nesting of arrays) that holds NaN or Inf, and how many; ``where``: the file or folder read."""
  for path, leaf in _leaves(variables):
    arr = np.asarray(leaf)
    if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
      bad = int(arr.size - np.isfinite(arr).sum())
      raise ValueError(
        f'{where}: {"/".join(path)} holds {bad} non-finite value(s) (nan/inf): the weights '
        'are damaged or come from a diverged run; use an intact checkpoint'
      )
