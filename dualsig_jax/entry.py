"""What `train.py` and `eval.py` share: flag parsing with one-line errors, and the preflight.

A mistyped override (`--config.optim.bogus=1`) is one line naming the field and the closest
valid names, not ml_collections' triple traceback; missing data or checkpoints are one message
(dualsig_jax.preflight) printed before JAX is imported.
"""

from __future__ import annotations

import importlib.util
import re
import sys

from absl import flags

from dualsig_jax import arguments, defaults, preflight

_OVERRIDE = re.compile(r'^--?config\.([A-Za-z0-9_.]+)(=.*)?$')


def _load_config_file(spec: str):
  path, _, arg = spec.partition(':')
  mod_spec = importlib.util.spec_from_file_location('_user_config', path)
  if mod_spec is None:
    raise FileNotFoundError(path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _config_spec(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def explain_bad_override(argv: list[str]) -> str | None:
  """One line naming the first `--config.X` override that names no field, or None."""
  spec = _config_spec(argv)
  if not spec:
    return None
  try:
    config = _load_config_file(spec)
  except Exception as e:  # the config file itself is broken: its own error says more
    return f'error: cannot load config {spec}: {type(e).__name__}: {e}'
  names = set(defaults.field_names(config))
  sections = {n.rsplit('.', 1)[0] for n in names if '.' in n}
  for a in argv:
    m = _OVERRIDE.match(a)
    if not m:
      continue
    name = m.group(1)
    if name in names or name in sections:
      continue
    close = defaults.closest_fields(name, config)
    hint = f'; closest valid: {", ".join(close)}' if close else ''
    return f'error: --config.{name}: {spec} has no field {name!r}{hint}'
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl `flags_parser` for app.run: parses, and turns config override errors into one line."""
  try:
    rest = flags.FLAGS(argv)
  except (KeyError, AttributeError, TypeError, ValueError, OSError, flags.Error) as e:
    msg = explain_bad_override(argv[1:])
    if msg is None:
      msg = f'error: {type(e).__name__}: {e}'.splitlines()[0]
    print(msg, file=sys.stderr)
    sys.exit(2)
  arguments.refuse_positionals(rest)  # `config.x=1` without dashes is never silently ignored
  return rest


def check_config_or_exit(
  config, workdir: str | None, *, for_eval: bool = False, checkpoint: str | None = None
) -> None:
  """Validates values and checks every input exists; prints one message and exits 2 if not."""
  try:
    defaults.validate(config)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  found = preflight.problems(config, workdir, for_eval=for_eval, checkpoint=checkpoint)
  if found:
    print(preflight.report(found, 'eval.py' if for_eval else 'train.py'), file=sys.stderr)
    sys.exit(2)
  from dualsig_jax import workdir as workdir_lib  # light: no JAX

  # A read-only workdir is found now, not after a whole split was evaluated.
  unwritable = workdir and workdir_lib.check_writable(workdir)
  if unwritable:
    print(f'error: {unwritable}', file=sys.stderr)
    sys.exit(2)
  if workdir and not for_eval:
    from dualsig_jax.train import resume  # light: no JAX

    try:
      resume.check_and_write_config(config, workdir, write=False)
    except resume.ConfigChangedError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
