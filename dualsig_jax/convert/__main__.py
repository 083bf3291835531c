"""``python -m dualsig_jax.convert``: see :mod:`dualsig_jax.convert.command`."""

from dualsig_jax.convert.command import cli

if __name__ == '__main__':
  raise SystemExit(cli())
