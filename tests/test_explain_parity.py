"""cam.explain against the real pytorch-grad-cam 1.5.7 for what issue 24 adds: the semantic
segmentation target on a small fully convolutional model, and a list of two target layers.

Both models are written twice (torch / Linen) with the same weights; maps must agree to 1e-4
like the single-layer methods (``python tests/test_explain_parity.py`` prints the worst
differences).
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from test_cam_parity import JaxNet, _conv, import_grad_cam, setup_models  # noqa: E402

from dualsig_jax.cam import explain  # noqa: E402
from dualsig_jax.cam import targets as T  # noqa: E402

pytestmark = pytest.mark.filterwarnings('ignore:__array_wrap__ must accept context')
TOL = 1e-4
K, B, S = 3, 2, 12
SEG_METHODS = {
  'gradcam': 'GradCAM',
  'hirescam': 'HiResCAM',
  'gradcam++': 'GradCAMPlusPlus',
  'layercam': 'LayerCAM',
  'scorecam': 'ScoreCAM',
}
LAYER_METHODS = {'gradcam': 'GradCAM', 'layercam': 'LayerCAM', 'scorecam': 'ScoreCAM'}


class TorchFCN(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
    self.classifier = torch.nn.Conv2d(8, K, 1)

  def forward(self, x):
    return self.classifier(torch.tanh(self.block(self.stem(x))))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(8, (3, 3), padding=1, name='conv')(x))


class FCN(nn.Module):
  @nn.compact
  def __call__(self, x):
    a = Block(name='block')(Block(name='stem')(x))
    return nn.Conv(K, (1, 1), name='classifier')(jnp.tanh(a))  # [B, H, W, K]


def segmentation_errors(seed=0, category=1):
  gc = import_grad_cam()
  from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

  torch.manual_seed(seed)
  tnet = TorchFCN().eval()
  variables = {
    'params': {
      'stem': {'conv': _conv(tnet.stem[0])},
      'block': {'conv': _conv(tnet.block[0])},
      'classifier': _conv(tnet.classifier),
    }
  }
  x = np.random.default_rng(seed).normal(size=(B, S, S, 3)).astype(np.float32)
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    mask = (tnet(tx).argmax(1) == category).numpy().astype(np.float32)  # [B, H, W]
  assert 0 < mask.mean() < 1
  target = T.SemanticSegmentationTarget(category, jnp.asarray(mask))
  ours, scores = explain(FCN(), variables, jnp.asarray(x), 'block', tuple(SEG_METHODS), target)
  errors = {}
  for m, cls in SEG_METHODS.items():
    cam = getattr(gc, cls)(tnet, [tnet.block])
    cam.batch_size = 16
    ref = cam(input_tensor=tx, targets=[SemanticSegmentationTarget(category, k) for k in mask])
    errors[f'segmentation {m}'] = float(np.abs(np.asarray(ours[m]) - ref).max())
  with torch.no_grad():
    ref_scores = (tnet(tx)[:, category] * torch.from_numpy(mask)).sum((1, 2)).numpy()
  errors['segmentation target score'] = float(np.abs(np.asarray(scores) - ref_scores).max())
  return errors


def two_layer_errors(seed=0):
  gc = import_grad_cam()
  tnet, variables, x = setup_models(seed)
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  ours, _ = explain(JaxNet(), variables, jnp.asarray(x), ['stem', 'block'], tuple(LAYER_METHODS))
  errors = {}
  for m, cls in LAYER_METHODS.items():
    cam = getattr(gc, cls)(tnet, [tnet.stem, tnet.block])
    cam.batch_size = 16
    ref = cam(input_tensor=tx, targets=None)
    errors[f'2 layers {m}'] = float(np.abs(np.asarray(ours[m]) - ref).max())
  return errors


def test_segmentation_target_matches_pytorch_grad_cam():
  errors = segmentation_errors()
  bad = {k: v for k, v in errors.items() if not v < TOL}
  assert not bad, f'worse than {TOL}: {bad} (all: {errors})'


def test_two_target_layers_match_pytorch_grad_cam():
  errors = two_layer_errors()
  bad = {k: v for k, v in errors.items() if not v < TOL}
  assert not bad, f'worse than {TOL}: {bad} (all: {errors})'


if __name__ == '__main__':
  for name, err in {**segmentation_errors(), **two_layer_errors()}.items():
    print(f'{name:30s} {err:.2e}')
