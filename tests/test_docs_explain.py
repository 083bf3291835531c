"""Every Python block of the explain documentation pages written for issue 24 part B
(docs/explain_run.md, docs/target_layers.md, docs/explain_methods_more.md) runs as a plain
script from the repository root, as test_readme runs the README's."""

import os
import subprocess
import sys

import pytest
from test_readme import ROOT, python_blocks

PAGES = ('explain_run.md', 'target_layers.md', 'explain_methods_more.md')
BLOCKS = [
  (page, line, src)
  for page in PAGES
  if os.path.isfile(os.path.join(ROOT, 'docs', page))
  for line, src in python_blocks(open(os.path.join(ROOT, 'docs', page), encoding='utf-8').read())
]


def test_every_page_has_python_blocks():
  assert {p for p, _, _ in BLOCKS} == set(PAGES), sorted({p for p, _, _ in BLOCKS})


@pytest.mark.parametrize('block', BLOCKS, ids=[f'{p}:{line}' for p, line, _ in BLOCKS])
def test_docs_block_runs_as_a_plain_script(block, tmp_path):
  page, line, src = block
  script = tmp_path / f'{page[:-3]}_{line}.py'
  script.write_text(src)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('PYTHONPATH', None)  # the installed package, as a user has it
  r = subprocess.run(
    [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert r.returncode == 0, f'docs/{page}:{line} failed:\n{r.stderr[-4000:]}'
