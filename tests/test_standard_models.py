"""The standard family (the reference's wsol/ models, used by every gradient method): layout and
numerics against torch twins at 224 px, the MLP head's CAM paths, dropout and freezing."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax
import jax.numpy as jnp
import torch.nn.functional as F
from test_cam import np_pipeline, np_raw
from torch_models import build_torch_model, randomize_

from dualsig_jax import cam as C
from dualsig_jax.cam.methods import GRADIENT_FORMULAS
from dualsig_jax.convert import flax_to_torch, torch_to_flax
from dualsig_jax.models import build_model, cam_fns, head_weights, init_variables
from dualsig_jax.models.layers import adaptive_avg_pool

K = 7


def _same(a: dict, b: dict):
  assert list(a) == list(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert torch.equal(a[k], b[k]), k


def _close(got, ref, what, rel=1e-4):
  got, ref = np.asarray(got), np.asarray(ref)
  assert got.shape == ref.shape, (what, got.shape, ref.shape)
  err = np.abs(got - ref).max() / np.abs(ref).max()
  assert err <= rel, f'{what}: max error {err:.2e} of max |ref|'


def _nhwc(x):
  return jnp.asarray(x.transpose(0, 2, 3, 1))


def test_adaptive_avg_pool_matches_torch():
  rs = np.random.RandomState(0)
  for h, w in ((14, 14), (28, 28), (13, 17), (5, 9), (4, 3), (23, 7)):
    x = rs.randn(2, 3, h, w).astype(np.float32)
    for out in (7, (2, 5)):
      ref = F.adaptive_avg_pool2d(torch.from_numpy(x), out).numpy().transpose(0, 2, 3, 1)
      got = np.asarray(adaptive_avg_pool(_nhwc(x), out))
      np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6, err_msg=f'{h}x{w} -> {out}')


@pytest.mark.parametrize(
  'arch,lfm,size,side,channels',
  [
    ('vgg16', False, 224, 14, 512),
    ('vgg16', True, 224, 28, 512),
    ('inception_v3', False, 224, 5, 2048),
    ('inception_v3', False, 299, 8, 2048),
    ('inception_v3', True, 224, 5, 2048),  # the reference ignores large_feature_map here
    ('resnet50', False, 224, 14, 2048),
    ('vgg_tiny', False, 64, 8, 128),
  ],
)
def test_standard_shapes(arch, lfm, size, side, channels):
  model = build_model(arch, K, family='standard', large_feature_map=lfm)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert out['features'].shape == (1, side, side, channels)
  assert out['softmax_logits'].shape == out['sigmoid_logits'].shape == (1, K)
  if arch == 'vgg16':  # torchvision's classifier MLP, twice
    fc = variables['params']['fc2']
    assert [fc[n]['kernel'].shape for n in ('0', '3', '6')] == [
      (25088, 4096),
      (4096, 4096),
      (4096, K),
    ]


@pytest.fixture(scope='module')
def tiny_vgg():
  model = build_model('vgg_tiny', K, family='standard')
  return model, init_variables(model, 0)


@pytest.mark.numerics
def test_standard_dropout_and_frozen_backbone(tiny_vgg):
  model, variables = tiny_vgg
  x = jnp.asarray(np.random.RandomState(1).randn(2, 64, 64, 3).astype(np.float32))
  rngs = {'dropout': jax.random.key(0)}
  run = jax.jit(lambda m, v, x, r, train: m.apply(v, x, train=train, rngs=r), static_argnums=(0, 4))
  ev = run(model, variables, x, rngs, False)
  tr = run(model, variables, x, rngs, True)
  assert not np.allclose(tr['sigmoid_logits'], ev['sigmoid_logits'])  # MLP dropout on
  np.testing.assert_array_equal(tr['features'], ev['features'])  # no dropout before the head
  no_drop = build_model('vgg_tiny', K, family='standard', dropout_rate=0.0)
  np.testing.assert_allclose(
    run(no_drop, variables, x, rngs, True)['sigmoid_logits'], ev['sigmoid_logits'], atol=1e-6
  )
  # The pure head (CAM's gradient path) is the eval-mode forward.
  heads = model.apply(variables, ev['features'], method='head')
  np.testing.assert_allclose(heads['sigmoid_logits'], ev['sigmoid_logits'], rtol=1e-5, atol=1e-6)

  def loss(params, m):
    out = m.apply({'params': params}, x, train=True, rngs=rngs)
    return (
      jnp.sum(out['sigmoid_logits'] ** 2) + jnp.sum(out['softmax_logits']) + out['features'].sum()
    )

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g = grad(variables['params'], model)
  for name, sub in g.items():
    biggest = max(float(jnp.abs(a).max()) for a in jax.tree_util.tree_leaves(sub))
    assert (biggest > 0) == (name == 'fc2'), name  # every MLP layer of fc2, nothing else
  assert all(float(jnp.abs(a).max()) > 0 for a in jax.tree_util.tree_leaves(g['fc2']))
  g = grad(
    variables['params'], build_model('vgg_tiny', K, family='standard', frozen_backbone=False)
  )
  assert float(jnp.abs(g['features']['0']['kernel']).max()) > 0
  assert float(jnp.abs(g['fc']['0']['kernel']).max()) > 0


def test_cam_on_mlp_head_is_a_clear_error(tiny_vgg):
  model, variables = tiny_vgg
  fns = cam_fns(model)
  x = jnp.zeros((1, 64, 64, 3))
  with pytest.raises(ValueError, match=r'sigmoid head of vgg_tiny \(standard\) is an MLP'):
    C.compute_cams(
      fns['apply_fn'], variables, x, method='cam', head_weights_fn=fns['head_weights_fn']
    )
  with pytest.raises(ValueError, match=r'classifier: 1152-64-64-7.*use gradcam, gradcam\+\+'):
    fns['head_weights_fn'](variables, 'softmax')
  with pytest.raises(ValueError, match=r'\(fc2\) is an MLP \(fc2: 1152-64-64-7\); CAM needs'):
    head_weights(variables, 'sigmoid')
  head_fn, head_w = C.linear_head_fns()
  with pytest.raises(ValueError, match='params/fc2 is not one Dense layer.*layercam'):
    head_w(variables, 'sigmoid')
  # Gradient methods go through the whole MLP.
  maps, _ = C.compute_cams_multi(
    fns['apply_fn'], variables, x + 1.0, methods=C.GRADIENT_METHODS, head_fn=fns['head_fn']
  )
  assert all(m.shape == (1, 64, 64) for m in maps.values())


# ----------------------------------------------------------------------------- full size, 224 px
def _pair(arch, batch, seed=0):
  torch.manual_seed(seed)
  tmodel = randomize_(build_torch_model(arch, K, family='standard'))
  sd = tmodel.state_dict()
  variables = torch_to_flax(sd, arch, family='standard')
  _same(flax_to_torch(variables, arch, family='standard'), sd)  # exact, same key order
  x = np.random.RandomState(seed).randn(batch, 3, 224, 224).astype(np.float32)
  return tmodel, variables, x


def _check_outputs(arch, tmodel, variables, x):
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x))
  model = build_model(arch, K, family='standard')
  out = jax.jit(lambda v, x: model.apply(v, x))(variables, _nhwc(x))
  _close(out['features'], ref['features'].numpy().transpose(0, 2, 3, 1), f'{arch} features')
  _close(out['softmax_logits'], ref['logits'].numpy(), f'{arch} softmax_logits')
  _close(out['sigmoid_logits'], ref['logits2'].numpy(), f'{arch} sigmoid_logits')
  return model


@pytest.mark.parametrize('arch', ['resnet50', 'inception_v3'])
def test_parity_224(arch):
  tmodel, variables, x = _pair(arch, 1)
  _check_outputs(arch, tmodel, variables, x)


@pytest.fixture(scope='module')
def vgg16_standard():
  return _pair('vgg16', 2, seed=1)


def test_vgg16_parity_224_and_gradient_cams_through_the_mlp(vgg16_standard):
  """Full VGG16 (standard) at 224 px: both MLP heads match torch; the four gradient methods'
  feature gradients, raw maps and final maps match a torch autograd path through
  ``classifier`` / ``classifier_2`` (pytorch-grad-cam's loss: the sum of the target logits)."""
  tmodel, variables, x = vgg16_standard
  model = _check_outputs('vgg16', tmodel, variables, x)
  fns = cam_fns(model)
  targets = np.array([2, 5])
  maps, _ = C.compute_cams_multi(
    fns['apply_fn'],
    variables,
    _nhwc(x),
    methods=C.GRADIENT_METHODS,
    targets=targets,
    head_fn=fns['head_fn'],
  )
  out = fns['apply_fn'](variables, _nhwc(x))
  grads = C.feature_gradients(fns['head_fn'], variables, out['features'], jnp.asarray(targets))
  with torch.no_grad():
    a = tmodel.features(torch.from_numpy(x)).numpy()
  for branch, head in (('softmax', tmodel.classifier), ('sigmoid', tmodel.classifier_2)):
    # pytorch-grad-cam's path: a hook on the target layer's output, then autograd from there.
    f = torch.from_numpy(a.copy()).requires_grad_()
    logits = head(torch.flatten(tmodel.avgpool(f), 1))
    logits.gather(1, torch.from_numpy(targets)[:, None]).sum().backward()
    g = f.grad.numpy()
    _close(np.asarray(grads[branch]).transpose(0, 3, 1, 2), g, f'{branch} d logit / d features')
    for m in C.GRADIENT_METHODS:
      raw_ref = np_raw(m, a, g, branch == 'sigmoid')
      raw = GRADIENT_FORMULAS[m](
        out['features'], grads[branch], truncate_negative_weights=branch == 'sigmoid'
      )
      _close(raw, raw_ref, f'{m} {branch} raw map')
      np.testing.assert_allclose(
        np.asarray(maps[(m, branch)]),
        np_pipeline(m, raw_ref, (224, 224)),
        atol=1e-4,
        err_msg=f'{m} {branch} map',
      )
