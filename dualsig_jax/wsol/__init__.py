"""WSOL localization metrics (wsolevaluation protocol): MaxBoxAcc(V2), GT-known / Top-1 Loc, PxAP.

Public API: :class:`BoxEvaluator`, :class:`MaskEvaluator`, :func:`evaluate_wsol` (the CLI's
engine), :func:`image_box_ious` (per-image per-threshold IoUs), plots in
:mod:`dualsig_jax.wsol.plots` (imported lazily: it pulls matplotlib).
"""

from dualsig_jax.wsol.box import BoxEvaluator, cam_thresholds, check_scoremaps
from dualsig_jax.wsol.cli import evaluate_wsol
from dualsig_jax.wsol.levels import box_iou, image_box_ious, quantize
from dualsig_jax.wsol.mask import MaskEvaluator

__all__ = [
  'BoxEvaluator',
  'MaskEvaluator',
  'evaluate_wsol',
  'image_box_ious',
  'box_iou',
  'quantize',
  'cam_thresholds',
  'check_scoremaps',
]
