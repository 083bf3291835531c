"""Every Python block of every page of the documentation site (docs/*.md, docs/api/*.md) runs
as written, as a plain script from the repository root (the README's blocks: test_readme.py),
and every link of the README resolves offline: relative paths to files of this repository and
`#anchors` to headings of the page they name. The notebooks under docs/tutorials/ are executed
by the site's build (docs/build.sh), not here."""

import glob
import os
import re
import subprocess
import sys

import pytest
from test_readme import python_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(
  glob.glob(os.path.join(ROOT, 'docs', '*.md'))
  + glob.glob(os.path.join(ROOT, 'docs', 'api', '*.md'))
)
BLOCKS = [
  (os.path.relpath(page, ROOT), line, src)
  for page in PAGES
  for line, src in python_blocks(open(page, encoding='utf-8').read())
]


def _id(block):
  page, line, src = block
  first = next((ln for ln in src.splitlines() if ln.strip() and not ln.startswith('#')), '')
  return f'{page}:{line}:{first[:30]}'


def test_the_site_has_python_blocks():
  pages = {b[0] for b in BLOCKS}
  assert {'docs/explain.md', 'docs/wsol.md', 'docs/converter.md'} <= pages, sorted(pages)


@pytest.mark.parametrize('block', BLOCKS, ids=[_id(b) for b in BLOCKS])
def test_docs_block_runs_as_a_plain_script(block, tmp_path):
  page, line, src = block
  script = tmp_path / f'block_{line}.py'
  script.write_text(src)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('PYTHONPATH', None)  # the installed package, as a user has it
  r = subprocess.run(
    [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert r.returncode == 0, f'{page}:{line} failed:\n{r.stderr[-4000:]}'


# [text](target) of Markdown, and <img src="target">; code spans are removed first.
_LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)|<img[^>]*\ssrc="([^"]+)"')
_FENCED = re.compile(r'^```.*?^```', re.S | re.M)
_CODE = re.compile(r'```.*?```|`[^`\n]*`', re.S)


def heading_anchors(markdown: str) -> set[str]:
  """GitHub's (and MyST's `myst_heading_anchors`) anchors of the headings of a Markdown text:
  lower case, punctuation other than `-` and `_` dropped, spaces to `-`."""
  out = set()
  for m in re.finditer(r'^#{1,6} +(.+?) *$', _FENCED.sub('', markdown), re.M):
    text = re.sub(r'[`*]', '', m.group(1)).strip().lower()
    out.add(re.sub(r'[^\w\- ]', '', text).replace(' ', '-'))
  return out


def readme_links() -> list[str]:
  text = _CODE.sub('', open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read())
  return [a or b for a, b in _LINK.findall(text)]


def test_heading_anchors_follow_githubs_rule():
  assert heading_anchors("## Differences: the paper's text, the code\n") == {
    'differences-the-papers-text-the-code'
  }
  assert heading_anchors('# How to read `results.md`\n') == {'how-to-read-resultsmd'}


def test_every_readme_link_resolves_offline():
  links = readme_links()
  assert len(links) >= 12, links  # one per section of the site, at least
  broken = []
  for link in links:
    if re.match(r'[a-z]+://|mailto:', link):
      broken.append(f'{link} (not offline: link into docs/ instead)')
      continue
    path, _, anchor = link.partition('#')
    target = os.path.normpath(os.path.join(ROOT, path)) if path else os.path.join(ROOT, 'README.md')
    if not os.path.exists(target):
      broken.append(f'{link} (no file {os.path.relpath(target, ROOT)})')
    elif anchor and anchor not in heading_anchors(open(target, encoding='utf-8').read()):
      broken.append(f'{link} (no heading #{anchor} in {os.path.relpath(target, ROOT)})')
  assert not broken, broken
