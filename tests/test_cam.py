"""Tests for dualsig_jax.cam: formulas, torch parity, the paper's property, resize, jit, fidelity.

Models here are tiny plain Flax/torch CNNs written for the test (GAP + Dense heads ``fc`` and
``fc2``), so this file does not depend on dualsig_jax.models.
"""

import os

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualsig_jax import cam as C
from dualsig_jax.cam import plots, resize

K = 5  # classes


# ----------------------------------------------------------------------------- NumPy references
# Transcriptions of pytorch-grad-cam / wsolevaluation, in their NCHW layout.


def np_weights(method, a, g):
  """a, g: [B, C, h, w] -> channel weights [B, C] (pytorch-grad-cam get_cam_weights)."""
  if method == 'gradcam':
    return np.mean(g, axis=(2, 3))
  if method == 'gradcam++':
    g2 = g**2
    g3 = g2 * g
    s = np.sum(a, axis=(2, 3))
    aij = g2 / (2 * g2 + s[:, :, None, None] * g3 + 0.000001)
    aij = np.where(g != 0, aij, 0)
    return np.sum(np.maximum(g, 0) * aij, axis=(2, 3))
  if method == 'xgradcam':
    s = np.sum(a, axis=(2, 3))
    return (g * a / (s[:, :, None, None] + 1e-7)).sum(axis=(2, 3))
  raise KeyError(method)


def np_raw(method, a, g, truncate):
  if method == 'layercam':
    return (np.maximum(g, 0) * a).sum(axis=1)
  w = np_weights(method, a, g)
  if truncate:
    w = np.maximum(w, 0.0)
  return (w[:, :, None, None] * a).sum(axis=1)


def np_scale_cam_image(cam, target_size=None):
  out = []
  for img in cam:
    img = img - np.min(img)
    img = img / (1e-7 + np.max(img))
    if target_size is not None:
      img = cv2.resize(img, target_size)
    out.append(img)
  return np.float32(out)


def np_normalize_scoremap(cam):
  cam = cam.copy()
  if np.isnan(cam).any() or cam.min() == cam.max():
    return np.zeros_like(cam)
  cam -= cam.min()
  cam /= cam.max()
  return cam


def np_pipeline(method, raw, size_hw):
  """The reference's path from a raw map [B, h, w] to the evaluated score map."""
  h, w = size_hw
  if method == 'cam':
    return np.stack(
      [
        np_normalize_scoremap(cv2.resize(m, (w, h), interpolation=cv2.INTER_CUBIC))
        for m in raw.astype(np.float32)
      ]
    )
  x = np_scale_cam_image(np.maximum(raw, 0).astype(np.float32), (w, h))
  x = np_scale_cam_image(np.maximum(x, 0))
  return np.stack(
    [np_normalize_scoremap(cv2.resize(m, (w, h), interpolation=cv2.INTER_CUBIC)) for m in x]
  )


# ----------------------------------------------------------------------------- tiny models


class TinyCNN(nn.Module):
  """Plain CNN with two GAP + Dense heads (fc, fc2); torch twin below."""

  num_classes: int = K

  def setup(self):
    self.conv1 = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)))
    self.conv2 = nn.Conv(16, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    self.fc = nn.Dense(self.num_classes)
    self.fc2 = nn.Dense(self.num_classes)

  def features(self, x):
    return nn.relu(self.conv2(nn.relu(self.conv1(x))))

  def head(self, f):
    p = jnp.mean(f, axis=(1, 2))
    return {'softmax_logits': self.fc(p), 'sigmoid_logits': self.fc2(p)}

  def __call__(self, x):
    f = self.features(x)
    return {'features': f, **self.head(f)}


NET = TinyCNN()
APPLY = NET.apply


def HEAD(v, f):
  return NET.apply(v, f, method=TinyCNN.head)


def HEAD_W(v, branch):
  d = v['params']['fc' if branch == 'softmax' else 'fc2']
  return d['kernel'], d['bias']


FNS = dict(head_fn=HEAD, head_weights_fn=HEAD_W)


@pytest.fixture(scope='module')
def setup():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((4, 16, 16, 3)), jnp.float32)
  variables = NET.init(jax.random.key(0), images[:1])
  # Perturb fc2 so the two heads differ and some weights are negative.
  v = jax.tree_util.tree_map(lambda x: x, variables)
  v['params']['fc2']['kernel'] = v['params']['fc']['kernel'] + 0.3 * jnp.asarray(
    rng.standard_normal(v['params']['fc']['kernel'].shape), jnp.float32
  )
  return v, images


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize('method', ['gradcam', 'gradcam++', 'xgradcam', 'layercam'])
@pytest.mark.parametrize('truncate', [False, True])
def test_gradient_formulas_match_numpy(method, truncate):
  rng = np.random.default_rng(1)
  a = np.maximum(rng.standard_normal((3, 6, 7, 10)), 0).astype(np.float32)  # post-ReLU acts
  g = rng.standard_normal((3, 6, 7, 10)).astype(np.float32)
  g[0, :, :, 0] = 0.0  # exercise Grad-CAM++'s zero-gradient branch
  ours = C.compute.M.GRADIENT_FORMULAS[method](
    jnp.asarray(a), jnp.asarray(g), truncate_negative_weights=truncate
  )
  ref = np_raw(method, a.transpose(0, 3, 1, 2), g.transpose(0, 3, 1, 2), truncate)
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


def test_cam_formula_matches_numpy():
  rng = np.random.default_rng(2)
  a = rng.standard_normal((3, 5, 5, 8)).astype(np.float32)
  w = rng.standard_normal((3, 8)).astype(np.float32)
  for trunc in (False, True):
    ww = np.maximum(w, 0) if trunc else w
    ref = (ww[:, :, None, None] * a.transpose(0, 3, 1, 2)).sum(1)
    np.testing.assert_allclose(
      np.asarray(C.cam(a, w, truncate_negative_weights=trunc)), ref, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize('method', C.METHODS)
def test_postprocess_matches_reference_pipeline(method):
  rng = np.random.default_rng(3)
  raw = rng.standard_normal((3, 7, 7)).astype(np.float32)
  ours = np.asarray(C.postprocess_maps(jnp.asarray(raw), method, (56, 40)))
  np.testing.assert_allclose(ours, np_pipeline(method, raw, (56, 40)), atol=1e-5)
  assert ours.min() >= 0 and ours.max() <= 1


def test_constant_and_nan_maps_become_zeros():
  x = np.random.default_rng(4).standard_normal((4, 5, 5)).astype(np.float32)
  x[0] = 3.0
  x[1, 2, 2] = np.nan
  out = np.asarray(C.normalize_scoremap(jnp.asarray(x)))
  assert np.all(out[0] == 0) and np.all(out[1] == 0)
  for i in (2, 3):
    np.testing.assert_allclose(out[i], np_normalize_scoremap(x[i]), atol=1e-6)
  for method in C.METHODS:
    post = np.asarray(C.postprocess_maps(jnp.asarray(x), method, (20, 20)))
    assert np.all(post[0] == 0) and np.all(post[1] == 0), method
    assert np.all(np.isfinite(post))


# ----------------------------------------------------------------------------- resize


@pytest.mark.parametrize('src', [(7, 7), (14, 14), (28, 28), (7, 10), (14, 9)])
@pytest.mark.parametrize('dst', [(224, 224), (224, 160), (100, 224)])
def test_resize_matches_cv2(src, dst):
  m = np.random.default_rng(5).random((2,) + src).astype(np.float32)
  for name, flag in (('linear', cv2.INTER_LINEAR), ('cubic', cv2.INTER_CUBIC)):
    ref = np.stack([cv2.resize(x, (dst[1], dst[0]), interpolation=flag) for x in m])
    out = np.asarray(C.resize_maps(jnp.asarray(m), dst, name))
    np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=f'{name} {src}->{dst}')


def test_resize_rejects_unknown_interpolation():
  with pytest.raises(ValueError, match='valid'):
    resize.resize_matrix(7, 14, 'bicubicish')


# ----------------------------------------------------------------------------- torch parity


def _torch_twin(variables):
  torch = pytest.importorskip('torch')
  tnn = torch.nn

  class T(tnn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = tnn.Conv2d(3, 8, 3, padding=1)
      self.conv2 = tnn.Conv2d(8, 16, 3, stride=2, padding=1)
      self.fc = tnn.Linear(16, K)
      self.fc2 = tnn.Linear(16, K)

    def forward(self, x):
      f = torch.relu(self.conv2(torch.relu(self.conv1(x))))
      p = f.mean(dim=(2, 3))
      return f, self.fc(p), self.fc2(p)

  t = T().eval()
  p = jax.tree_util.tree_map(np.asarray, variables['params'])
  with torch.no_grad():
    for name in ('conv1', 'conv2'):
      kernel = p[name]['kernel'].transpose(3, 2, 0, 1).copy()  # HWIO -> OIHW
      getattr(t, name).weight.copy_(torch.from_numpy(kernel))
      getattr(t, name).bias.copy_(torch.from_numpy(p[name]['bias'].copy()))
    for name in ('fc', 'fc2'):
      getattr(t, name).weight.copy_(torch.from_numpy(p[name]['kernel'].T.copy()))
      getattr(t, name).bias.copy_(torch.from_numpy(p[name]['bias'].copy()))
  return torch, t


def test_gradients_and_maps_match_torch_autograd(setup):
  variables, images = setup
  torch, t = _torch_twin(variables)
  x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
  out = APPLY(variables, images)
  targets = np.asarray(jnp.argmax(out['softmax_logits'], -1))
  grads = C.feature_gradients(HEAD, variables, out['features'], jnp.asarray(targets))
  for bi, branch in enumerate(C.BRANCHES):
    f, l1, l2 = t(x)
    f.retain_grad()
    logits = (l1, l2)[bi]
    # pytorch-grad-cam's loss: sum over the batch of each image's target logit.
    sum(logits[i, int(c)] for i, c in enumerate(targets)).backward()
    a_t = f.detach().numpy()
    g_t = f.grad.numpy()
    np.testing.assert_allclose(
      np.asarray(out['features']).transpose(0, 3, 1, 2), a_t, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
      np.asarray(grads[branch]).transpose(0, 3, 1, 2), g_t, rtol=1e-4, atol=1e-7
    )
    trunc = branch == 'sigmoid'
    maps, _ = C.compute_cams_multi(
      APPLY, variables, images, methods=C.GRADIENT_METHODS, branches=(branch,), **FNS
    )
    for m in C.GRADIENT_METHODS:
      ref = np_pipeline(m, np_raw(m, a_t, g_t, trunc), (16, 16))
      np.testing.assert_allclose(
        np.asarray(maps[(m, branch)]), ref, atol=2e-4, err_msg=f'{m} {branch}'
      )


def test_cam_end_to_end_matches_reference(setup):
  variables, images = setup
  out = APPLY(variables, images)
  f = np.asarray(out['features']).transpose(0, 3, 1, 2)
  t = np.asarray(jnp.argmax(out['softmax_logits'], -1))
  for branch, trunc in (('softmax', False), ('sigmoid', True)):
    maps, targets = C.compute_cams(APPLY, variables, images, method='cam', branch=branch, **FNS)
    np.testing.assert_array_equal(np.asarray(targets), t)
    w = np.asarray(HEAD_W(variables, branch)[0])[:, t].T  # [B, C]
    if trunc:
      w = np.maximum(w, 0)
    raw = (w[:, :, None, None] * f).mean(1)  # the reference's VGG/ResNet CAM (mean)
    np.testing.assert_allclose(np.asarray(maps), np_pipeline('cam', raw, (16, 16)), atol=1e-4)


# ----------------------------------------------------------------------------- the paper's property


def test_additive_shift_property_and_truncation():
  rng = np.random.default_rng(6)
  b, h, w, c = 4, 6, 6, 12
  feats = jnp.asarray(np.maximum(rng.standard_normal((b, h, w, c)), 0), jnp.float32)
  W = jnp.asarray(rng.standard_normal((c, K)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(K), jnp.float32)
  d = jnp.asarray(rng.standard_normal(c), jnp.float32)
  pooled = feats.mean(axis=(1, 2))
  z, z_shift = pooled @ W + bias, pooled @ (W + d[:, None]) + bias
  # Softmax cannot see the shift: every logit of an image moves by the same pooled . d ...
  np.testing.assert_allclose(jax.nn.softmax(z), jax.nn.softmax(z_shift), atol=1e-6)
  # ... but every class's CAM changes (by sum_c d_c F_c) ...
  for k in range(K):
    wk = jnp.broadcast_to(W[:, k], (b, c))
    before = C.postprocess_maps(C.cam(feats, wk), 'cam', (12, 12))
    after = C.postprocess_maps(C.cam(feats, wk + d), 'cam', (12, 12))
    assert float(jnp.max(jnp.abs(before - after))) > 1e-2, k
  # ... while sigmoid probabilities do change, so a sigmoid head cannot absorb such a shift.
  assert float(jnp.max(jnp.abs(jax.nn.sigmoid(z) - jax.nn.sigmoid(z_shift)))) > 1e-2

  # Truncation: raising a negatively weighted channel never raises the map.
  wk = jnp.broadcast_to(W[:, 0], (b, c))
  neg = int(np.argmin(np.asarray(W[:, 0])))
  assert float(W[neg, 0]) < 0
  bumped = feats.at[..., neg].add(jnp.asarray(rng.random((b, h, w)) * 5, jnp.float32))
  kept = C.cam(feats, wk, truncate_negative_weights=True)
  np.testing.assert_allclose(C.cam(bumped, wk, truncate_negative_weights=True), kept, atol=1e-5)
  assert bool(jnp.all(C.cam(bumped, wk) <= C.cam(feats, wk) + 1e-5))  # without: it lowers
  grads = jnp.broadcast_to(-jnp.abs(W[:, 0]) / (h * w), feats.shape)  # all-negative weights
  for m in ('gradcam', 'gradcam++', 'xgradcam'):
    raw = C.compute.M.GRADIENT_FORMULAS[m](feats, grads, truncate_negative_weights=True)
    assert float(jnp.max(jnp.abs(raw))) == 0.0, m


def test_truncate_defaults_per_branch(setup):
  variables, images = setup
  for branch in C.BRANCHES:
    default, _ = C.compute_cams(APPLY, variables, images, method='cam', branch=branch, **FNS)
    explicit, _ = C.compute_cams(
      APPLY,
      variables,
      images,
      method='cam',
      branch=branch,
      truncate_negative_weights=(branch == 'sigmoid'),
      **FNS,
    )
    np.testing.assert_array_equal(np.asarray(default), np.asarray(explicit))
  on, _ = C.compute_cams(
    APPLY, variables, images, method='cam', branch='softmax', truncate_negative_weights=True, **FNS
  )
  assert float(jnp.max(jnp.abs(on - default))) > 0  # softmax default really is "off"


# ----------------------------------------------------------------------------- API behaviour


@pytest.mark.numerics
def test_multi_equals_single_and_traces_once(setup):
  variables, images = setup
  calls = []

  def counting_apply(v, x):
    calls.append(x.shape)  # runs only while tracing
    return APPLY(v, x)

  kw = dict(methods=C.METHODS, branches=C.BRANCHES, output_size=(20, 24), **FNS)
  maps, targets = C.compute_cams_multi(counting_apply, variables, images, **kw)
  labels = jnp.asarray([0, 1, 2, 3], jnp.int32)
  C.compute_cams_multi(counting_apply, variables, images + 1.0, targets=labels, **kw)
  C.compute_cams_multi(counting_apply, variables, images - 1.0, targets=labels + 1, **kw)
  assert len(calls) == 2  # once for targets=None, once for given targets; no retrace
  C.compute_cams_multi(counting_apply, variables, images[:2], **kw)
  assert len(calls) == 3  # new batch shape -> one new trace
  for (m, b), mp in maps.items():
    assert mp.shape == (4, 20, 24) and mp.dtype == jnp.float32
    single, t1 = C.compute_cams(
      APPLY, variables, images, method=m, branch=b, output_size=(20, 24), **FNS
    )
    np.testing.assert_allclose(np.asarray(mp), np.asarray(single), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(targets), np.asarray(t1))


def test_bad_names_raise(setup):
  variables, images = setup
  with pytest.raises(ValueError, match='gradcam\\+\\+'):
    C.compute_cams(APPLY, variables, images, method='scorecam', **FNS)
  with pytest.raises(ValueError, match='softmax'):
    C.compute_cams(APPLY, variables, images, method='cam', branch='tanh', **FNS)
  with pytest.raises(ValueError, match='head_fn'):
    C.compute_cams(APPLY, variables, images, method='gradcam')
  with pytest.raises(ValueError, match='targets'):
    C.compute_cams(APPLY, variables, images, method='cam', targets=jnp.zeros(3), **FNS)


def test_docstring_recipes_run():
  class Net(nn.Module):  # recipe 1: features / head split
    def setup(self):
      self.conv = nn.Conv(6, (3, 3))
      self.fc = nn.Dense(3)

    def features(self, x):
      return nn.relu(self.conv(x))

    def head(self, f):
      return {'softmax_logits': self.fc(f.mean(axis=(1, 2)))}

    def __call__(self, x):
      f = self.features(x)
      return {'features': f, **self.head(f)}

  class SowNet(nn.Module):  # recipe 2: sow the features
    @nn.compact
    def __call__(self, x):
      f = nn.relu(nn.Conv(6, (3, 3))(x))
      self.sow('intermediates', 'features', f)
      return nn.Dense(3, name='fc')(f.mean(axis=(1, 2)))

  x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 8, 8, 3)), jnp.float32)
  net = Net()
  v = net.init(jax.random.key(1), x)
  maps1, _ = C.compute_cams(
    net.apply,
    v,
    x,
    method='gradcam',
    branch='softmax',
    head_fn=lambda vv, f: net.apply(vv, f, method=Net.head),
  )
  sow = SowNet()
  v2 = sow.init(jax.random.key(1), x)

  def apply_fn(vv, xx):
    logits, state = sow.apply(vv, xx, mutable=['intermediates'])
    return {'features': state['intermediates']['features'][0], 'softmax_logits': logits}

  head_fn, head_w = SOW_HEAD_FNS
  maps2, _ = C.compute_cams_multi(
    apply_fn,
    v2,
    x,
    methods=('cam', 'gradcam++'),
    branches=('softmax',),
    head_fn=head_fn,
    head_weights_fn=head_w,
  )
  for m in (maps1, *maps2.values()):
    assert m.shape == (2, 8, 8) and float(m.min()) >= 0 and float(m.max()) <= 1


# Built once at import: jit caches on the identity of these functions.
SOW_HEAD_FNS = C.linear_head_fns({'softmax': ('fc',)})


# ----------------------------------------------------------------------------- fidelity


def test_fidelity_matches_numpy(setup):
  variables, images = setup
  maps, targets = C.compute_cams(APPLY, variables, images, method='cam', branch='sigmoid', **FNS)
  y = np.asarray(jax.nn.softmax(APPLY(variables, images)['softmax_logits']))
  o = np.asarray(jax.nn.softmax(APPLY(variables, images * maps[..., None])['softmax_logits']))
  t = np.asarray(targets)
  yc, oc = y[np.arange(4), t], o[np.arange(4), t]
  ref_drop = 100 * np.mean(np.maximum(yc - oc, 0) / (yc + 1e-7))
  ref_inc = 100 * np.mean(oc > yc)
  np.testing.assert_allclose(
    float(C.average_drop(APPLY, variables, images, maps, targets)), ref_drop, rtol=1e-4
  )
  np.testing.assert_allclose(
    float(C.increase_in_confidence(APPLY, variables, images, maps, targets)), ref_inc
  )
  valid = jnp.asarray([True, True, False, False])
  np.testing.assert_allclose(
    float(C.average_drop(APPLY, variables, images, maps, targets, valid=valid)),
    100 * np.mean((np.maximum(yc - oc, 0) / (yc + 1e-7))[:2]),
    rtol=1e-4,
  )
  r = C.confidence_change(
    APPLY, variables, images, maps, targets, logits_key='sigmoid_logits', activation='sigmoid'
  )
  ys = np.asarray(jax.nn.sigmoid(APPLY(variables, images)['sigmoid_logits']))[np.arange(4), t]
  np.testing.assert_allclose(np.asarray(r['y']), ys, rtol=1e-5)


def test_insertion_deletion(setup):
  variables, images = setup
  maps, targets = C.compute_cams(
    APPLY, variables, images, method='gradcam', branch='softmax', **FNS
  )
  r = C.insertion_deletion(APPLY, variables, images, maps, targets, num_steps=4)
  y = np.asarray(jax.nn.softmax(APPLY(variables, images)['softmax_logits']))
  y = y[np.arange(4), np.asarray(targets)]
  base = np.asarray(jax.nn.softmax(APPLY(variables, jnp.zeros_like(images))['softmax_logits']))
  base = base[np.arange(4), np.asarray(targets)]
  np.testing.assert_allclose(np.asarray(r['deletion_curve'][:, 0]), y, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(r['insertion_curve'][:, -1]), y, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(r['deletion_curve'][:, -1]), base, rtol=1e-5)
  c = np.asarray(r['insertion_curve'])
  np.testing.assert_allclose(
    np.asarray(r['insertion']), (c.sum(1) - 0.5 * (c[:, 0] + c[:, -1])) / 4, rtol=1e-5
  )


# ----------------------------------------------------------------------------- pictures


def test_largest_contour_box_and_grid(tmp_path):
  m = np.zeros((32, 32), np.float32)
  m[4:10, 5:9] = 0.5  # small blob
  m[15:30, 12:28] = 1.0  # large blob wins
  np.testing.assert_array_equal(plots.largest_contour_box(m, 0.2), [12, 15, 28, 30])
  np.testing.assert_array_equal(plots.largest_contour_box(np.zeros((8, 8)), 0.2), [0, 0, 0, 0])
  imgs = np.random.default_rng(8).standard_normal((2, 32, 32, 3)).astype(np.float32)
  boxes = [np.array([[12, 15, 28, 30], [0, 0, 0, 0]]), np.array([[1, 1, 10, 10]])]
  path = C.save_cam_grid(
    str(tmp_path / 'sub' / 'grid.png'),
    imgs,
    np.stack([m, m]),
    np.stack([m, m * 0.5]),
    gt_boxes=boxes,
    titles=['a', 'b'],
  )
  assert os.path.getsize(path) > 1000
  ov = plots.overlay(imgs[0], m)
  assert ov.shape == (32, 32, 3) and ov.min() >= 0 and ov.max() <= 1


def test_cam_grid_says_what_it_shows(tmp_path, monkeypatch):
  """The column titles name the method and the head; a legend names the green and red boxes."""
  figs = []
  save = plots.Figure.savefig
  monkeypatch.setattr(
    plots.Figure, 'savefig', lambda f, *a, **k: (figs.append(f), save(f, *a, **k))
  )
  m = np.zeros((16, 16), np.float32)
  m[4:12, 4:12] = 1.0
  imgs = np.zeros((1, 16, 16, 3), np.float32)
  C.save_cam_grid(str(tmp_path / 'g.png'), imgs, m[None], m[None], method='gradcam', threshold=0.3)
  (fig,) = figs
  titles = [ax.get_title() for ax in fig.axes]
  assert titles == ['image', 'gradcam, softmax head', 'gradcam, sigmoid head'], titles
  (legend,) = fig.legends
  texts = [t.get_text() for t in legend.get_texts()]
  assert texts[0] == 'ground-truth box' and texts[1].startswith('predicted box'), texts
  assert '0.3' in texts[1]
  colors = [h.get_edgecolor() for h in legend.legend_handles]
  assert colors[0][:3] == (0.0, 1.0, 0.0) and colors[1][:3] == (1.0, 0.0, 0.0), colors


# ----------------------------------------------------------------------------- package models


def test_package_model_matches_torch_twin_sharded():
  """models.cam_fns(vgg_tiny) on a batch sharded over the 8 fake devices vs the torch recipe."""
  models = pytest.importorskip('dualsig_jax.models')
  torch = pytest.importorskip('torch')

  import torch_models

  model = models.build_model('vgg_tiny', K)
  v = models.init_variables(model, 0)
  rng = np.random.default_rng(9)
  v['params']['fc2'] = dict(
    v['params']['fc2'],
    kernel=v['params']['fc']['kernel']
    + 0.05 * jnp.asarray(rng.standard_normal((128, K)), jnp.float32),
  )
  p = jax.tree_util.tree_map(np.asarray, v['params'])
  sd = {
    f'features.{i}.{n}': (d['kernel'].transpose(3, 2, 0, 1) if n == 'weight' else d['bias'])
    for i, d in p['features'].items()
    for n in ('weight', 'bias')
  }
  sd.update(
    {'conv6.weight': p['conv6']['kernel'].transpose(3, 2, 0, 1), 'conv6.bias': p['conv6']['bias']}
  )
  for n in ('fc', 'fc2'):
    sd.update({f'{n}.weight': p[n]['kernel'].T, f'{n}.bias': p[n]['bias']})
  tm = torch_models.build_torch_model('vgg_tiny', K)
  tm.load_state_dict({k: torch.from_numpy(np.array(a)) for k, a in sd.items()})

  n = jax.device_count()
  x = rng.standard_normal((n, 32, 32, 3)).astype(np.float32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  xs = jax.device_put(
    jnp.asarray(x), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  )
  fns = models.cam_fns(model)
  maps, targets = C.compute_cams_multi(
    fns['apply_fn'],
    v,
    xs,
    methods=C.METHODS,
    head_fn=fns['head_fn'],
    head_weights_fn=fns['head_weights_fn'],
  )
  r = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  f = r['features']
  f.retain_grad()
  t = r['logits'].argmax(1)
  np.testing.assert_array_equal(np.asarray(targets), t.numpy())
  a = f.detach().numpy()
  for branch, key, fc in (('softmax', 'logits', 'fc'), ('sigmoid', 'logits2', 'fc2')):
    f.grad = None
    r[key].gather(1, t[:, None]).sum().backward(retain_graph=True)
    g = f.grad.numpy()
    trunc = branch == 'sigmoid'
    w = getattr(tm, fc).weight.detach().numpy()[t.numpy()]
    raw_cam = ((np.maximum(w, 0) if trunc else w)[:, :, None, None] * a).mean(1)
    for m in C.METHODS:
      raw = raw_cam if m == 'cam' else np_raw(m, a, g, trunc)
      np.testing.assert_allclose(
        np.asarray(maps[(m, branch)]),
        np_pipeline(m, raw, (32, 32)),
        atol=2e-4,
        err_msg=f'{m} {branch}',
      )
