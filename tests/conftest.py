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

# `@pytest.mark.numerics` marks a test whose float results could change with the CPU's vector
# width: exact equality (or atol <= 1e-6) between two compiled programs that differ in batch,
# device or process layout, or in what one call computes. CI runs them a second time with
# XLA_FLAGS=--xla_cpu_max_isa=AVX2, so a test that holds only on an AVX-512 machine fails there:
#   .venv/bin/python -m pytest -q -m numerics
# Parity with PyTorch or finite differences to a looser tolerance, and determinism of one
# program run twice, do not depend on the ISA and run once.


def pytest_configure(config):
  config.addinivalue_line(
    'markers', 'numerics: float results that must hold on any CPU (CI reruns them capped at AVX2)'
  )
