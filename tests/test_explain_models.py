"""cam.explain on the Flax models people have: a Linen module with unhashable fields (a config
object, as HF transformers' Flax models keep, and a dict) and an NNX model that runs its blocks
with ``nnx.scan`` and keeps a config object.

Every method runs on both; the gradient methods are checked against an independent reference:
the activation from ``capture_intermediates`` (Linen) or the submodules called by hand (NNX), and
``jax.grad`` of the target logit through the rest of the network, re-written here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualsig_jax.cam.compute import postprocess_maps
from dualsig_jax.cam.explain import EXPLAIN_METHODS, _explain, explain

K = 5
GRAD_METHODS = ('gradcam', 'hirescam', 'layercam', 'gradcam++')


class Config:
  """HF-style config: compared by value, so unhashable (``__eq__`` without ``__hash__``)."""

  def __init__(self, width, depth):
    self.width, self.depth = width, depth

  def __eq__(self, other):
    return isinstance(other, Config) and vars(self) == vars(other)


class CfgNet(nn.Module):
  config: Config
  extra: dict

  def setup(self):
    self.conv1 = nn.Conv(self.config.width, (3, 3))
    self.conv2 = nn.Conv(self.extra['width2'], (3, 3))
    self.conv3 = nn.Conv(8, (3, 3))
    self.fc = nn.Dense(K)

  def tail(self, a):
    return self.fc(jnp.tanh(self.conv3(nn.relu(a))).mean(axis=(1, 2)))

  def __call__(self, x):
    return self.tail(self.conv2(nn.relu(self.conv1(x))))


class Block(nnx.Module):
  def __init__(self, c, rngs):
    self.conv = nnx.Conv(c, c, (3, 3), rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.conv(x))


class ScanNet(nnx.Module):
  """Stem, three blocks stacked by ``nnx.vmap`` and run by ``nnx.scan``, then conv + head; keeps
  an unhashable config object and integer state (a dropout RNG counter)."""

  def __init__(self, config, rngs):
    self.config = config
    self.stem = nnx.Conv(3, config.width, (3, 3), rngs=rngs)

    @nnx.split_rngs(splits=config.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
      return Block(config.width, r)

    self.blocks = make(rngs)
    self.post = nnx.Conv(config.width, config.width, (3, 3), rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(config.width, K, rngs=rngs)

  def run_blocks(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, block):
      return block(h)

    return body(x, self.blocks)

  def after_post(self, a):
    return self.head(self.drop(jnp.tanh(a).mean(axis=(1, 2))))

  def __call__(self, x):
    return self.after_post(self.post(self.run_blocks(nnx.relu(self.stem(x)))))


def host(a):
  """A state leaf as NumPy (RNG keys as their raw data)."""
  if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
    a = jax.random.key_data(a)
  return np.asarray(a)


def images(b=2, size=12, seed=3):
  return jax.random.normal(jax.random.key(seed), (b, size, size, 3))


def reference(act, tail, size):
  """Grad-CAM family maps from ``act [B, h, w, C]`` and ``tail(act) -> logits``."""
  targets = jnp.argmax(tail(act), axis=-1)
  g = jax.grad(lambda a: jnp.sum(jnp.take_along_axis(tail(a), targets[:, None], axis=1)))(act)
  # Grad-CAM++ as pytorch-grad-cam 1.5.7 writes it.
  g2, g3 = g**2, g**3
  aij = g2 / (2 * g2 + jnp.sum(act, axis=(1, 2), keepdims=True) * g3 + 1e-6)
  w_pp = jnp.sum(jnp.maximum(g, 0) * jnp.where(g != 0, aij, 0.0), axis=(1, 2))
  raw = {
    'gradcam': jnp.einsum('bhwc,bc->bhw', act, g.mean(axis=(1, 2))),
    'hirescam': jnp.sum(g * act, axis=-1),
    'layercam': jnp.sum(jnp.maximum(g, 0) * act, axis=-1),
    'gradcam++': jnp.einsum('bhwc,bc->bhw', act, w_pp),
  }
  return {m: postprocess_maps(r, 'gradcam', size) for m, r in raw.items()}, targets


def check_against(maps, targets, ref, ref_targets):
  np.testing.assert_array_equal(np.asarray(targets), np.asarray(ref_targets))
  for m, r in ref.items():
    np.testing.assert_allclose(np.asarray(maps[m]), np.asarray(r), atol=1e-5, err_msg=m)


def check_all_methods(maps, b, size):
  assert sorted(maps) == sorted(EXPLAIN_METHODS)
  for m, a in maps.items():
    assert a.shape == (b, *size) and a.dtype == jnp.float32, m
    assert bool(jnp.all(jnp.isfinite(a))) and float(a.min()) >= 0 and float(a.max()) <= 1, m


def test_linen_module_with_unhashable_config_fields():
  net = CfgNet(Config(6, 2), {'width2': 7})
  with pytest.raises(TypeError):
    hash(net)  # the case jax.jit's static arguments refuse
  x = images()
  v = net.init(jax.random.key(0), x)
  _, st = net.apply(v, x, capture_intermediates=lambda mdl, _: mdl.scope.path == ('conv2',))
  act = st['intermediates']['conv2']['__call__'][0]
  ref, ref_t = reference(act, lambda a: net.apply(v, a, method=CfgNet.tail), (12, 12))
  maps, t = explain(net, v, x, 'conv2', EXPLAIN_METHODS, batch_size=8)
  check_all_methods(maps, 2, (12, 12))
  check_against(maps, t, ref, ref_t)
  # Cached by identity: a second call on the same module compiles nothing new.
  size = _explain._cache_size()
  explain(net, v, x + 1.0, 'conv2', EXPLAIN_METHODS, batch_size=8)
  assert _explain._cache_size() == size


def test_nnx_scan_model_at_layers_before_and_after_the_scan():
  model = ScanNet(Config(6, 3), nnx.Rngs(0))
  model.eval()
  with pytest.raises(TypeError):
    hash(nnx.split(model)[0])  # the config object makes the graph definition unhashable
  x = images()
  before = jax.tree.map(host, nnx.state(model))
  maps, t = explain(model, None, x, 'post', EXPLAIN_METHODS, batch_size=8)
  check_all_methods(maps, 2, (12, 12))
  trunk = model.run_blocks(nnx.relu(model.stem(x)))
  ref, ref_t = reference(model.post(trunk), model.after_post, (12, 12))
  check_against(maps, t, ref, ref_t)

  # Before the scan: the gradient runs back through nnx.scan. NNX refuses, inside its nnx.scan,
  # variables made outside jax.grad, so the reference rebuilds them inside (fresh Variables).
  graphdef, state = nnx.split(model)

  def tail(a):
    m = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
    return m.after_post(m.post(m.run_blocks(nnx.relu(a))))

  stem_maps, stem_t = explain(model, None, x, model.stem, EXPLAIN_METHODS, batch_size=8)
  check_all_methods(stem_maps, 2, (12, 12))
  ref, ref_t = reference(model.stem(x), tail, (12, 12))
  check_against(stem_maps, stem_t, ref, ref_t)
  # A second call on the same model reuses the compiled function; the model is unchanged.
  size = _explain._cache_size()
  explain(model, None, x * 0.5, 'post', EXPLAIN_METHODS, batch_size=8)
  assert _explain._cache_size() == size
  after = jax.tree.map(host, nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, before, after)
