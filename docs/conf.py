"""Sphinx configuration of the dualsig-jax documentation site (build: docs/build.sh).

Sphinx + MyST + myst-nb, the stack of jax, flax, optax and orbax: pages are Markdown, the API
reference comes from the docstrings (autodoc), and tutorials are notebooks executed at build
time, so a tutorial that stops working fails the build.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the package of this checkout, also without an editable install
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

project = 'dualsig-jax'
author = 'dualsig-jax developers'
copyright = '2026, dualsig-jax developers'

extensions = [
  'myst_nb',
  'sphinx.ext.autodoc',
  'sphinx.ext.napoleon',
  'sphinx.ext.mathjax',
  'sphinx.ext.viewcode',
]
source_suffix = {'.md': 'myst-nb', '.ipynb': 'myst-nb', '.rst': 'restructuredtext'}
# design.md is the design contract, kept in the site; the drawing script is not a page.
exclude_patterns = ['_build', 'build.sh', 'Makefile', '**.ipynb_checkpoints', 'jupyter_execute']

myst_enable_extensions = ['colon_fence', 'dollarmath']
# Headings get anchors, so `page.md#a-heading` links resolve (and are checked by -W).
myst_heading_anchors = 3

# Notebooks run at every build whose notebook changed (docs/build.sh starts from a clean
# docs/_build, so CI runs them every time); a cell that raises fails the build (-W).
nb_execution_mode = 'cache'
# Per cell: the training tutorial's run took 12 minutes on 2 cores loaded by other jobs.
nb_execution_timeout = 1800
nb_execution_raise_on_error = True
nb_execution_show_tb = True
# Markdown pages' ```python blocks are not executed here: tests/test_docs.py runs each as a
# plain script. Only the notebooks are executed by the build.
nb_custom_formats = {}

autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_default_options = {'members': True, 'undoc-members': False, 'show-inheritance': False}

html_theme = 'sphinx_book_theme'
html_title = 'dualsig-jax'
html_theme_options = {'show_toc_level': 2, 'use_download_button': False}
html_static_path = ['_static']
# A page without an icon makes the browser ask for /favicon.ico, a 404 in its console.
html_favicon = '_static/favicon.svg'
# The theme's script logs a console error when the page carries no default light/dark mode.
html_context = {'default_mode': 'auto'}
# Docstrings are plain text with ``literals`` and Google-style sections.
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Docstrings written before this site existed, that docutils cannot parse, rewritten before
# napoleon reads them (their modules belong to other changes at the time of writing). A
# Markdown-style list right under a line (no blank line around it) gets its blank lines, for
# every docstring; the rest is a table naming each docstring. An entry whose text no longer
# occurs does nothing: delete it once the source is fixed.
_DOCSTRING_FIXES = {
  'dualsig_jax.cam.insertion_deletion': [
    (
      'apply_fn, variables, images ``[B, H, W, C]``, maps ``[B, H, W]``, targets ``[B]``: as',
      'apply_fn: with ``variables``, images ``[B, H, W, C]``, maps ``[B, H, W]`` and targets '
      '``[B]``, as',
    )
  ],
  'dualsig_jax.cam.linear_head_fns': [('``sow``s its', '``sow``\\ s its')],
  'dualsig_jax.wsol.image_box_ious': [
    ('arrays:\n    ``multi``', 'arrays:\n\n    - ``multi``'),
    ('\n    ``largest', '\n    - ``largest'),
    ('\n  A level with no contour', '\n\n  A level with no contour'),
  ],
}


def _blank_lines_around_lists(lines: list[str]) -> list[str]:
  """A blank line before a top-level `- ` list that follows text, and after it."""
  out, in_list = [], False
  for line in lines:
    bullet = line.startswith('- ')
    if bullet and not in_list and out and out[-1].strip():
      out.append('')
    elif in_list and not bullet and line.strip() and not line.startswith(' '):
      out.append('')
    if bullet:
      in_list = True
    elif not line.strip() or not line.startswith(' '):
      in_list = False
    out.append(line)
  return out


def _fix_docstring(app, what, name, obj, options, lines):
  text = '\n'.join(_blank_lines_around_lists(lines))
  for old, new in _DOCSTRING_FIXES.get(name, ()):
    text = text.replace(old, new)
  lines[:] = text.split('\n')


# The index's "More" section lists every page of docs/ that no other toctree of the index
# names, so pages other changes add (docs/<name>.md) appear without editing the index. A toctree
# glob cannot do this: it would list the Guide's pages a second time.
_MORE_MARKER = 'every-other-page-of-docs'


def _other_pages(index_source: str) -> list[str]:
  """Top-level docs/*.md and *.ipynb pages that the index does not list."""
  listed = {ln.strip() for ln in index_source.splitlines()}
  here = os.path.dirname(os.path.abspath(__file__))
  pages = sorted(os.path.splitext(f)[0] for f in os.listdir(here) if f.endswith(('.md', '.ipynb')))
  return [p for p in pages if p != 'index' and p not in listed]


def _fill_more(app, docname, source):
  if docname == 'index' and _MORE_MARKER in source[0]:
    source[0] = source[0].replace(_MORE_MARKER, '\n'.join(_other_pages(source[0])))


def setup(app):
  app.connect('autodoc-process-docstring', _fix_docstring, priority=100)
  app.connect('source-read', _fill_more)
