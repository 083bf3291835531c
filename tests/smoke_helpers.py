"""Shared by the tests that train on the synthetic smoke set (test_pipeline, test_resume,
test_signals): its config, its dataset (generated once per session into pytest's base temp
folder), the train.py command line and checkpoint / metrics readers.

Test modules bind the fixture at module level (``smoke_data = smoke_helpers.smoke_data``).
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import synthetic  # noqa: E402


def smoke_config(data_root, **overrides):
  """configs/synthetic.py:smoke over `data_root`; overrides are {'section.field': value}."""
  c = synthetic.get_config('smoke')
  c.input.data_root = str(data_root)
  c.input.metadata_root = os.path.join(str(data_root), 'metadata')
  for k, v in overrides.items():
    section, field = k.split('.')
    c[section][field] = v
  return c


@pytest.fixture(scope='session')
def smoke_data(tmp_path_factory):
  from dualsig_jax import data

  root = tmp_path_factory.getbasetemp() / 'synthetic_smoke'
  data.ensure_synthetic(smoke_config(root).input)  # idempotent: generated once per session
  return root


def train_cmd(data_root, workdir, steps, *extra):
  """train.py on the smoke set, vanilla stage only, `steps` steps, no evaluation."""
  return [
    sys.executable,
    os.path.join(ROOT, 'train.py'),
    f'--config={os.path.join(ROOT, "configs", "synthetic.py")}:smoke',
    f'--workdir={workdir}',
    '--skip_eval',
    f'--config.input.data_root={data_root}',
    f'--config.input.metadata_root={os.path.join(str(data_root), "metadata")}',
    '--config.stages=("vanilla",)',
    f'--config.vanilla.max_steps={steps}',
    '--config.checkpoint.every_steps=4',
    '--config.checkpoint.max_to_keep=2',
    *extra,
  ]


def checkpoint_steps(workdir, stage='vanilla'):
  """Complete checkpoint steps of a stage (Orbax renames a finished step to its number)."""
  d = os.path.join(str(workdir), stage, 'checkpoints')
  return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if os.path.isdir(d) else []


def metrics(workdir):
  with open(os.path.join(str(workdir), 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def loss_steps(workdir, stage='vanilla'):
  """Steps of the training records (those with a loss) of a stage, in file order."""
  return [r['step'] for r in metrics(workdir) if r.get('stage') == stage and 'loss' in r]
