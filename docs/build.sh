#!/usr/bin/env bash
# Builds the documentation site into docs/_build/html with warnings as errors (a broken
# cross-reference, a missing API page, a docstring docutils cannot parse or a tutorial cell
# that raises fails the build), then opens it in headless Chromium (tests/test_docs_site.py:
# index, the cam.explain API page and a tutorial render with their images and no console
# errors; screenshots in docs/_build/screenshots/). Run from anywhere:
#   bash docs/build.sh            (PYTHON=... to pick the interpreter; default .venv/bin/python)
# Serve the result: python -m http.server -d docs/_build/html
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export JAX_PLATFORMS=cpu
rm -rf docs/_build/html docs/_build/jupyter_execute docs/_build/.jupyter_cache
"$PYTHON" -m sphinx -W --keep-going -b html docs docs/_build/html
"$PYTHON" -m pytest -q tests/test_docs_site.py
