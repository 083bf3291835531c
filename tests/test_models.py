"""Model API tests on the tiny variants (full-size models only in test_convert's parity)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualsig_jax.models import (
  MODELS,
  build_model,
  cam_fns,
  clone_head,
  head_weights,
  init_variables,
  lr_group,
)
from dualsig_jax.models.layers import max_pool

TINY = ('vgg_tiny', 'resnet_tiny')


@pytest.fixture(scope='module')
def tiny():
  out = {}
  for arch in TINY:
    model = build_model(arch, 5)
    out[arch] = (model, init_variables(model, jax.random.key(1), 64))
  return out


def _images(n=2, s=64, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(n, s, s, 3).astype(np.float32))


def test_names_and_unknown_arch():
  assert set(MODELS) == {'vgg16', 'resnet50', 'inception_v3', 'vgg_tiny', 'resnet_tiny'}
  with pytest.raises(ValueError, match='resnet50'):
    build_model('resnet18', 10)
  with pytest.raises(ValueError, match='valid'):
    lr_group('alexnet', ('fc', 'kernel'))


@pytest.mark.parametrize('arch', TINY)
@pytest.mark.parametrize('lfm', [False, True])
def test_output_shapes(arch, lfm):
  model = build_model(arch, 5, large_feature_map=lfm)
  x = jax.ShapeDtypeStruct((2, 96, 96, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  side = {
    ('vgg_tiny', False): 12,
    ('vgg_tiny', True): 24,
    ('resnet_tiny', False): 6,
    ('resnet_tiny', True): 12,
  }[(arch, lfm)]
  assert out['features'].shape == (2, side, side, 128)
  assert out['softmax_logits'].shape == out['sigmoid_logits'].shape == (2, 5)


def test_bfloat16_compute_float32_params_and_outputs():
  model = build_model('vgg_tiny', 5, dtype='bfloat16')
  variables = init_variables(model, 0, 64)
  assert set(variables) == {'params', 'batch_stats'}
  assert set(variables['params']) >= {'fc', 'fc2'}
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  out = jax.jit(lambda v, x: model.apply(v, x))(variables, _images(2, 64))
  assert all(v.dtype == jnp.float32 for v in out.values())
  assert np.isfinite(np.asarray(out['sigmoid_logits'])).all()
  with pytest.raises(ValueError, match='bfloat16'):
    build_model('vgg_tiny', 5, dtype='float64')


@pytest.mark.parametrize('arch', TINY)
def test_stop_gradient_is_real(arch, tiny):
  model, variables = tiny[arch]
  x, y = _images(), jnp.array([1, 3])

  def loss(params, dual_model):
    out = dual_model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x)
    onehot = jax.nn.one_hot(y, 5)
    # The loss also touches the softmax logits: fc must still get no gradient.
    return (
      jnp.mean(jnp.logaddexp(0, out['sigmoid_logits']) - onehot * out['sigmoid_logits'])
      + jnp.sum(out['softmax_logits'])
      + jnp.sum(out['features'])
    )

  grads = jax.jit(jax.grad(loss), static_argnums=1)(variables['params'], model)
  for name, sub in grads.items():
    leaves = jax.tree_util.tree_leaves(sub)
    if name == 'fc2':
      assert all(float(jnp.abs(g).max()) > 0 for g in leaves)
    else:
      assert all(float(jnp.abs(g).max()) == 0.0 for g in leaves), name
  # Vanilla stage: the backbone does learn.
  vanilla = build_model(arch, 5, dual=False)
  grads = jax.jit(jax.grad(loss), static_argnums=1)(variables['params'], vanilla)
  assert float(jnp.abs(grads['fc']['kernel']).max()) > 0
  first = next(k for k in grads if k not in ('fc', 'fc2'))
  assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads[first])) > 0


@pytest.mark.parametrize('arch', TINY)
def test_head_method_and_weights(arch, tiny):
  model, variables = tiny[arch]
  fns = cam_fns(model)
  out = fns['apply_fn'](variables, _images())
  heads = fns['head_fn'](variables, out['features'])
  for k in ('softmax_logits', 'sigmoid_logits'):
    np.testing.assert_allclose(heads[k], out[k], rtol=1e-5, atol=1e-5)
  for branch, key in (('softmax', 'softmax_logits'), ('sigmoid', 'sigmoid_logits')):
    w, b = fns['head_weights_fn'](variables, branch)
    assert w.shape == (128, 5) and b.shape == (5,)
    np.testing.assert_allclose(
      out['features'].mean(axis=(1, 2)) @ w + b, out[key], rtol=1e-4, atol=1e-5
    )
  with pytest.raises(ValueError, match='sigmoid'):
    head_weights(variables, 'relu')


def test_batchnorm_modes(tiny):
  _, variables = tiny['resnet_tiny']
  x = _images()
  vanilla = build_model('resnet_tiny', 5, dual=False)
  _, upd = vanilla.apply(variables, x, train=True, mutable=['batch_stats'])
  changed = jax.tree_util.tree_map(
    lambda a, b: bool(jnp.any(a != b)), upd['batch_stats'], variables['batch_stats']
  )
  assert any(jax.tree_util.tree_leaves(changed))
  # Dual stage: BatchNorm stays in inference mode, train=True changes nothing.
  dual = build_model('resnet_tiny', 5, dual=True)
  out_t, upd = dual.apply(variables, x, train=True, mutable=['batch_stats'])
  out_e = dual.apply(variables, x, train=False)
  np.testing.assert_array_equal(out_t['sigmoid_logits'], out_e['sigmoid_logits'])
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, upd['batch_stats'], variables['batch_stats']
  )


def test_clone_head(tiny):
  _, variables = tiny['vgg_tiny']
  cloned = clone_head(variables)
  for k in ('kernel', 'bias'):
    np.testing.assert_array_equal(cloned['params']['fc2'][k], variables['params']['fc'][k])
  assert cloned['params']['features'] is variables['params']['features']
  fresh = clone_head(variables, mode='init', rng=3)
  assert fresh['params']['fc2']['kernel'].shape == variables['params']['fc']['kernel'].shape
  assert not np.array_equal(fresh['params']['fc2']['kernel'], variables['params']['fc']['kernel'])
  with pytest.raises(ValueError, match='rng'):
    clone_head(variables, mode='init')
  with pytest.raises(ValueError, match='clone'):
    clone_head(variables, mode='copy')


@pytest.mark.parametrize(
  'arch,path,group',
  [
    ('vgg16', ('params', 'features', '0', 'kernel'), 'feature'),
    ('vgg16', ('conv6', 'kernel'), 'classifier'),
    ('vgg16', ('fc2', 'bias'), 'classifier'),
    ('resnet50', ('params', 'conv1', 'kernel'), 'feature'),
    ('resnet50', ('layer3', '5', 'bn2', 'scale'), 'feature'),
    ('resnet50', ('layer4', '0', 'conv1', 'kernel'), 'classifier'),
    ('resnet50', ('fc', 'kernel'), 'classifier'),
    ('resnet50', ('fc2', 'kernel'), 'feature'),  # reference quirk: 'fc.' not in 'fc2.weight'
    ('inception_v3', ('Conv2d_1a_3x3', 'conv', 'kernel'), 'feature'),
    ('inception_v3', ('Mixed_6e', 'branch_pool', 'bn', 'bias'), 'feature'),
    ('inception_v3', ('SPG_A3_1b', '0', 'kernel'), 'classifier'),
    ('inception_v3', ('fc2', 'kernel'), 'classifier'),
    ('vgg_tiny', ('features', '3', 'bias'), 'feature'),
    ('resnet_tiny', ('layer4', '0', 'bn3', 'bias'), 'classifier'),
  ],
)
def test_lr_group(arch, path, group):
  assert lr_group(arch, path) == group


def test_max_pool_matches_torch_ceil_mode():
  torch = pytest.importorskip('torch')
  import torch.nn.functional as F

  rs = np.random.RandomState(0)
  for size in (5, 6, 7, 8, 14):
    x = rs.randn(1, 2, size, size + 1).astype(np.float32)
    for k, s, p, ceil in (
      (3, 2, 1, True),
      (3, 2, 0, True),
      (3, 2, 1, False),
      (2, 2, 0, False),
      (3, 1, 1, False),
      (3, 3, 1, True),
    ):
      ref = F.max_pool2d(torch.from_numpy(x), k, s, p, ceil_mode=ceil).numpy()
      got = np.asarray(max_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), k, s, p, ceil))
      np.testing.assert_array_equal(
        got.transpose(0, 3, 1, 2), ref, err_msg=f'size={size} k={k} s={s} p={p} ceil={ceil}'
      )
