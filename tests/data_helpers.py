"""Shared fixtures and helpers of the data tests (test_metadata, test_loaders, test_tfds, ...).

Test modules bind the fixtures at module level (``data = data_helpers.data``) so pytest finds
them there.
All image tests run on the tiny SYNTH preset (a few hundred 64-px images), generated once per
session into pytest's base temp folder and copied per test (tests corrupt their copy).
"""

import json
import os
import shutil

import pytest
from ml_collections import ConfigDict

from dualsig_jax.data import loaders, synthetic

TINY = {k: int(v) for k, v in synthetic.PRESETS['tiny'].items()}


@pytest.fixture
def synth_dir(tmp_path_factory):
  """The tiny SYNTH set, generated once per session (shared by every module importing this)."""
  out = tmp_path_factory.getbasetemp() / 'synth_tiny'
  if not (out / '.complete').exists():
    synthetic.generate(str(out), **TINY, workers=1)
    (out / '.complete').write_text(json.dumps(TINY))
  return str(out)


def input_config(root, **overrides):
  """An ``input`` config section (as a ConfigDict) over the SYNTH copy at ``root``."""
  cfg = dict(
    source='folder',
    dataset_name='SYNTH',
    data_root=root,
    metadata_root='',
    train_split='train',
    eval_split='test',
    resize_size=72,
    crop_size=64,
    eval_size=64,
    batch_size=16,
    num_workers=0,
    skip_bad_images=False,
    synthetic=dict(TINY, generate=False),
    tfds=dict(name='', data_dir='', train_split='train', eval_split='test'),
  )
  cfg.update(overrides)
  return ConfigDict(cfg)


@pytest.fixture
def data(synth_dir, tmp_path):
  """A private copy of the tiny set and an input config pointing at it."""
  root = str(tmp_path / 'synth')
  shutil.copytree(synth_dir, root)
  return input_config(root)


@pytest.fixture(name='data')
def metadata_only_data(synth_dir, tmp_path):
  """As ``data`` for tests that edit metadata only: images/ and masks/ are links to the shared
  set (so they must not be modified), which is cheaper than copying them for every test."""
  root = tmp_path / 'synth'
  root.mkdir()
  shutil.copytree(os.path.join(synth_dir, 'metadata'), root / 'metadata')
  for sub in ('images', 'masks'):
    os.symlink(os.path.join(synth_dir, sub), root / sub)
  return input_config(str(root))


def meta_file(cfg, split, name):
  return os.path.join(cfg.data_root, 'metadata', 'SYNTH', split, name)


def edit_line(path, lineno, new):
  """Replaces line ``lineno`` (1-based) of a text file."""
  with open(path) as f:
    lines = f.read().splitlines()
  lines[lineno - 1] = new
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def append_line(path, line):
  with open(path, 'a') as f:
    f.write(line + '\n')


def image_path(cfg, split, k):
  return os.path.join(cfg.data_root, 'images', split, f'{k:05d}.jpg')


def train_loader(cfg, **kw):
  args = dict(seed=0, num_epochs=1, process_index=0, process_count=1, batch_size=16)
  args.update(kw)
  return loaders.make_train_loader(cfg, **args)
