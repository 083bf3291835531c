"""Pictures: a map over its image, and a softmax-vs-sigmoid grid with GT and predicted boxes.

Host-side (NumPy, OpenCV, matplotlib). Figures are drawn on an explicit Agg canvas through the
object API, never pyplot, so no display is needed and the caller's global backend is untouched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from dualsig_jax import vocab

IMAGENET_MEAN = vocab.IMAGENET_MEAN
IMAGENET_STD = vocab.IMAGENET_STD


def to_display(
  image: np.ndarray,
  mean: Sequence[float] | None = IMAGENET_MEAN,
  std: Sequence[float] | None = IMAGENET_STD,
) -> np.ndarray:
  """A model input back to a displayable float RGB image.

  Args:
    image: ``[H, W, 3]``; uint8 (returned / 255), or float normalized with ``mean``/``std``
      (pass ``mean=None`` for floats already in [0, 1]).
  Returns: float32 ``[H, W, 3]`` in [0, 1].
  """
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  image = image.astype(np.float32)
  if mean is not None:
    image = image * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(image, 0.0, 1.0)


def overlay(
  image: np.ndarray, scoremap: np.ndarray, *, alpha: float = 0.5, cmap: str = 'jet', **display_kw
) -> np.ndarray:
  """Blend a colour-mapped score map over an image.

  Args:
    image: ``[H, W, 3]`` (see ``to_display`` for accepted dtypes; ``display_kw`` forwards
      ``mean``/``std``).
    scoremap: float ``[H, W]`` in [0, 1] (values are clipped).
    alpha: weight of the heat map.
  Returns: float32 ``[H, W, 3]`` in [0, 1].
  """
  img = to_display(image, **display_kw)
  m = np.clip(np.nan_to_num(np.asarray(scoremap, np.float32)), 0.0, 1.0)
  if m.shape != img.shape[:2]:
    raise ValueError(f'scoremap {m.shape} does not match image {img.shape[:2]}')
  heat = matplotlib.colormaps[cmap](m)[..., :3].astype(np.float32)
  return (1.0 - alpha) * img + alpha * heat


def largest_contour_box(scoremap: np.ndarray, threshold: float) -> np.ndarray:
  """The predicted box of wsolevaluation's GT-known Loc at one CAM threshold.

  The map is quantized to uint8 (``map * 255``), pixels ``> int(threshold * max)`` are kept,
  OpenCV contours are found (``RETR_TREE``, ``CHAIN_APPROX_SIMPLE``) and the bounding rectangle
  of the largest one (``cv2.contourArea``) is returned with x1, y1 clipped to ``w-1, h-1``.

  Args:
    scoremap: float ``[H, W]`` in [0, 1].
    threshold: CAM threshold in [0, 1].
  Returns: int ``[4]`` ``(x0, y0, x1, y1)``; ``(0, 0, 0, 0)`` when nothing passes.
  """
  m = np.nan_to_num(np.asarray(scoremap, np.float32))
  h, w = m.shape
  q = (m * 255).astype(np.uint8)
  _, binary = cv2.threshold(q, int(threshold * np.max(q)), 255, cv2.THRESH_BINARY)
  contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
  if len(contours) == 0:
    return np.zeros(4, np.int64)
  x, y, bw, bh = cv2.boundingRect(max(contours, key=cv2.contourArea))
  return np.array([x, y, min(x + bw, w - 1), min(y + bh, h - 1)], np.int64)


def _draw_box(ax, box, color):
  x0, y0, x1, y1 = (float(v) for v in box)
  ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))


def save_cam_grid(
  path: str,
  images: np.ndarray,
  softmax_maps: np.ndarray,
  sigmoid_maps: np.ndarray,
  *,
  gt_boxes: Sequence[np.ndarray] | None = None,
  threshold: float = 0.2,
  titles: Sequence[str] | None = None,
  alpha: float = 0.5,
  method: str = 'cam',
  **display_kw,
) -> str:
  """Save a PNG grid: per image (row) the image and the ``method`` maps of the softmax and the
  sigmoid head.

  GT boxes are drawn in green on every panel; the predicted box (``largest_contour_box`` at
  ``threshold``) of each map is drawn in red on its panel. The column titles name the method and
  the head, and a legend under the grid says what the boxes are.

  Args:
    path: output PNG path (parent folders are created).
    images: ``[N, H, W, 3]`` (see ``to_display``).
    softmax_maps, sigmoid_maps: float ``[N, H, W]`` in [0, 1].
    gt_boxes: optional per image int ``[n_i, 4]`` ``(x0, y0, x1, y1)`` in map pixels;
      all-zero rows (padding) are skipped.
    threshold: CAM threshold of the predicted box.
    titles: optional per-row label (e.g. class names).
    method: the CAM method the maps come from (column titles), e.g. ``'gradcam'``.
  Returns: ``path``.
  """
  images, smx, sig = np.asarray(images), np.asarray(softmax_maps), np.asarray(sigmoid_maps)
  n = images.shape[0]
  if smx.shape[0] != n or sig.shape[0] != n:
    raise ValueError(f'need as many maps as images: {n}, {smx.shape}, {sig.shape}')
  fig = Figure(figsize=(9, 3 * n))
  FigureCanvasAgg(fig)
  axes = fig.subplots(n, 3, squeeze=False)
  heads = [('image', None), (f'{method}, softmax head', smx), (f'{method}, sigmoid head', sig)]
  for i in range(n):
    for j, (name, maps) in enumerate(heads):
      ax = axes[i, j]
      if maps is None:
        ax.imshow(to_display(images[i], **display_kw))
      else:
        ax.imshow(overlay(images[i], maps[i], alpha=alpha, **display_kw))
        _draw_box(ax, largest_contour_box(maps[i], threshold), 'red')
      if gt_boxes is not None:
        for box in np.asarray(gt_boxes[i]).reshape(-1, 4):
          if np.any(box):  # all-zero rows are the eval batches' padding
            _draw_box(ax, box, 'lime')
      label = name if i == 0 else ''
      if j == 0 and titles is not None:
        label = f'{label}\n{titles[i]}' if label else str(titles[i])
      ax.set_title(label, fontsize=9)
      ax.axis('off')
  legend = [
    Rectangle((0, 0), 1, 1, fill=False, edgecolor='lime', linewidth=2),
    Rectangle((0, 0), 1, 1, fill=False, edgecolor='red', linewidth=2),
  ]
  names = [
    'ground-truth box',
    f"predicted box (the map's largest region at threshold {threshold:g})",
  ]
  fig.legend(legend, names, loc='lower center', ncol=2, fontsize=9, frameon=False)
  fig.tight_layout(rect=(0, 0.5 / (3 * n), 1, 1))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  return path
