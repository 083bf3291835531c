"""Test configuration: fake 8 CPU devices so sharding code runs on one host.

The flag must be set before jax is imported anywhere, which is why it lives at the
top of conftest (pytest imports it before any test module).
"""

import os

# Appended to the caller's flags: CI's second pass exports XLA_FLAGS=--xla_cpu_max_isa=AVX2.
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  ).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Keep torch and XLA from fighting over the two cores of the CI machine.
os.environ.setdefault('OMP_NUM_THREADS', '2')

import sys  # noqa: E402

# The PyTorch mirrors of the models live in bench/torch_models.py (the benchmarks race against
# them too); the tests import them from there.
sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench')
)

import pytest  # noqa: E402

# The tests whose assertions are about float results (exact equality across device or process
# layouts, parity with PyTorch to a tolerance). CI runs them a second time with
# XLA_FLAGS=--xla_cpu_max_isa=AVX2, so a test that holds only on an AVX-512 machine fails there:
#   .venv/bin/python -m pytest -q -m numerics
NUMERICS_MODULES = (
  'test_backward_compat',
  'test_cam',
  'test_cam_parity',
  'test_cam_parity_more',
  'test_convert',
  'test_distributed',
  'test_dual_branch',
  'test_eval_checkpoint',
  'test_eval_distributed',
  'test_explain',
  'test_explain_guided',
  'test_explain_models',
  'test_explain_parity',
  'test_explain_targets',
  'test_models',
  'test_nnx_branch',
  'test_pipeline',
  'test_resnet_small',
  'test_scorecam_dedup',
  'test_standard_models',
  'test_train',
  'test_train_parity',
  'test_train_processes',
)


def pytest_configure(config):
  config.addinivalue_line(
    'markers', 'numerics: float results that must hold on any CPU (CI reruns them capped at AVX2)'
  )


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.module.__name__.split('.')[-1] in NUMERICS_MODULES:
      item.add_marker(pytest.mark.numerics)
