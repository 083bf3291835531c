"""Figures for WSOL results (PNG): box accuracy vs CAM threshold, PxAP PR curve.

Same rule as dualsig_jax.cam.plots: figures are drawn on an explicit Agg canvas through the
object API, never pyplot, so no display is needed and the caller's global backend is untouched;
the package imports this module lazily (matplotlib is slow to import).
"""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ['plot_box_curves', 'plot_pr_curves']


def plot_box_curves(results: dict, path: str, *, curve: str = 'box_acc', title: str = '') -> str:
  """Box accuracy (%) vs CAM threshold, one subplot per IoU, one line per head.

  Args:
    results: {head name (e.g. 'softmax', 'sigmoid') -> ``BoxEvaluator.compute()`` dict}.
    path: output PNG path.
    curve: 'box_acc' (MaxBoxAcc curve), 'gt_known' or 'top1'.
    title: figure title.
  Returns:
    path.
  """
  if not results:
    raise ValueError('plot_box_curves needs at least one head')
  first = next(iter(results.values()))
  if curve not in first['curves']:
    raise ValueError(
      f'unknown curve {curve!r}; valid: {sorted(k for k in first["curves"] if k != "thresholds")}'
    )
  ious = list(first['curves'][curve])
  fig = Figure(figsize=(4.5 * len(ious), 3.6))
  axes = fig.subplots(1, len(ious), squeeze=False)
  for ax, iou in zip(axes[0], ious):
    for head, r in results.items():
      ys = r['curves'][curve][iou]
      best = max(ys)
      ax.plot(r['curves']['thresholds'], ys, label=f'{head} (max {best:.2f})')
    ax.set_title(f'IoU >= {int(iou) / 100:.1f}')
    ax.set_xlabel('CAM threshold')
    ax.set_ylabel('box accuracy (%)')
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def plot_pr_curves(results: dict, path: str, *, title: str = '') -> str:
  """Pixel precision-recall curves, one line per head.

  Args:
    results: {head -> ``MaskEvaluator.compute()`` dict (``precision``, ``recall``, ``pxap``)}.
    path: output PNG path.
  Returns:
    path.
  """
  if not results:
    raise ValueError('plot_pr_curves needs at least one head')
  fig = Figure(figsize=(4.5, 4))
  ax = fig.subplots()
  for head, r in results.items():
    ax.plot(r['recall'], r['precision'], label=f'{head} (PxAP {r["pxap"]:.2f})')
  ax.set_xlabel('recall')
  ax.set_ylabel('precision')
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title)
  return _save(fig, path)


def _save(fig, path: str) -> str:
  """Lays out, writes (creating folders) and closes a figure; returns path."""
  FigureCanvasAgg(fig)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  return path
