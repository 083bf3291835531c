"""XLA flags for test subprocesses: the caller's flags (an ISA cap such as
``--xla_cpu_max_isa=AVX2``, which CI's second pass exports) with a chosen fake device count."""

import os

_COUNT = '--xla_force_host_platform_device_count'


def with_device_count(num_devices, flags=None):
  """Returns ``flags`` (default: ``$XLA_FLAGS``) with the device count set to ``num_devices``."""
  flags = os.environ.get('XLA_FLAGS', '') if flags is None else flags
  kept = [f for f in flags.split() if not f.startswith(_COUNT)]
  return ' '.join([*kept, f'{_COUNT}={num_devices}'])
