"""Test configuration: fake 8 CPU devices so sharding code runs on one host.

The flag must be set before jax is imported anywhere, which is why it lives at the
top of conftest (pytest imports it before any test module).
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Keep torch and XLA from fighting over the two cores of the CI machine.
os.environ.setdefault('OMP_NUM_THREADS', '2')

import sys  # noqa: E402

# The PyTorch mirrors of the models live in bench/torch_models.py (the benchmarks race against
# them too); the tests import them from there.
sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench')
)
