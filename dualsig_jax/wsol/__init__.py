"""WSOL localization metrics (wsolevaluation protocol): MaxBoxAcc(V2), GT-known / Top-1 Loc, PxAP.

Public API: :class:`BoxEvaluator`, :class:`MaskEvaluator`, :func:`image_box_ious` (per-image
per-threshold IoUs), :data:`KERNEL` (which box path is in use: ``'native: <library>'``, the
kernel built at install time, or ``'fallback: <reason>'``); :func:`evaluate_wsol` (the CLI's
engine) and the plots of :mod:`dualsig_jax.wsol.plots` resolve on first use (the CLI reads
metadata, the plots pull matplotlib).
"""

from dualsig_jax import lazy
from dualsig_jax.wsol import native
from dualsig_jax.wsol.box import POOLS, BoxEvaluator, cam_thresholds, check_scoremaps
from dualsig_jax.wsol.levels import box_iou, image_box_ious, quantize
from dualsig_jax.wsol.mask import MaskEvaluator

# Loads (never compiles) the kernel now, so that importing this package says which path runs.
KERNEL = native.status()

_LAZY = {'evaluate_wsol': 'cli'}

__all__ = [
  'BoxEvaluator',
  'MaskEvaluator',
  'KERNEL',
  'POOLS',
  'evaluate_wsol',
  'image_box_ious',
  'box_iou',
  'quantize',
  'cam_thresholds',
  'check_scoremaps',
]


__getattr__ = lazy.exports(__name__, _LAZY)
