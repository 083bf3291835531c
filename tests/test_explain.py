"""cam.explain on unmodified models: Linen by scope path, NNX by attribute path, a ViT's tokens.

Each model is written here with no ``features``/``head`` method and no ``sow``. The reference
maps are computed independently: the activation comes from ``capture_intermediates`` (Linen) or
from calling the submodules by hand (NNX), and ``jax.grad`` of the target logit is taken with
respect to it through the rest of the network, re-written in the test.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dualsig_jax.cam.compute import postprocess_maps
from dualsig_jax.cam.explain import EXPLAIN_METHODS, _explain, explain

K = 6
TOL = 1e-5


class Block(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(self.features, (3, 3), name='conv')(x))


class LinenNet(nn.Module):
  """Conv blocks, then a tanh conv and a GAP + Dense classifier: no features/head/sow."""

  def setup(self):
    self.stem = Block(8)
    self.block = Block(12)
    self.conv3 = nn.Conv(12, (3, 3))
    self.fc = nn.Dense(K)

  def __call__(self, x):
    x = self.block(nn.max_pool(self.stem(x), (2, 2), (2, 2)))
    return self.fc(jnp.tanh(self.conv3(x)).mean(axis=(1, 2)))


def images(b=3, size=16, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, size, size, 3))


def reference_maps(act, tail, size):
  """Grad-CAM, HiResCAM and LayerCAM from ``act [B, h, w, C]`` and ``tail(act) -> logits``."""
  logits = tail(act)
  targets = jnp.argmax(logits, axis=-1)

  def score(a):
    return jnp.sum(jnp.take_along_axis(tail(a), targets[:, None], axis=1))

  g = jax.grad(score)(act)
  raw = {
    'gradcam': jnp.einsum('bhwc,bc->bhw', act, g.mean(axis=(1, 2))),
    'hirescam': jnp.sum(g * act, axis=-1),
    'layercam': jnp.sum(jnp.maximum(g, 0) * act, axis=-1),
  }
  return {m: postprocess_maps(r, 'gradcam', size) for m, r in raw.items()}, targets


def assert_maps_close(maps, ref, targets, ref_targets):
  np.testing.assert_array_equal(np.asarray(targets), np.asarray(ref_targets))
  for m, r in ref.items():
    assert maps[m].shape == r.shape and maps[m].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(maps[m]), np.asarray(r), atol=TOL, err_msg=m)
    assert float(jnp.min(maps[m])) >= 0.0 and float(jnp.max(maps[m])) <= 1.0


def test_linen_model_by_scope_path_matches_capture_intermediates():
  net, x = LinenNet(), images()
  v = net.init(jax.random.key(0), x)
  _, state = net.apply(v, x, capture_intermediates=lambda mdl, name: mdl.scope.path == ('block',))
  act = state['intermediates']['block']['__call__'][0]

  def tail(a):
    return net.apply(v, a, method=lambda m, a: m.fc(jnp.tanh(m.conv3(a)).mean(axis=(1, 2))))

  ref, ref_t = reference_maps(act, tail, x.shape[1:3])
  maps, targets = explain(net, v, x, 'block', methods=('gradcam', 'hirescam', 'layercam'))
  assert targets.dtype == jnp.int32
  assert_maps_close(maps, ref, targets, ref_t)
  # A nested path (the conv inside the block) and a tuple path are accepted too.
  m2, _ = explain(net, v, x, 'block/conv', methods=('gradcam',))
  m3, _ = explain(net, v, x, ('block', 'conv'), methods=('gradcam',))
  np.testing.assert_array_equal(np.asarray(m2['gradcam']), np.asarray(m3['gradcam']))


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.Conv(8, 12, (3, 3), rngs=rngs)])
    self.bn = nnx.BatchNorm(12, rngs=rngs)
    self.conv3 = nnx.Conv(12, 12, (3, 3), rngs=rngs)
    self.head = nnx.Linear(12, K, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.blocks[0](x))
    x = nnx.relu(self.blocks[1](nnx.max_pool(x, (2, 2), (2, 2))))
    return self.head(jnp.tanh(self.conv3(self.bn(x))).mean(axis=(1, 2)))


@pytest.mark.numerics
def test_nnx_model_by_attribute_path_and_object_unchanged():
  model, x = NnxNet(nnx.Rngs(0)), images()
  model.eval()
  before = jax.tree.map(np.asarray, nnx.state(model))
  act = nnx.relu(model.blocks[1](nnx.max_pool(nnx.relu(model.blocks[0](x)), (2, 2), (2, 2))))
  ref, ref_t = reference_maps(
    act, lambda a: model.head(jnp.tanh(model.conv3(model.bn(a))).mean(axis=(1, 2))), (16, 16)
  )
  maps, targets = explain(
    model, None, x, 'blocks.1', methods=('gradcam', 'hirescam', 'layercam', 'scorecam')
  )
  # The target is the conv (the ReLU is a function); LayerCAM etc. read its output, so the
  # reference takes the conv's output too.
  pre = model.blocks[1](nnx.max_pool(nnx.relu(model.blocks[0](x)), (2, 2), (2, 2)))
  ref, ref_t = reference_maps(
    pre,
    lambda a: model.head(jnp.tanh(model.conv3(model.bn(nnx.relu(a)))).mean(axis=(1, 2))),
    (16, 16),
  )
  assert_maps_close(maps, ref, targets, ref_t)
  by_object, _ = explain(model, None, x, model.blocks[1], methods=('gradcam',))
  np.testing.assert_array_equal(np.asarray(by_object['gradcam']), np.asarray(maps['gradcam']))
  after = jax.tree.map(np.asarray, nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert isinstance(model.blocks[1], nnx.Conv)
  del act


class EncoderBlock(nn.Module):
  dim: int

  # No LayerNorm: behind a pre-norm the tokens only matter through a scale-invariant map, so
  # sum_c g_c A_c is ~1e-7 and such maps are ruled by the 1e-7 eps of the normalization.
  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(x)
    return x + nn.Dense(self.dim, name='mlp_out')(nn.gelu(nn.Dense(2 * self.dim)(x)))


class TinyViT(nn.Module):
  dim: int = 16
  patch: int = 4

  def setup(self):
    self.embed = nn.Conv(self.dim, (self.patch, self.patch), strides=self.patch)
    self.cls = self.param('cls', nn.initializers.normal(0.02), (1, 1, self.dim))
    self.pos = self.param('pos', nn.initializers.normal(0.02), (1, 17, self.dim))
    self.block_0 = EncoderBlock(self.dim)
    self.block_1 = EncoderBlock(self.dim)
    self.head = nn.Dense(K)

  def tokens(self, x):
    t = self.embed(x).reshape(x.shape[0], -1, self.dim)
    t = jnp.concatenate([jnp.broadcast_to(self.cls, (x.shape[0], 1, self.dim)), t], axis=1)
    return t + self.pos

  def tail(self, t):
    return self.head(self.block_1(t)[:, 0])

  def __call__(self, x):
    return self.tail(self.block_0(self.tokens(x)))


def vit_reshape(t):
  """[B, 1 + 16, D] tokens -> [B, 4, 4, D] (class token dropped)."""
  return t[:, 1:].reshape(t.shape[0], 4, 4, t.shape[-1])


def test_vit_tokens_with_reshape_transform():
  vit, x = TinyViT(), images()
  v = vit.init(jax.random.key(0), x)
  _, state = vit.apply(v, x, capture_intermediates=lambda mdl, name: mdl.scope.path == ('block_0',))
  tok = state['intermediates']['block_0']['__call__'][0]
  logits = vit.apply(v, tok, method=TinyViT.tail)
  targets = jnp.argmax(logits, -1)

  def score(t):
    return jnp.sum(jnp.take_along_axis(vit.apply(v, t, method=TinyViT.tail), targets[:, None], 1))

  a, g = vit_reshape(tok), vit_reshape(jax.grad(score)(tok))
  raw = {
    'gradcam': jnp.einsum('bhwc,bc->bhw', a, g.mean(axis=(1, 2))),
    'hirescam': jnp.sum(g * a, -1),
    'layercam': jnp.sum(jnp.maximum(g, 0) * a, -1),
  }
  ref = {m: postprocess_maps(r, 'gradcam', (16, 16)) for m, r in raw.items()}
  maps, t = explain(
    vit,
    v,
    x,
    'block_0',
    methods=('gradcam', 'hirescam', 'layercam'),
    reshape_transform=vit_reshape,
  )
  assert_maps_close(maps, ref, t, targets)
  with pytest.raises(ValueError, match=r'shape \(3, 17, 16\).*reshape_transform'):
    explain(vit, v, x, 'block_0')


def test_errors_name_the_problem():
  net, x = LinenNet(), images()
  v = net.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"unknown target_layer 'blok'.*'block'"):
    explain(net, v, x, 'blok')
  with pytest.raises(ValueError, match='unknown method'):
    explain(net, v, x, 'block', methods=('gradcm',))
  with pytest.raises(ValueError, match='FullGrad'):
    explain(net, v, x, 'block', methods=('fullgrad',))
  with pytest.raises(ValueError, match='compute_cams_multi'):
    explain(net, v, x, 'block', methods=('cam',))
  with pytest.raises(ValueError, match='logits_fn'):
    explain(net, v, x, 'block', logits_fn=lambda out: out[0])
  model = NnxNet(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'blocks.3'.*'blocks.1'"):
    explain(model, None, x, 'blocks.3')
  with pytest.raises(ValueError, match='variables=None'):
    explain(model, v, x, 'blocks.1')


class DictNet(nn.Module):
  """Outputs a dict with two heads, like this project's dual models."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    f = Block(8, name='body')(x)
    f = nn.Dropout(0.5, deterministic=not train)(f)
    pooled = f.mean(axis=(1, 2))
    return {
      'softmax_logits': nn.Dense(K, name='fc')(pooled),
      'sigmoid_logits': nn.Dense(K, name='fc2')(pooled),
    }


@pytest.mark.numerics
def test_both_heads_call_kwargs_cache_and_sharding():
  net, x = DictNet(), images(b=8)
  v = net.init(jax.random.key(0), x, train=False)
  maps_s, t_s = explain(net, v, x, 'body', methods=('gradcam', 'scorecam'), train=False)
  maps_g, t_g = explain(
    net,
    v,
    x,
    'body',
    methods=('gradcam', 'scorecam'),
    logits_fn='sigmoid_logits',
    targets=t_s,
    train=False,
  )
  np.testing.assert_array_equal(np.asarray(t_s), np.asarray(t_g))
  assert not np.allclose(np.asarray(maps_s['gradcam']), np.asarray(maps_g['gradcam']))
  # Truncated weights: the sigmoid head's map changes, and equals the formula with ReLU(w).
  tr, _ = explain(
    net,
    v,
    x,
    'body',
    logits_fn='sigmoid_logits',
    targets=t_s,
    train=False,
    truncate_negative_weights=True,
  )
  assert tr['gradcam'].shape == (8, 16, 16)
  # One compile per (model, layer, methods, shape): a second call reuses it.
  size = _explain._cache_size()
  explain(net, v, x + 1.0, 'body', methods=('gradcam', 'scorecam'), train=False)
  assert _explain._cache_size() == size
  # Sharded images stay sharded and give the same maps.
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec('data')))
  maps_sh, _ = explain(net, v, xs, 'body', methods=('gradcam', 'scorecam'), train=False)
  assert not maps_sh['gradcam'].sharding.is_fully_replicated
  for m in maps_s:
    np.testing.assert_allclose(np.asarray(maps_sh[m]), np.asarray(maps_s[m]), atol=1e-6)


def test_every_method_runs_in_one_call_with_options():
  net, x = LinenNet(), images(b=2)
  v = net.init(jax.random.key(0), x)
  maps, t = explain(net, v, x, 'block', methods=EXPLAIN_METHODS, batch_size=5)
  assert sorted(maps) == sorted(EXPLAIN_METHODS) and t.shape == (2,)
  for m, a in maps.items():
    assert a.shape == (2, 16, 16) and a.dtype == jnp.float32, m
    assert float(a.min()) >= 0 and float(a.max()) <= 1 and float(a.max()) > 0.5, m
  smooth, _ = explain(net, v, x, 'block', methods=('gradcam',), eigen_smooth=True, aug_smooth=True)
  assert smooth['gradcam'].shape == (2, 16, 16)
  with pytest.raises(ValueError, match='unknown options'):
    explain(net, v, x, 'block', options={'fem_q': 3})


def test_builtin_dual_model_both_heads_with_truncation():
  from dualsig_jax import models
  from dualsig_jax.cam.explain import WEIGHTED_METHODS

  model = models.build_model('vgg_tiny', K)
  v = models.init_variables(model, 0)
  x = images(b=2, size=32)
  for head in ('softmax_logits', 'sigmoid_logits'):
    plain, t = explain(model, v, x, 'conv6', WEIGHTED_METHODS, logits_fn=head, train=False)
    trunc, t2 = explain(
      model,
      v,
      x,
      'conv6',
      WEIGHTED_METHODS,
      t,
      logits_fn=head,
      truncate_negative_weights=True,
      batch_size=64,
      train=False,
    )
    np.testing.assert_array_equal(np.asarray(t), np.asarray(t2))
    for m in WEIGHTED_METHODS:
      assert trunc[m].shape == (2, 32, 32) and float(trunc[m].min()) >= 0, (head, m)
    # Random weights in [-1, 1]: clamping the negative half must change the map.
    assert not np.allclose(np.asarray(plain['randomcam']), np.asarray(trunc['randomcam']))
