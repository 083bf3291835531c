"""Entry point: ``python -m dualsig_jax.wsol --help``."""

import sys

from dualsig_jax.wsol.cli import main

if __name__ == '__main__':
  sys.exit(main())
