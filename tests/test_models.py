"""Model API tests on the tiny variants (full-size models only in test_convert's parity)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualsig_jax.convert.layouts import torch_key
from dualsig_jax.models import (
  ARCHS,
  BACKBONES,
  FAMILIES,
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
  names = {'vgg16', 'resnet50', 'inception_v3', 'vgg_tiny', 'resnet_tiny', 'resnet18', 'resnet34'}
  assert set(ARCHS) == names
  assert FAMILIES == ('cam', 'standard')
  assert set(BACKBONES) == {(a, f) for a in names for f in FAMILIES}
  with pytest.raises(ValueError, match='resnet50'):
    build_model('resnet101', 10)
  with pytest.raises(ValueError, match='valid'):
    lr_group('alexnet', ('fc', 'kernel'))
  with pytest.raises(ValueError, match="'wsol'.*valid: cam, standard"):
    build_model('vgg16', 10, family='wsol')
  with pytest.raises(ValueError, match='dropout_rate'):
    build_model('inception_v3', 10, dropout_rate=1.0)


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
  vanilla = build_model(arch, 5, frozen_backbone=False)
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


def test_batchnorm_follows_train_only(tiny):
  """BatchNorm: batch statistics iff train=True, in both stages (the reference's dual stage
  calls model.train() after freezing); frozen_backbone only stops gradients."""
  _, variables = tiny['resnet_tiny']
  x = _images()
  for frozen in (False, True):
    model = build_model('resnet_tiny', 5, frozen_backbone=frozen)
    out_t, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x
    )
    out_e = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    # Batch statistics differ from the fresh running ones (0 / 1), so the logits differ ...
    assert not np.allclose(out_t['sigmoid_logits'], out_e['sigmoid_logits'], atol=1e-4)
    # ... and the running statistics move (the dual stage's caller discards them).
    changed = jax.tree_util.tree_map(
      lambda a, b: bool(jnp.any(a != b)), upd['batch_stats'], variables['batch_stats']
    )
    assert all(jax.tree_util.tree_leaves(changed)), frozen


def test_batchnorm_train_mode_matches_torch():
  """train=True with frozen_backbone == the torch twin in .train() mode (batch mean and biased
  variance), which is what the reference's dual stage computes."""
  torch = pytest.importorskip('torch')

  from torch_models import build_torch_model, randomize_

  from dualsig_jax.convert import torch_to_flax

  torch.manual_seed(4)
  tmodel = randomize_(build_torch_model('resnet_tiny', 5)).train()
  variables = torch_to_flax(tmodel.state_dict(), 'resnet_tiny')
  x = np.random.RandomState(3).randn(4, 3, 48, 48).astype(np.float32)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x))
  model = build_model('resnet_tiny', 5, frozen_backbone=True)
  out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
    variables, jnp.asarray(x.transpose(0, 2, 3, 1))
  )
  for ours, theirs in (('softmax_logits', 'logits'), ('sigmoid_logits', 'logits2')):
    r = ref[theirs].numpy()
    assert np.abs(np.asarray(out[ours]) - r).max() <= 1e-4 * np.abs(r).max(), ours


def test_clone_head(tiny):
  _, variables = tiny['vgg_tiny']
  cloned = clone_head(variables)
  for k in ('kernel', 'bias'):
    np.testing.assert_array_equal(cloned['params']['fc2'][k], variables['params']['fc'][k])
  assert cloned['params']['features'] is variables['params']['features']
  fresh = clone_head(variables, mode='init', rng=3, arch='vgg_tiny')
  assert fresh['params']['fc2']['kernel'].shape == variables['params']['fc']['kernel'].shape
  assert not np.array_equal(fresh['params']['fc2']['kernel'], variables['params']['fc']['kernel'])
  with pytest.raises(ValueError, match='rng'):
    clone_head(variables, mode='init', arch='vgg_tiny')
  with pytest.raises(ValueError, match='arch'):
    clone_head(variables, mode='init', rng=3)
  with pytest.raises(ValueError, match='clone'):
    clone_head(variables, mode='copy')


def _fc(kernel_shape):
  k = jnp.zeros(kernel_shape, jnp.float32)
  return {'kernel': k, 'bias': jnp.full((kernel_shape[-1],), 7.0)}


def test_clone_head_init_is_the_reference_init():
  """mode='init' draws what the reference's fc2 starts from (N(0, 0.01) Linears, zero bias;
  InceptionV3-CAM's 1x1 conv: xavier_uniform; standard InceptionV3: trunc_normal(0.1) and
  torch's default bias); big layers so the statistics are tight."""

  def fresh(fc, arch, family='cam'):
    out = clone_head({'params': {'fc': fc}}, mode='init', rng=0, arch=arch, family=family)
    return jax.tree_util.tree_map(np.asarray, out['params']['fc2'])

  for arch, family in (('resnet50', 'cam'), ('vgg16', 'cam'), ('resnet50', 'standard')):
    fc2 = fresh(_fc((2048, 500)), arch, family)
    assert abs(fc2['kernel'].std() / 0.01 - 1) < 0.02 and abs(fc2['kernel'].mean()) < 1e-4
    np.testing.assert_array_equal(fc2['bias'], 0.0)
  # Standard VGG16: every Linear of the MLP, whatever the head's depth.
  mlp = {'0': _fc((1024, 256)), '3': _fc((256, 256)), '6': _fc((256, 10))}
  fc2 = fresh(mlp, 'vgg16', 'standard')
  assert sorted(fc2) == ['0', '3', '6'] and fc2['6']['kernel'].shape == (256, 10)
  assert abs(fc2['0']['kernel'].std() / 0.01 - 1) < 0.02
  assert abs(fc2['3']['kernel'].std() / 0.01 - 1) < 0.05
  for layer in fc2.values():
    np.testing.assert_array_equal(layer['bias'], 0.0)
  # InceptionV3-CAM: xavier_uniform on [1, 1, 1024, 200]: U(-a, a), a = sqrt(6 / (1024 + 200)).
  fc2 = fresh(_fc((1, 1, 1024, 200)), 'inception_v3')
  a = np.sqrt(6.0 / (1024 + 200))
  w = fc2['kernel']
  assert np.abs(w).max() <= a and np.abs(w).max() > 0.99 * a
  assert abs(w.std() / (a / np.sqrt(3)) - 1) < 0.02
  np.testing.assert_array_equal(fc2['bias'], 0.0)
  # Standard InceptionV3: trunc_normal(std 0.1, +-2) and bias U(+-1/sqrt(2048)).
  fc2 = fresh(_fc((2048, 500)), 'inception_v3', 'standard')
  assert abs(fc2['kernel'].std() / 0.1 - 1) < 0.02
  b = fc2['bias']
  assert np.abs(b).max() <= 1 / np.sqrt(2048) and b.std() > 0.5 / np.sqrt(3 * 2048)


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


# The standard family's names (wsol/vgg.py: classifier / classifier_2; wsol/inception.py: fc /
# fc2 after Mixed_7c) through main.py's shared substring table.
@pytest.mark.parametrize(
  'arch,path,torch_name,group',
  [
    ('vgg16', ('features', '28', 'kernel'), 'features.28.weight', 'feature'),
    ('vgg16', ('fc', '0', 'kernel'), 'classifier.0.weight', 'classifier'),
    ('vgg16', ('fc2', '6', 'bias'), 'classifier_2.6.bias', 'classifier'),
    ('inception_v3', ('Mixed_7c', 'branch3x3_2a', 'conv', 'kernel'), None, 'feature'),
    ('inception_v3', ('Conv2d_1a_3x3', 'bn', 'scale'), 'Conv2d_1a_3x3.bn.weight', 'feature'),
    ('inception_v3', ('fc', 'kernel'), 'fc.weight', 'classifier'),
    ('inception_v3', ('fc2', 'bias'), 'fc2.bias', 'classifier'),
    ('resnet50', ('fc2', 'kernel'), 'fc2.weight', 'feature'),
    ('resnet50', ('layer4', '2', 'conv3', 'kernel'), None, 'classifier'),
  ],
)
def test_lr_group_and_torch_key_standard(arch, path, torch_name, group):
  assert lr_group(arch, path, family='standard') == group
  if torch_name:
    assert torch_key(arch, 'params', path, family='standard') == torch_name


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
