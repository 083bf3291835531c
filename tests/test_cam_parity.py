"""cam.explain against the real pytorch-grad-cam 1.5.7: same converted weights, same images.

A small CNN is written twice (torch / Linen) with the same weights; the target layer is a
conv + ReLU block followed by a tanh conv (so ShapleyCAM's Hessian term is not zero) and a
GAP + linear head. Every method's maps must agree to 1e-4 (``python tests/test_cam_parity.py``
prints the worst difference per method, the README's table). EigenCAM / EigenGradCAM / eigen
smoothing depend on the sign LAPACK gives the singular vector: per image, the map must equal
the package's map or the one it gives with the projection negated.

PyPI's torchvision wheel is built for CUDA torch; beside the CPU torch its C++ ops do not load,
and its import then fails registering fake kernels for ``torchvision::nms`` / ``qnms``.
pytorch-grad-cam's CAM methods never call those ops, so the two schemas are declared (no
kernel) before the import when the library did not load.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from dualsig_jax.cam.explain import DEFAULT_OPTIONS, explain  # noqa: E402

# pytorch-grad-cam's numpy calls on torch tensors (numpy 2 deprecation, not ours).
pytestmark = pytest.mark.filterwarnings('ignore:__array_wrap__ must accept context')

K, B, S = 6, 3, 16
TOL = 1e-4
_TV_OPS = ('nms', 'qnms')
_TV_LIBS = []  # keeps the declarations alive


def _has_op(name):
  try:
    getattr(torch.ops.torchvision, name)
    return True
  except (AttributeError, RuntimeError):
    return False


def import_grad_cam():
  """Import pytorch_grad_cam (1.5.7), declaring torchvision's op schemas if its _C is absent."""
  import importlib.util

  spec = importlib.util.find_spec('torchvision')
  if spec is None or importlib.util.find_spec('pytorch_grad_cam') is None:
    pytest.skip('grad-cam==1.5.7 / torchvision not installed (pip install -e ".[test]")')
  lib_path = os.path.join(os.path.dirname(spec.origin), '_C.so')
  try:
    torch.ops.load_library(lib_path)
  except (OSError, RuntimeError):
    missing = [op for op in _TV_OPS if not _has_op(op)]
    if missing:  # FRAGMENT: a second call (or another module) may have declared some already
      _TV_LIBS.append(torch.library.Library('torchvision', 'FRAGMENT'))
      for op in missing:
        _TV_LIBS[-1].define(f'{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  import pytorch_grad_cam

  return pytorch_grad_cam


class TorchNet(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 12, 3, padding=1), torch.nn.ReLU())
    self.conv3 = torch.nn.Conv2d(12, 12, 3, padding=1)
    self.fc = torch.nn.Linear(12, K)

  def forward(self, x):
    x = self.block(torch.nn.functional.max_pool2d(self.stem(x), 2))
    return self.fc(torch.tanh(self.conv3(x)).mean(dim=(2, 3)))


class Block(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(self.features, (3, 3), padding=1, name='conv')(x))


class JaxNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = Block(8, name='stem')(x)
    x = Block(12, name='block')(nn.max_pool(x, (2, 2), (2, 2)))
    x = jnp.tanh(nn.Conv(12, (3, 3), padding=1, name='conv3')(x))
    return nn.Dense(K, name='fc')(x.mean(axis=(1, 2)))


def _conv(m):
  return {
    'kernel': jnp.asarray(m.weight.detach().numpy().transpose(2, 3, 1, 0)),
    'bias': jnp.asarray(m.bias.detach().numpy()),
  }


def setup_models(seed=0):
  torch.manual_seed(seed)
  tnet = TorchNet().eval()
  params = {
    'stem': {'conv': _conv(tnet.stem[0])},
    'block': {'conv': _conv(tnet.block[0])},
    'conv3': _conv(tnet.conv3),
    'fc': {
      'kernel': jnp.asarray(tnet.fc.weight.detach().numpy().T),
      'bias': jnp.asarray(tnet.fc.bias.detach().numpy()),
    },
  }
  x = np.random.default_rng(seed).normal(size=(B, S, S, 3)).astype(np.float32)
  return tnet, {'params': params}, x


# explain name -> (class name in pytorch_grad_cam, eigen sign ambiguity)
PACKAGE_CLASSES = {
  'gradcam': ('GradCAM', False),
  'hirescam': ('HiResCAM', False),
  'gradcam++': ('GradCAMPlusPlus', False),
  'xgradcam': ('XGradCAM', False),
  'layercam': ('LayerCAM', False),
  'gradcamelementwise': ('GradCAMElementWise', False),
  'eigencam': ('EigenCAM', True),
  'eigengradcam': ('EigenGradCAM', True),
  'kpcacam': ('KPCA_CAM', False),
  'scorecam': ('ScoreCAM', False),
  'ablationcam': ('AblationCAM', False),
  'shapleycam': ('ShapleyCAM', False),
  'finercam': ('FinerCAM', False),
  'fem': ('FEM', False),
  'randomcam': ('RandomCAM', False),
}
# (label, explain method, explain kwargs, package call kwargs)
CASES = [(m, m, {}, {}) for m in PACKAGE_CLASSES] + [
  ('gradcam eigen_smooth', 'gradcam', {'eigen_smooth': True}, {'eigen_smooth': True}),
  ('hirescam aug_smooth', 'hirescam', {'aug_smooth': True}, {'aug_smooth': True}),
]


def _package_maps(gc, tnet, x, method, call_kwargs, negate=False):
  cls_name, _ = PACKAGE_CLASSES[method]
  cam = getattr(gc, cls_name)(tnet, [tnet.block])
  cam.batch_size = 16  # ScoreCAM reads it; AblationCAM has its own (32)
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  patches = []
  if negate:  # the other sign of the first singular vector
    import pytorch_grad_cam.base_cam as bc
    import pytorch_grad_cam.eigen_cam as ec
    import pytorch_grad_cam.eigen_grad_cam as egc

    for mod in (bc, ec, egc):
      orig = mod.get_2d_projection
      patches.append((mod, orig))
      mod.get_2d_projection = lambda a, _o=orig: -_o(a)
  try:
    return cam(input_tensor=tx, targets=None, **call_kwargs)
  finally:
    for mod, orig in patches:
      mod.get_2d_projection = orig


def parity_errors(seed=0):
  """``{label: worst |ours - package|}`` over all images and pixels."""
  gc = import_grad_cam()
  import pytorch_grad_cam.random_cam as rc

  tnet, variables, x = setup_models(seed)
  # RandomCAM draws its weights from NumPy; hand it the ones explain draws with JAX.
  rand_w = np.asarray(
    jax.random.uniform(jax.random.key(DEFAULT_OPTIONS['random_seed']), (B, 12), minval=-1.0)
  )
  orig_uniform = rc.np.random.uniform
  errors = {}
  try:
    rc.np.random.uniform = lambda low, high, size: rand_w.reshape(size)
    for label, method, kwargs, call_kwargs in CASES:
      ours, _ = explain(JaxNet(), variables, jnp.asarray(x), 'block', (method,), **kwargs)
      ours = np.asarray(ours[method])
      ref = _package_maps(gc, tnet, x, method, call_kwargs)
      err = np.abs(ours - ref).max(axis=(1, 2))
      if PACKAGE_CLASSES[method][1] or kwargs.get('eigen_smooth'):
        neg = _package_maps(gc, tnet, x, method, call_kwargs, negate=True)
        err = np.minimum(err, np.abs(ours - neg).max(axis=(1, 2)))
      errors[label] = float(err.max())
  finally:
    rc.np.random.uniform = orig_uniform
  return errors


def test_every_method_matches_pytorch_grad_cam():
  errors = parity_errors()
  bad = {k: v for k, v in errors.items() if not v < TOL}
  assert not bad, f'worse than {TOL}: {bad} (all: {errors})'


def test_targets_match_package_argmax():
  tnet, variables, x = setup_models(1)
  _, targets = explain(JaxNet(), variables, jnp.asarray(x), 'block')
  with torch.no_grad():
    ref = tnet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().argmax(-1)
  np.testing.assert_array_equal(np.asarray(targets), ref)


# ----------------------------------------------------------------------------- guided, metrics


def metric_errors(seed=0):
  """Worst |ours - package| of Guided Backprop, Guided Grad-CAM, CamMultImageConfidenceChange
  and ROAD (MoRF / LeRF at the package's percentiles, ROADCombined), noise off on both sides."""
  gc = import_grad_cam()
  from pytorch_grad_cam.metrics import road as proad
  from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
  from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

  from dualsig_jax.cam import guided
  from dualsig_jax.cam import road_metrics as road

  tnet, variables, x = setup_models(seed)
  net, xj = JaxNet(), jnp.asarray(x)
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  maps, targets = explain(net, variables, xj, 'block')
  cams = np.array(maps['gradcam'])
  errors = {}

  gb, _ = guided.guided_backprop(net, variables, xj)
  ggc, _ = guided.guided_gradcam(net, variables, xj, 'block')
  gbm = gc.GuidedBackpropReLUModel(tnet, device='cpu')
  ref = np.stack([gbm(tx[i : i + 1], target_category=None) for i in range(B)])
  errors['guided backprop'] = float(np.abs(np.asarray(gb) - ref).max() / np.abs(ref).max())
  ref_ggc = ref * _package_maps(gc, tnet, x, 'gradcam', {})[..., None]
  errors['guided grad-cam'] = float(np.abs(np.asarray(ggc) - ref_ggc).max() / np.abs(ref).max())

  tt = [ClassifierOutputTarget(int(t)) for t in np.asarray(targets)]
  ours = road.cam_mult_image_confidence_change(net, variables, xj, maps['gradcam'], targets)
  theirs = CamMultImageConfidenceChange()(tx, cams, tt, tnet)
  errors['CamMultImageConfidenceChange'] = float(np.abs(np.asarray(ours) - theirs).max())

  orig_init = proad.NoisyLinearImputer.__init__
  proad.NoisyLinearImputer.__init__ = lambda self, noise=0.0, weighting=None: orig_init(self, 0.0)
  try:
    for order, cls, p in (
      ('morf', proad.ROADMostRelevantFirst, 80),
      ('lerf', proad.ROADLeastRelevantFirst, 20),
    ):
      ours = road.road(
        net, variables, xj, maps['gradcam'], targets, order=order, percentiles=(p,), noise=0.0
      )
      theirs = cls(percentile=p)(tx, cams, tt, tnet)
      errors[f'ROAD {order} {p}'] = float(np.abs(np.asarray(ours)[:, 0] - theirs).max())
    ours = road.road_combined(net, variables, xj, maps['gradcam'], targets, noise=0.0)
    theirs = proad.ROADCombined()(tx, cams, tt, tnet)
    errors['ROADCombined'] = float(np.abs(np.asarray(ours) - theirs).max())
  finally:
    proad.NoisyLinearImputer.__init__ = orig_init
  return errors


def test_guided_and_metrics_match_pytorch_grad_cam():
  errors = metric_errors()
  bad = {k: v for k, v in errors.items() if not v < TOL}
  assert not bad, f'worse than {TOL}: {bad} (all: {errors})'


if __name__ == '__main__':
  import pytorch_grad_cam as _pgc  # noqa: F401 (after the schema shim in import_grad_cam)

  for name, err in {**parity_errors(), **metric_errors()}.items():
    print(f'{name:30s} {err:.2e}')
