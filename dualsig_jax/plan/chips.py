"""Published per-chip peaks of accelerators: bf16 FLOP/s, HBM bandwidth and HBM size.

Used by the pod plan (roofline images/s, memory fit) and by the training log (MFU). Only
chips with a vendor-published figure are listed; anything else (a CPU) has no peak, and the
log then has no MFU field rather than an invented one.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: `bf16_flops` dense bf16 FLOP/s, `hbm_bw` bytes/s, `hbm_bytes`."""

  name: str
  bf16_flops: float
  hbm_bw: float
  hbm_bytes: int


# Explicit table, keyed by the short name used in topology names ('v5e:4x4').
CHIPS = {
  # Cloud TPU v4 system architecture page: 275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s per chip.
  'v4': Chip('TPU v4', 275e12, 1200e9, 32 * GIB),
  # Cloud TPU v5e page (system architecture table): 197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s.
  'v5e': Chip('TPU v5e', 197e12, 819e9, 16 * GIB),
  # Cloud TPU v5p page (system architecture table): 459 TFLOP/s bf16, 95 GiB HBM2e, 2765 GB/s.
  'v5p': Chip('TPU v5p', 459e12, 2765e9, 95 * GIB),
  # Cloud TPU v6e (Trillium) page: 918 TFLOP/s bf16, 32 GiB HBM, 1640 GB/s.
  'v6e': Chip('TPU v6e', 918e12, 1640e9, 32 * GIB),
  # NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOP/s dense bf16, 2039 GB/s, 80 GB.
  'a100': Chip('NVIDIA A100 80GB', 312e12, 2039e9, 80 * 10**9),
  # NVIDIA H100 datasheet (SXM): 989 TFLOP/s dense bf16 (1979 with sparsity), 3.35 TB/s, 80 GB.
  'h100': Chip('NVIDIA H100 SXM', 989e12, 3350e9, 80 * 10**9),
  # NVIDIA H200 datasheet (SXM): 989 TFLOP/s dense bf16, 4.8 TB/s, 141 GB.
  'h200': Chip('NVIDIA H200 SXM', 989e12, 4800e9, 141 * 10**9),
}

# jax `device.device_kind` -> CHIPS key (TPU kinds as libtpu reports them; GPUs by model name).
_KINDS = (
  ('TPU v4', 'v4'),
  ('TPU v5 lite', 'v5e'),
  ('TPU v5e', 'v5e'),
  ('TPU v5p', 'v5p'),
  ('TPU v5', 'v5p'),  # v5p chips report 'TPU v5'
  ('TPU v6 lite', 'v6e'),
  ('TPU v6e', 'v6e'),
  ('A100', 'a100'),
  ('H100', 'h100'),
  ('H200', 'h200'),
)


def chip_for_kind(device_kind: str) -> Chip | None:
  """The peak record of a jax `device_kind` ('TPU v5 lite', 'NVIDIA H100 80GB HBM3'), or
  None when no published peak is listed (CPUs, unlisted chips)."""
  for prefix, key in _KINDS:
    if device_kind == prefix or (not prefix.startswith('TPU') and prefix in device_kind):
      return CHIPS[key]
  return None


def chip_for_topology(topology: str) -> Chip:
  """The chip of a topology name ('v5e:4x4' -> v5e); ValueError listing the known ones."""
  key = topology.split(':', 1)[0].lower()
  if key not in CHIPS or not CHIPS[key].name.startswith('TPU'):
    tpus = [k for k, c in CHIPS.items() if c.name.startswith('TPU')]
    raise ValueError(f'unknown TPU generation {key!r} in topology {topology!r}; valid: {tpus}')
  return CHIPS[key]
