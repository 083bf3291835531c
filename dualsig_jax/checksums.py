"""sha256 manifests (`checksums.json`) of a folder's files: how stage checkpoints and converter
outputs find bytes that changed at the same size, which no parser notices.

The folder's owner chooses which files count and how damage is reported (a
`CheckpointCorruptError`, a converter's `ValueError`); this module hashes, writes, reads and
compares, once for both.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

MANIFEST = 'checksums.json'


def file_sha256(path: str) -> str:
  """sha256 hex digest of the file at `path`, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def digests(root: str, files: Iterable[str]) -> dict[str, str]:
  """{path relative to `root`: sha256 hex} of `files` (paths under `root`)."""
  return {os.path.relpath(full, root): file_sha256(full) for full in files}


def write(root: str, recorded: dict[str, str]) -> str:
  """Writes `root/checksums.json` as `{'sha256': recorded}`, atomically (a reader sees the old
  manifest or the whole new one); returns its path."""
  path = os.path.join(root, MANIFEST)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump({'sha256': recorded}, f, indent=0, sort_keys=True)
  os.replace(path + '.tmp', path)
  return path


def read(root: str) -> dict[str, str] | None:
  """The digests recorded in `root/checksums.json`; None when there is no manifest.

  Raises:
    ValueError: the manifest exists but cannot be read or parsed (the message says why).
  """
  path = os.path.join(root, MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      recorded = dict(json.load(f)['sha256'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{type(e).__name__}: {e}') from None
  return recorded


def first_difference(recorded: dict[str, str], actual: dict[str, str]) -> tuple[str, str] | None:
  """The first recorded file (in sorted order) that is `'missing'` from `actual` or whose
  digest `'changed'`, as `(relative path, kind)`; None when every recorded file matches.
  Files in `actual` but not recorded are the caller's to judge."""
  for rel in sorted(recorded):
    if rel not in actual:
      return rel, 'missing'
    if actual[rel] != recorded[rel]:
      return rel, 'changed'
  return None
