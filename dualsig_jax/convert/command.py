"""The converter's command line: ``python -m dualsig_jax.convert --arch resnet50 [--family
standard] --torch_checkpoint FILE --num_classes N --output DIR``.

Writes ``DIR/variables`` (Orbax), ``DIR/conversion.json`` (arch, family, num_classes,
large_feature_map, ...; :func:`dualsig_jax.convert.save_variables` writes the same record) and
``DIR/checksums.json``. A user error (an unreadable or damaged file, a key that does not fit, an
existing output, an argument that is not a flag) is one line, exit 2.
"""

from __future__ import annotations

import os
import sys

from dualsig_jax.arguments import OneLineParser
from dualsig_jax.convert.files import check_target, load_state_dict, save_variables
from dualsig_jax.convert.to_flax import SOURCES, listing, torch_to_flax
from dualsig_jax.models.heads import FC2_INITS
from dualsig_jax.models.naming import FAMILIES, check_arch

__all__ = ['main', 'cli']


def _parser() -> OneLineParser:
  p = OneLineParser(
    prog='python -m dualsig_jax.convert', description='PyTorch -> Flax weight conversion.'
  )
  p.add_argument('--arch', required=True)
  p.add_argument('--family', default='cam', choices=FAMILIES)
  p.add_argument('--torch_checkpoint', required=True)
  p.add_argument('--num_classes', type=int, default=None)
  p.add_argument('--output', required=True)
  p.add_argument('--large_feature_map', action='store_true')
  p.add_argument('--source', default='auto', choices=SOURCES)
  p.add_argument('--fc2_init', default='init', choices=FC2_INITS)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--overwrite', action='store_true')
  return p


def main(argv=None) -> int:
  """The converter's command line (see the module doc); errors raise (see :func:`cli`)."""
  a = _parser().parse_args(argv)
  check_arch(a.arch)  # before reading a (large) file
  if not 0 <= a.seed < 2**63:  # an OverflowError deep in JAX otherwise
    raise ValueError(f'--seed must be an integer in [0, 2**63); got {a.seed}')
  check_target(a.output, a.overwrite)  # before the (slow) conversion
  sd = load_state_dict(a.torch_checkpoint)
  variables, info = torch_to_flax(
    sd,
    a.arch,
    family=a.family,
    num_classes=a.num_classes,
    large_feature_map=a.large_feature_map,
    source=a.source,
    fc2_init=a.fc2_init,
    rng=a.seed,
    return_info=True,
  )
  meta = info.to_json() | {'torch_checkpoint': os.path.abspath(a.torch_checkpoint)}
  save_variables(variables, a.output, meta=meta, overwrite=a.overwrite)
  print(
    f'{a.arch} ({a.family} family, {info.source} layout, {info.num_classes} classes, '
    f'large_feature_map={info.large_feature_map}) -> {a.output}'
  )
  if info.dropped:
    print(f'dropped {len(info.dropped)} keys: {listing(info.dropped)}')
  if info.initialised:
    print(f'initialised {len(info.initialised)} keys: {listing(info.initialised)}')
  for note in info.notes:
    print(f'note: {note}')
  print(f'fc2: {info.fc2}')
  return 0


# What a user can cause (a wrong path, arch, file or flag): one line, exit 2, as train.py does.
_USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, IsADirectoryError, ImportError)


def cli(argv=None) -> int:
  """``python -m dualsig_jax.convert``: :func:`main`, with user errors printed as one line
  (``error: ...``) and exit status 2 instead of a traceback."""
  try:
    return main(argv)
  except _USER_ERRORS as e:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    print(f'error: {lines[0]}', file=sys.stderr)
    raise SystemExit(2) from None
