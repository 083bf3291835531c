"""The paper's published numbers, as data, and the lookup that puts them beside a run's.

Source: Oh & Noh, *Beyond Softmax: Dual-Branch Sigmoid Architecture for Accurate Class
Activation Maps*, BMVC 2025 -- Table 2 (WSOL on ImageNet-1K and OpenImages-1K) and Table 1
(explanation fidelity on CUB-200-2011 and Stanford Cars), transcribed from the paper's table
images (the project's `shared/reference/tables/wsol_result.png` and `xai_result.png`, and
PAPER.md). The numbers were produced by the PyTorch reference code.

Which model family a published row belongs to follows the reference (`main.py:194`): plain CAM
rows come from the `wsol_cam/` models (`family='cam'`), every gradient method's rows from the
`wsol/` models (`family='standard'`).
"""

from __future__ import annotations

SOURCE = 'Oh & Noh, BMVC 2025'

# Table 2: {(dataset, arch, method): {head: {metric: value}}}; head 'softmax' = the baseline
# (the paper's gray row), 'sigmoid' = "+ Ours". Top-1 Cls is the softmax head's.
_T2_IMAGENET = {
  ('vgg16', 'cam'): ((66.56, 43.11, 59.53, 60.00), (43.13, 59.56, 60.25)),
  ('vgg16', 'gradcam'): ((69.62, 37.01, 48.99, 52.50), (44.69, 59.44, 60.17)),
  ('resnet50', 'cam'): ((73.87, 47.67, 60.80, 63.52), (49.44, 62.68, 64.73)),
  ('resnet50', 'gradcam'): ((69.01, 41.15, 55.29, 57.03), (40.33, 53.60, 57.99)),
  ('inception_v3', 'cam'): ((69.72, 42.16, 57.69, 63.51), (44.11, 60.12, 64.98)),
  ('inception_v3', 'gradcam'): ((67.79, 34.57, 46.35, 52.30), (33.72, 45.18, 53.06)),
}
_T2_OPENIMAGES = {  # (Top-1 Cls, PxAP baseline), PxAP ours
  ('vgg16', 'cam'): ((70.00, 58.17), 60.16),
  ('vgg16', 'gradcam'): ((70.12, 55.25), 56.53),
  ('resnet50', 'cam'): ((74.02, 59.36), 60.49),
  ('resnet50', 'gradcam'): ((74.02, 60.56), 60.24),
  ('inception_v3', 'cam'): ((56.22, 62.25), 63.65),
  ('inception_v3', 'gradcam'): ((68.56, 49.64), 48.16),
}
# Table 1: (Avg Drop baseline, ours, Inc Conf baseline, ours).
_T1 = {
  'CUB': {
    'vgg16': {
      'cam': (45.36, 37.20, 7.08, 18.86),
      'gradcam': (38.88, 35.66, 11.36, 22.06),
      'gradcam++': (31.11, 33.98, 14.46, 21.75),
      'xgradcam': (38.56, 38.04, 11.10, 20.99),
      'layercam': (37.19, 41.58, 11.27, 19.50),
    },
    'resnet50': {
      'cam': (44.17, 13.86, 14.76, 18.42),
      'gradcam': (46.38, 19.07, 13.07, 13.22),
      'gradcam++': (43.15, 18.88, 14.50, 13.72),
      'xgradcam': (46.38, 19.07, 13.07, 13.22),
      'layercam': (43.69, 19.07, 13.91, 13.22),
    },
  },
  'CARS': {
    'vgg16': {
      'cam': (31.45, 43.58, 9.68, 10.74),
      'gradcam': (56.10, 9.96, 8.11, 19.46),
      'gradcam++': (39.63, 9.46, 11.71, 18.46),
      'xgradcam': (50.59, 9.69, 9.14, 20.53),
      'layercam': (47.51, 10.51, 9.70, 19.39),
    },
    'resnet50': {
      'cam': (48.86, 3.77, 4.32, 40.62),
      'gradcam': (29.53, 3.66, 14.56, 41.41),
      'gradcam++': (24.68, 3.65, 17.31, 41.62),
      'xgradcam': (29.53, 3.66, 14.56, 41.41),
      'layercam': (22.64, 3.66, 18.90, 41.39),
    },
  },
}


def _build() -> dict:
  rows = {}
  for (arch, method), (base, ours) in _T2_IMAGENET.items():
    cls, t1, gt, mba = base
    rows[('ILSVRC', arch, method)] = {
      'table': 'Table 2',
      'softmax': dict(top1_cls=cls, top1_loc=t1, gt_known_loc=gt, maxboxacc_v2=mba),
      'sigmoid': dict(zip(('top1_loc', 'gt_known_loc', 'maxboxacc_v2'), ours)),
    }
  for (arch, method), ((cls, pxap), ours) in _T2_OPENIMAGES.items():
    rows[('OpenImages', arch, method)] = {
      'table': 'Table 2',
      'softmax': dict(top1_cls=cls, pxap=pxap),
      'sigmoid': dict(pxap=ours),
    }
  for dataset, archs in _T1.items():
    for arch, methods in archs.items():
      for method, (drop0, drop1, inc0, inc1) in methods.items():
        rows[(dataset, arch, method)] = {
          'table': 'Table 1',
          'softmax': dict(avg_drop=drop0, inc_conf=inc0),
          'sigmoid': dict(avg_drop=drop1, inc_conf=inc1),
        }
  return rows


# {(dataset_name, arch, method): {'table': str, 'softmax': {metric: float}, 'sigmoid': {...}}}
# with dataset names as `config.input.dataset_name` spells them and methods as vocab.CAM_METHODS.
PUBLISHED = _build()


def published_family(method: str) -> str:
  """The model family of the paper's rows for `method` (the reference picks it by method)."""
  return 'cam' if method == 'cam' else 'standard'


def lookup(dataset: str, arch: str, family: str, method: str) -> tuple[dict | None, str]:
  """The published row matching a run, and a sentence saying what matched or why none does.

  Returns `(row, why)`: `row` as in `PUBLISHED` (None when nothing matches).
  """
  row = PUBLISHED.get((dataset, arch, method))
  if row is None:
    return None, (
      f'no published row for {method} with {arch} on {dataset} '
      '(the paper reports ILSVRC / OpenImages in Table 2 and CUB / CARS in Table 1, with '
      'vgg16, resnet50 and inception_v3)'
    )
  want = published_family(method)
  if family != want and arch != 'resnet50':  # the standard ResNet50 is the CAM one
    return None, (
      f"the paper's {method} rows for {arch} use family {want!r}, this run {family!r}: "
      'not comparable'
    )
  return row, f'{SOURCE}, {row["table"]}'
