"""Shared by the WSOL tests and bench/bench_wsol.py: a literal port of wsolevaluation (the
reference every fast path is checked against), map generators and the shared map set.

Not a test module (no ``test_`` prefix): pytest collects nothing here.
"""

import functools

import cv2
import numpy as np


# --------------------------------------------------------------------------------------------
# Reference: a straightforward port of wsolevaluation (evaluation.py, MaxBoxAccV2 version).
# --------------------------------------------------------------------------------------------
def ref_boxes_at_thresholds(scoremap, thresholds):
  """Per threshold: (all contours' boxes, largest contour's box), literally as the reference."""
  height, width = scoremap.shape
  image = np.expand_dims((scoremap.astype(np.float64) * 255).astype(np.uint8), 2)
  multi, largest = [], []
  for t in thresholds:
    _, binary = cv2.threshold(
      src=image, thresh=int(t * np.max(image)), maxval=255, type=cv2.THRESH_BINARY
    )
    contours = cv2.findContours(image=binary, mode=cv2.RETR_TREE, method=cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
      multi.append(np.asarray([[0, 0, 0, 0]]))
      largest.append(np.asarray([[0, 0, 0, 0]]))
      continue
    boxes = []
    for c in list(contours) + [max(contours, key=cv2.contourArea)]:
      x, y, w, h = cv2.boundingRect(c)
      boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    multi.append(np.asarray(boxes[:-1]))
    largest.append(np.asarray(boxes[-1:]))
  return multi, largest


def ref_multiple_iou(box_a, box_b):
  num_a, num_b = box_a.shape[0], box_b.shape[0]
  box_a = np.expand_dims(np.tile(box_a, num_b), axis=1).reshape((num_a, num_b, -1))
  box_b = np.transpose(
    np.expand_dims(np.tile(box_b, num_a), axis=1).reshape((num_b, num_a, -1)), (1, 0, 2)
  )
  min_x = np.maximum(box_a[:, :, 0], box_b[:, :, 0])
  min_y = np.maximum(box_a[:, :, 1], box_b[:, :, 1])
  max_x = np.minimum(box_a[:, :, 2], box_b[:, :, 2])
  max_y = np.minimum(box_a[:, :, 3], box_b[:, :, 3])
  inter = np.maximum(0, max_x - min_x + 1) * np.maximum(0, max_y - min_y + 1)
  area_a = (box_a[:, :, 2] - box_a[:, :, 0] + 1) * (box_a[:, :, 3] - box_a[:, :, 1] + 1)
  area_b = (box_b[:, :, 2] - box_b[:, :, 0] + 1) * (box_b[:, :, 3] - box_b[:, :, 1] + 1)
  denom = area_a + area_b - inter
  deg = np.where(denom <= 0)
  denom[deg] = 1
  ious = inter / denom
  ious[deg] = 0
  return ious


def ref_image_ious(scoremap, gt, thresholds):
  multi, largest = ref_boxes_at_thresholds(scoremap, thresholds)
  gt = np.asarray(gt)
  out = {'multi': [], 'largest': [], 'largest_first': []}
  for mb, lb in zip(multi, largest):
    out['multi'].append(ref_multiple_iou(mb, gt).max(1).max())
    li = ref_multiple_iou(lb, gt)
    out['largest'].append(li.max(1).max())
    out['largest_first'].append(li[0, 0])
  return {k: np.asarray(v) for k, v in out.items()}


class RefBoxEvaluator:
  """wsolevaluation's BoxEvaluator (+ GT-known / Top-1 Loc: largest contour vs first GT box)."""

  def __init__(self, ious, interval, multi, loc_threshold=0.2):
    self.ious, self.multi = list(ious), multi
    self.thr = list(np.arange(0, 1, interval))
    self.loc = int(np.argmin(np.abs(np.asarray(self.thr) - loc_threshold)))
    z = lambda: {i: np.zeros(len(self.thr)) for i in self.ious}  # noqa: E731
    self.box, self.v1, self.gt_known, self.top1 = z(), np.zeros(len(self.thr)), z(), z()
    self.cnt = 0

  def accumulate(self, r, correct):
    """r: ``ref_image_ious`` of one image at this evaluator's thresholds."""
    sliced = r['multi'] if self.multi else r['largest']
    for i in self.ious:
      self.box[i][np.where(sliced >= (i / 100))[0]] += 1
      hit = r['largest_first'] >= (i / 100)
      self.gt_known[i][hit] += 1
      if correct:
        self.top1[i][hit] += 1
    self.v1[r['largest'] >= 0.5] += 1
    self.cnt += 1

  def compute(self):
    mx = {str(i): (self.box[i] * 100.0 / float(self.cnt)).max() for i in self.ious}
    return {
      'maxboxacc': mx,
      'maxboxacc_v2': np.average([mx[str(i)] for i in self.ious]),
      'maxboxacc_v1': (self.v1 * 100.0 / float(self.cnt)).max(),
      'gt_known_loc': {
        str(i): self.gt_known[i][self.loc] * 100.0 / float(self.cnt) for i in self.ious
      },
      'top1_loc': {str(i): self.top1[i][self.loc] * 100.0 / float(self.cnt) for i in self.ious},
    }


def ref_pxap(maps, masks, interval):
  thr = list(np.arange(0, 1, interval))
  edges = np.append(thr, [1.0, 2.0, 3.0])
  t_hist = np.zeros(len(thr) + 2, dtype=np.float64)
  f_hist = np.zeros(len(thr) + 2, dtype=np.float64)
  for m, g in zip(maps, masks):
    m = m.astype(np.float64)
    t_hist += np.histogram(m[g == 1], bins=edges)[0].astype(np.float64)
    f_hist += np.histogram(m[g == 0], bins=edges)[0].astype(np.float64)
  tp = t_hist[::-1].cumsum()
  fn = t_hist.sum() - tp
  fp = f_hist[::-1].cumsum()
  non_zero = (tp + fp) != 0
  with np.errstate(divide='ignore', invalid='ignore'):
    precision, recall = tp / (tp + fp), tp / (tp + fn)
  return (precision[1:] * np.diff(recall))[non_zero[1:]].sum() * 100


# --------------------------------------------------------------------------------------------
# Map generators.
# --------------------------------------------------------------------------------------------
def _norm(m):
  m = m.astype(np.float64)
  m = m - m.min()
  return (m / m.max() if m.max() > 0 else m).astype(np.float32)


MAP_KINDS = ('lowres_noise', 'blobs', 'rings', 'lines', 'sparse', 'peaked', 'speckle')


def realistic_map(rng, size=224, kind=None):
  """A float32 ``[size, size]`` map in [0, 1] of ``MAP_KINDS[kind]`` (random kind if None)."""
  kind = rng.integers(0, 7) if kind is None else kind
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  if kind == 0:  # bicubic-upsampled low-res noise (CAM-like)
    r = int(rng.choice([3, 4, 7, 14, 28]))
    m = cv2.resize(
      rng.random((r, r)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
  elif kind == 1:  # gaussian blobs
    m = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 5)):
      cy, cx, s = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(5, 50)
      m += rng.uniform(0.3, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
  elif kind == 2:  # rings (holes), possibly several, plus low noise
    m = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 3)):
      cy, cx = rng.uniform(40, size - 40), rng.uniform(40, size - 40)
      rad, wid = rng.uniform(10, 60), rng.uniform(2, 10)
      d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
      m += np.exp(-((d - rad) ** 2) / (2 * wid * wid))
    m += 0.2 * cv2.resize(
      rng.random((7, 7)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
  elif kind == 3:  # thin lines on a faint background
    m = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 6)):
      p0 = tuple(int(v) for v in rng.integers(0, size, 2))
      p1 = tuple(int(v) for v in rng.integers(0, size, 2))
      cv2.line(m, p0, p1, float(rng.uniform(0.3, 1)), int(rng.integers(1, 3)))
    m += 0.1 * rng.random((size, size)).astype(np.float32) * (rng.random() < 0.5)
  elif kind == 4:  # sparse: thresholded CAM (many zeros, sharp edges)
    m = cv2.resize(
      rng.random((7, 7)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    m = np.where(m > np.quantile(m, rng.uniform(0.5, 0.95)), m, 0)
  elif kind == 5:  # peaked CAM (gamma) with plateaus from coarse quantization
    m = cv2.resize(
      rng.random((14, 14)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    m = _norm(m) ** rng.uniform(1, 4)
    m = np.round(m * rng.integers(4, 40)) / 40
  else:  # speckle: high-frequency noise (many tiny contours, area ties)
    m = cv2.resize(
      rng.random((56, 56)).astype(np.float32),
      (size, size),
      interpolation=cv2.INTER_NEAREST if rng.random() < 0.5 else cv2.INTER_CUBIC,
    )
  return _norm(m)


def speckle_heavy_map(rng, size=224):
  """A float32 ``[size, size]`` map like an untrained or overfitted network's Grad-CAM: low-res
  noise (14 to 112 cells) upsampled, per-pixel noise on top, then a ReLU above a random quantile:
  thousands of small components and holes at most levels, zero regions with islands."""
  r = int(rng.choice([14, 28, 56, 112]))
  interp = cv2.INTER_LINEAR if rng.random() < 0.5 else cv2.INTER_CUBIC
  m = cv2.resize(rng.standard_normal((r, r)).astype(np.float32), (size, size), interpolation=interp)
  m += rng.uniform(0.05, 0.5) * rng.standard_normal((size, size)).astype(np.float32)
  return _norm(np.maximum(m - np.quantile(m, rng.uniform(0.2, 0.7)), 0))


def bench_set(name, rng, num_maps, size=224):
  """The bench's map sets: ``'realistic'`` (kinds 0-5 in turn) or ``'speckle'`` (speckle-heavy
  maps and nearest-upsampled 56x56 noise, kind 6, in turn: many components, holes and ties)."""
  if name == 'realistic':
    return [realistic_map(rng, size, kind=i % 6) for i in range(num_maps)]
  if name == 'speckle':
    return [
      speckle_heavy_map(rng, size) if i % 2 == 0 else realistic_map(rng, size, kind=6)
      for i in range(num_maps)
    ]
  raise ValueError(f'unknown map set {name!r}; valid: {list(BENCH_SETS)}')


BENCH_SETS = ('realistic', 'speckle')


def gt_boxes_near(rng, m):
  size = m.shape[0]
  q = m > rng.uniform(0.3, 0.9) * m.max() if m.max() > 0 else np.ones_like(m, bool)
  ys, xs = np.nonzero(q)
  boxes = []
  for _ in range(rng.integers(1, 4)):
    j = rng.integers(-15, 16, 4)
    x0, y0 = np.clip([xs.min() + j[0], ys.min() + j[1]], 0, size - 1)
    x1, y1 = np.clip([xs.max() + j[2], ys.max() + j[3]], 0, size - 1)
    boxes.append([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)])
  return np.asarray(boxes, dtype=np.int64)


def assert_same(a, b, path=''):
  if isinstance(a, dict):
    for k in b:
      assert_same(a[k], b[k], f'{path}.{k}')
  else:
    assert abs(float(a) - float(b)) <= 1e-9, (path, a, b)


def hand_maps():
  yy, xx = np.mgrid[:64, :64].astype(np.float32)
  uni = np.exp(-((yy - 30) ** 2 + (xx - 20) ** 2) / 200.0)
  blobs = np.exp(-((yy - 15) ** 2 + (xx - 15) ** 2) / 30.0) + 0.7 * np.exp(
    -((yy - 45) ** 2 + (xx - 50) ** 2) / 20.0
  )
  d = np.sqrt((yy - 32) ** 2 + (xx - 32) ** 2)
  ring = np.exp(-((d - 15) ** 2) / 8.0)
  lines = np.zeros((64, 64), np.float32)
  cv2.line(lines, (3, 5), (60, 5), 1.0, 1)
  cv2.line(lines, (10, 20), (40, 50), 0.8, 1)
  lines[63, :] = 0.5  # touches the image border
  return {
    'unimodal': _norm(uni),
    'blobs': _norm(blobs),
    'ring': _norm(ring),
    'lines': _norm(lines),
    'zeros': np.zeros((64, 64), np.float32),
  }


@functools.lru_cache(maxsize=1)
def realistic_set():
  """240 realistic maps (all kinds), their GT boxes and top-1 flags; built once per process."""
  rng = np.random.default_rng(1234)
  maps = [realistic_map(rng) for _ in range(240)]
  gts = [gt_boxes_near(rng, m) for m in maps]
  correct = rng.random(len(maps)) < 0.7
  return maps, gts, correct
