"""Every Python block of README.md runs as written: extracted and executed as a plain script in
a fresh interpreter (no pytest process, no `__main__` guard), from the repository root, as a
user who copies it would. A name the block does not define is the README's bug."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
_BLOCK = re.compile(r'^( *)```python\n(.*?)^\1```', re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
  """(line number, dedented source) of every ```python block of a markdown text."""
  out = []
  for m in _BLOCK.finditer(text):
    indent = len(m.group(1))
    lines = [ln[indent:] if ln[:indent].strip() == '' else ln for ln in m.group(2).splitlines()]
    out.append((text.count('\n', 0, m.start()) + 1, '\n'.join(lines) + '\n'))
  return out


BLOCKS = python_blocks(open(README, encoding='utf-8').read())


def _id(block):
  line, src = block
  first = next((ln for ln in src.splitlines() if ln.strip() and not ln.startswith('#')), '')
  return f'README.md:{line}:{first[:40]}'


def test_the_readme_has_python_blocks():
  assert len(BLOCKS) >= 1, [b[0] for b in BLOCKS]


@pytest.mark.parametrize('block', BLOCKS, ids=[_id(b) for b in BLOCKS])
def test_readme_block_runs_as_a_plain_script(block, tmp_path):
  line, src = block
  script = tmp_path / f'readme_block_{line}.py'
  script.write_text(src)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('PYTHONPATH', None)  # the installed package, as a user has it
  r = subprocess.run(
    [sys.executable, str(script)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, f'README.md:{line} failed:\n{r.stderr[-4000:]}'
  print(f'ran README.md:{line} ({len(src.splitlines())} lines)')
