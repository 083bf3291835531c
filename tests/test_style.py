"""The whole tree passes the one formatter and linter configured in pyproject.toml (ruff)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff():
  exe = shutil.which('ruff') or os.path.join(os.path.dirname(sys.executable), 'ruff')
  if not os.path.exists(exe):
    pytest.fail('ruff is not installed: pip install -e ".[test]"')
  return exe


@pytest.mark.parametrize('args', [['check', '.'], ['format', '--check', '.']])
def test_ruff(args):
  r = subprocess.run([_ruff(), *args], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr
