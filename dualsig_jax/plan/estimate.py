"""From compiled per-chip costs to a run's estimates: roofline images/s, stage hours, loader
workers per host. Everything here is arithmetic on XLA's numbers and published peaks."""

from __future__ import annotations

import math
import os

import ml_collections

from dualsig_jax.plan.chips import Chip
from dualsig_jax.plan.compiled import StepCost

# ILSVRC-2012 train split: 1,281,167 images (its metadata is not shipped: it lists local files).
ILSVRC_TRAIN_IMAGES = 1_281_167
# Images/s one loader worker delivers (train transforms), measured with
# `python bench/bench_loader.py --mode headroom` (500x375 JPEGs, resize 256, crop 224) on this
# project's 2-core CI-class machine; pass --worker_img_s with a host's own measurement.
DEFAULT_WORKER_IMG_S = 100.0


def roofline(cost: StepCost, chip: Chip) -> tuple[float, str]:
  """(images/s per chip, 'compute' | 'memory'): the batch over the larger of the step's FLOPs
  at the chip's peak bf16 FLOP/s and its bytes accessed at the peak HBM bandwidth."""
  t_flops = cost.flops / chip.bf16_flops
  t_bytes = cost.bytes_accessed / chip.hbm_bw
  t = max(t_flops, t_bytes)
  return (cost.per_chip_batch / t if t > 0 else float('inf')), (
    'compute' if t_flops >= t_bytes else 'memory'
  )


def split_images(config: ml_collections.ConfigDict, split: str) -> int | None:
  """Images in `split` of the config's dataset: the synthetic generator's counts, ILSVRC's
  train size, else the shipped wsolevaluation metadata's line count (None if not shipped)."""
  i = config.input
  if i.dataset_name == 'SYNTH':
    return int(
      {'train': i.synthetic.num_train, 'val': i.synthetic.num_val}.get(split, i.synthetic.num_test)
    )
  if i.dataset_name == 'ILSVRC' and split == 'train':
    return ILSVRC_TRAIN_IMAGES
  from dualsig_jax.data import paths

  root = i.metadata_root if i.metadata_root not in paths.SHIPPED_NAMES else paths.SHIPPED_METADATA
  path = os.path.join(root, i.dataset_name, split, 'image_ids.txt')
  try:
    with open(path, encoding='utf-8') as f:
      return sum(1 for line in f if line.strip())
  except OSError:
    return None


def stage_seconds(
  config: ml_collections.ConfigDict, stage: str, global_batch: int, img_s: float
) -> tuple[int, float]:
  """(steps, seconds) of `stage` at `global_batch` and a global rate of `img_s` images/s;
  steps as train.py counts them (full batches per epoch, or max_steps)."""
  from dualsig_jax.train import stage as stage_lib

  n = split_images(config, config.input.train_split) or 0
  spe = max(1, n // global_batch)
  steps = stage_lib.total_steps(config, stage, spe)
  return steps, steps * global_batch / img_s


def workers_per_host(img_s_per_chip: float, chips_per_host: int, worker_img_s: float) -> int:
  """Loader workers one host needs to feed its chips at `img_s_per_chip`."""
  return max(1, math.ceil(img_s_per_chip * chips_per_host / worker_img_s))
