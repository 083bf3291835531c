"""The rest of pytorch-grad-cam 1.5.7 against the package itself (issue 24, section 5): RefineCAM,
SegEigenCAM, the Complexity / Coherency / ARCC metrics, ROAD with Otsu's threshold, and ScoreCAM
on a layer with dead and repeated channels (where ScoreCAM's deduplication acts). Same small CNN,
weights and images as ``test_cam_parity.py``; ``python tests/test_cam_parity_more.py`` prints
the worst difference of each (docs/explain_methods_more.md's table)."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_cam_parity import TOL, JaxNet, import_grad_cam, setup_models

torch = pytest.importorskip('torch')

from dualsig_jax.cam import meta_methods, quality_metrics  # noqa: E402
from dualsig_jax.cam import road_metrics as road  # noqa: E402
from dualsig_jax.cam.explain import explain  # noqa: E402

pytestmark = pytest.mark.filterwarnings('ignore:__array_wrap__ must accept context')


def _tx(x):
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _targets(gc_targets, t):
  return [gc_targets.ClassifierOutputTarget(int(i)) for i in np.asarray(t)]


def method_errors(seed=0):
  """{label: worst |ours - package|} of RefineCAM, SESS and SegEigenCAM maps."""
  gc = import_grad_cam()
  tnet, variables, x = setup_models(seed)
  net, xj = JaxNet(), jnp.asarray(x)
  errors = {}
  ours, _ = meta_methods.refine_cam(net, variables, xj, ['stem', 'block'])
  ref = gc.RefineCAM(tnet, [tnet.stem, tnet.block])(_tx(x))
  errors['RefineCAM (gradcam++, stem + block)'] = float(np.abs(np.asarray(ours) - ref).max())
  ours, _ = meta_methods.refine_cam(net, variables, xj, ['stem', 'block'], method='gradcam')
  ref = gc.RefineCAM(tnet, [tnet.stem, tnet.block], base_method=gc.GradCAM)(_tx(x))
  errors['RefineCAM (gradcam, stem + block)'] = float(np.abs(np.asarray(ours) - ref).max())
  for kwargs in ({'num_scales': 4}, {'num_scales': 3, 'pool': 'max', 'pre_filter_ratio': 0.3}):
    ours, _ = meta_methods.sess(net, variables, xj, 'block', **kwargs)
    ref = gc.SESS(tnet, [tnet.block], **kwargs)(_tx(x))
    label = 'SESS (gradcam, ' + ', '.join(f'{k}={v}' for k, v in kwargs.items()) + ')'
    errors[label] = float(np.abs(np.asarray(ours) - ref).max())
  ours, _ = explain(net, variables, xj, 'block', ('segeigencam',))
  ref = gc.SegEigenCAM(tnet, [tnet.block])(_tx(x), targets=None)
  errors['segeigencam'] = float(np.abs(np.asarray(ours['segeigencam']) - ref).max())
  return errors


def _dead_and_repeated(tnet, variables):
  """Block conv channels 0, 1 dead (zero weights, bias -1: zero after the ReLU) and channel 5
  a copy of channel 4, in both models."""
  conv = tnet.block[0]
  with torch.no_grad():
    conv.weight[:2] = 0.0
    conv.bias[:2] = -1.0
    conv.weight[5] = conv.weight[4]
    conv.bias[5] = conv.bias[4]
  p = variables['params']['block']['conv']
  p['kernel'] = jnp.asarray(conv.weight.detach().numpy().transpose(2, 3, 1, 0))
  p['bias'] = jnp.asarray(conv.bias.detach().numpy())


def scorecam_dedup_error(seed=0):
  gc = import_grad_cam()
  tnet, variables, x = setup_models(seed)
  _dead_and_repeated(tnet, variables)
  ours, _ = explain(JaxNet(), variables, jnp.asarray(x), 'block', ('scorecam',), batch_size=4)
  cam = gc.ScoreCAM(tnet, [tnet.block])
  cam.batch_size = 16
  ref = cam(input_tensor=_tx(x), targets=None)
  return {
    'scorecam, 2 dead + 1 repeated channel': float(np.abs(np.asarray(ours['scorecam']) - ref).max())
  }


def metric_errors(seed=0):
  """{label: worst |ours - package|} of Complexity, Coherency, ARCC and ROAD 'auto' (imputation
  noise 0 on both sides, as test_cam_parity's ROAD)."""
  gc = import_grad_cam()
  from pytorch_grad_cam.metrics import arcc as parcc
  from pytorch_grad_cam.metrics import road as proad
  from pytorch_grad_cam.utils import model_targets

  tnet, variables, x = setup_models(seed)
  net, xj, tx = JaxNet(), jnp.asarray(x), _tx(x)
  maps, targets = explain(net, variables, xj, 'block', ('gradcam',))
  cams = np.array(maps['gradcam'])
  tt = _targets(model_targets, targets)
  errors = {}
  ours = quality_metrics.complexity(maps['gradcam'])
  errors['Complexity'] = float(np.abs(np.asarray(ours) - parcc.Complexity()(cams)).max())
  ours = quality_metrics.coherency(
    net, variables, xj, maps['gradcam'], targets, target_layer='block', method='gradcam'
  )
  theirs = parcc.Coherency()(tx, cams, tt, tnet, gc.GradCAM(tnet, [tnet.block]))
  errors['Coherency (gradcam)'] = float(np.abs(np.asarray(ours) - theirs).max())
  orig_init = proad.NoisyLinearImputer.__init__
  proad.NoisyLinearImputer.__init__ = lambda self, noise=0.0, weighting=None: orig_init(self, 0.0)
  try:
    ours = quality_metrics.arcc(
      net, variables, xj, maps['gradcam'], targets, target_layer='block', noise=0.0
    )
    theirs = parcc.ARCC(gc.GradCAM(tnet, [tnet.block]))(tx, cams, tt, tnet)
    errors['ARCC (gradcam)'] = float(np.abs(np.asarray(ours) - theirs).max())
    for order, cls in (
      ('morf', proad.ROADMostRelevantFirst),
      ('lerf', proad.ROADLeastRelevantFirst),
    ):
      ours = road.road(
        net, variables, xj, maps['gradcam'], targets, order=order, percentiles='auto', noise=0.0
      )
      theirs = cls(percentile='auto')(tx, cams, tt, tnet)
      errors[f"ROAD {order} percentile='auto'"] = float(
        np.abs(np.asarray(ours)[:, 0] - theirs).max()
      )
  finally:
    proad.NoisyLinearImputer.__init__ = orig_init
  return errors


DFF_K = 4
DFF_TOL = 1e-3  # relative; see dff_errors


def dff_errors(seed=0):
  """Worst differences of Deep Feature Factorization (4 concepts at 'block', the head as the
  concepts' classifier): concepts and class scores relative to their largest magnitude, maps
  absolute (in [0, 1]), and the iterations each side ran. The solver is scikit-learn's
  coordinate descent from the same start, but its sums run in another order (BLAS vs XLA), so
  float32 rounding drifts over the iterations; the tolerance (1e-3) bounds that drift."""
  gc = import_grad_cam()
  from dualsig_jax.cam.factorization import deep_feature_factorization

  tnet, variables, x = setup_models(seed)
  fc = variables['params']['fc']
  concepts, maps, scores = deep_feature_factorization(
    JaxNet(),
    variables,
    jnp.asarray(x),
    'block',
    DFF_K,
    concept_scores_fn=lambda c: c @ fc['kernel'] + fc['bias'],
  )
  dff = gc.DeepFeatureFactorization(tnet, tnet.block, computation_on_concepts=tnet.fc)
  r_concepts, r_maps, r_scores = dff(_tx(x), DFF_K)
  r_maps = np.stack(r_maps)  # [B, k, H, W]

  def rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())

  return {
    'DFF concepts (relative)': rel(concepts, r_concepts),
    'DFF maps': float(np.abs(np.asarray(maps) - r_maps).max()),
    'DFF concept class scores (relative)': rel(scores, r_scores),
  }


def test_deep_feature_factorization_matches_pytorch_grad_cam_to_a_tolerance():
  errors = dff_errors()
  bad = {k: v for k, v in errors.items() if not v < DFF_TOL}
  assert not bad, f'worse than {DFF_TOL}: {bad} (all: {errors})'


def test_refinecam_sess_and_segeigencam_match_pytorch_grad_cam():
  errors = method_errors()
  bad = {k: v for k, v in errors.items() if not v < TOL}
  assert not bad, f'worse than {TOL}: {bad} (all: {errors})'


def test_scorecam_with_dead_and_repeated_channels_matches_pytorch_grad_cam():
  errors = scorecam_dedup_error()
  assert all(v < TOL for v in errors.values()), errors


def test_quality_metrics_and_road_otsu_match_pytorch_grad_cam():
  errors = metric_errors()
  bad = {k: v for k, v in errors.items() if not v < TOL}
  assert not bad, f'worse than {TOL}: {bad} (all: {errors})'


def test_otsu_threshold_matches_opencv():
  cv2 = pytest.importorskip('cv2')
  rng = np.random.default_rng(0)
  imgs = [
    rng.integers(0, 256, (16, 16)),
    np.concatenate([rng.integers(10, 60, 128), rng.integers(150, 240, 128)]).reshape(16, 16),
    np.full((16, 16), 7),
    np.r_[np.zeros(200), np.full(56, 255)].reshape(16, 16),
  ]
  u8 = np.stack(imgs).astype(np.uint8)
  ours = np.asarray(road.otsu_threshold(jnp.asarray(u8.reshape(4, -1))))
  theirs = [int(cv2.threshold(i, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0]) for i in u8]
  for o, t, img in zip(ours, theirs, u8):  # equal thresholds, or the same binary image
    assert o == t or np.array_equal(img > o, img > t), (ours, theirs)


if __name__ == '__main__':
  import_grad_cam()  # declares torchvision's op schemas first when its C++ ops do not load

  all_errors = {**method_errors(), **scorecam_dedup_error(), **metric_errors(), **dff_errors()}
  for name, err in all_errors.items():
    print(f'{name:40s} {err:.2e}')
