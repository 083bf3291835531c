"""Draws docs/architecture.png: the dual-branch model as dualsig_jax builds it.

    python docs/draw_architecture.py

Shapes in the boxes come from a real `build_model('resnet50', 1000)` forward pass at 224 px.
"""

import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from dualsig_jax import models  # noqa: E402


def _shapes():
  model = models.build_model('resnet50', 1000)
  variables = jax.eval_shape(lambda: models.init_variables(model, 0, 224))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 224, 224, 3))), variables)
  return {k: tuple(v.shape) for k, v in out.items()}


def _box(ax, xy, w, h, text, color, frozen=False):
  ax.add_patch(
    FancyBboxPatch(
      xy, w, h, boxstyle='round,pad=0.02', fc=color, ec='#333', lw=1.2, ls='--' if frozen else '-'
    )
  )
  ax.text(xy[0] + w / 2, xy[1] + h / 2, text, ha='center', va='center', fontsize=9)


def _arrow(ax, a, b, color='#333'):
  ax.add_patch(FancyArrowPatch(a, b, arrowstyle='-|>', mutation_scale=12, color=color, lw=1.2))


def main(path=None):
  path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'architecture.png')
  s = _shapes()
  f = s['features']
  fig, ax = plt.subplots(figsize=(11, 4.2))
  ax.set_xlim(0, 11)
  ax.set_ylim(0, 4.2)
  ax.axis('off')
  frozen, trained = '#d9e2f3', '#fde2c4'
  _box(ax, (0.1, 1.6), 1.2, 1.0, 'image\n[B,224,224,3]', '#eeeeee')
  _box(
    ax,
    (1.7, 1.4),
    1.9,
    1.4,
    'backbone f\n(ResNet50-CAM)\nstop_gradient\nBN inference',
    frozen,
    True,
  )
  _box(ax, (4.0, 1.6), 1.5, 1.0, f'features F\n[B,{f[1]},{f[2]},{f[3]}]', '#eeeeee')
  _box(ax, (6.0, 1.6), 0.8, 1.0, 'GAP', '#eeeeee')
  _box(ax, (7.3, 2.8), 1.6, 0.9, 'fc (softmax)\nfrozen', frozen, True)
  _box(ax, (7.3, 0.5), 1.6, 0.9, 'fc2 (sigmoid)\ncloned from fc\ntrained', trained)
  _box(ax, (9.3, 2.8), 1.6, 0.9, 'prediction k*\n(Top-1 unchanged)', '#eeeeee')
  _box(ax, (9.3, 0.5), 1.6, 0.9, 'class-balanced BCE\npos_weight = C - 1', trained)
  _arrow(ax, (1.3, 2.1), (1.7, 2.1))
  _arrow(ax, (3.6, 2.1), (4.0, 2.1))
  _arrow(ax, (5.5, 2.1), (6.0, 2.1))
  _arrow(ax, (6.8, 2.3), (7.3, 3.2))
  _arrow(ax, (6.8, 1.9), (7.3, 0.95))
  _arrow(ax, (8.9, 3.25), (9.3, 3.25))
  _arrow(ax, (8.9, 0.95), (9.3, 0.95))
  _arrow(ax, (9.3, 2.85), (8.1, 1.45), color='#b05000')
  ax.text(
    4.75,
    0.75,
    'CAM of k* from the sigmoid head:\n'
    r'$\tilde M_{k^*} = \sum_c \mathrm{ReLU}(\tilde w_{k^*,c})\,F_c$'
    '\n(Grad-CAM & co. on the sigmoid logit)',
    ha='center',
    va='center',
    fontsize=9,
    color='#b05000',
  )
  ax.text(
    0.1,
    3.9,
    'Dual-branch sigmoid head (Oh & Noh, BMVC 2025): dashed = frozen, '
    'orange = trained in the dual stage',
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(path)


if __name__ == '__main__':
  main()
