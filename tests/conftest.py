"""Test configuration: fake 8 CPU devices so sharding code runs on one host.

The flag must be set before jax is imported anywhere, which is why it lives at the
top of conftest (pytest imports it before any test module).
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Keep torch and XLA from fighting over the two cores of the CI machine.
os.environ.setdefault('OMP_NUM_THREADS', '2')
