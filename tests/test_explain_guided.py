"""Guided Backprop (Linen/NNX, where ReLUs are reachable), ROAD's imputation and metrics."""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualsig_jax.cam import guided
from dualsig_jax.cam import road_metrics as road
from dualsig_jax.cam.explain import explain

K = 5


class NnxNet(nnx.Module):
  """Calls ``nnx.relu`` by name, or ``relu`` when one is given (the test's reference)."""

  def __init__(self, rngs, relu=None):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.head = nnx.Linear(8, K, rngs=rngs)
    self.relu = relu

  def __call__(self, x):
    act = self.relu or nnx.relu
    x = act(self.conv2(act(self.conv1(x))))
    return self.head(x.mean(axis=(1, 2)))


@pytest.mark.numerics
def test_nnx_guided_backprop_equals_explicit_guided_relu_model():
  x = jax.random.normal(jax.random.key(1), (2, 12, 12, 3))
  model = NnxNet(nnx.Rngs(0))
  gb, targets = guided.guided_backprop(model, None, x)
  twin = NnxNet(nnx.Rngs(0), relu=guided.guided_relu)  # same weights (same seed)

  def score(xx):
    return jnp.sum(jnp.take_along_axis(twin(xx), targets[:, None], axis=1))

  ref = jax.grad(score)(x)
  np.testing.assert_allclose(np.asarray(gb), np.asarray(ref), atol=1e-6)
  plain = jax.grad(lambda xx: jnp.sum(jnp.take_along_axis(model(xx), targets[:, None], 1)))(x)
  assert not np.allclose(np.asarray(gb), np.asarray(plain), atol=1e-6)
  assert model.relu is None and nnx.relu is jax.nn.relu  # nothing left patched
  ggc, _ = guided.guided_gradcam(model, None, x, 'conv2')
  maps, _ = explain(model, None, x, 'conv2')
  np.testing.assert_allclose(np.asarray(ggc), np.asarray(gb * maps['gradcam'][..., None]))


class BoundRelu(nn.Module):
  act: Callable = nn.relu  # bound when the class is defined: out of reach

  @nn.compact
  def __call__(self, x):
    return nn.Dense(K)(self.act(nn.Dense(4)(x.mean(axis=(1, 2)))))


def test_unreachable_relu_is_an_error():
  x = jnp.ones((2, 8, 8, 3))
  m = BoundRelu()
  v = m.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='reached no ReLU'):
    guided.guided_backprop(m, v, x)


def test_linear_imputation_reproduces_a_ramp_and_road_options():
  yy, xx = jnp.meshgrid(jnp.arange(10.0), jnp.arange(10.0), indexing='ij')
  ramp = jnp.stack([0.3 * yy - 0.2 * xx, xx + 1.0], -1)[None]  # [1, 10, 10, 2]
  keep = jnp.ones((1, 10, 10)).at[:, 3:7, 2:8].set(0.0)
  out = road.linear_impute(ramp, keep)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ramp), atol=1e-4)

  x = jax.random.normal(jax.random.key(2), (2, 12, 12, 3))
  model = NnxNet(nnx.Rngs(0))
  maps, t = explain(model, None, x, 'conv2')
  a = road.road(model, None, x, maps['gradcam'], t, percentiles=(20, 80), noise=0.01, seed=1)
  b = road.road(model, None, x, maps['gradcam'], t, percentiles=(20, 80), noise=0.01, seed=1)
  c = road.road(model, None, x, maps['gradcam'], t, percentiles=(20, 80), noise=0.0)
  assert a.shape == (2, 2)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  with pytest.raises(ValueError, match='percentiles'):
    road.road(model, None, x, maps['gradcam'], t, percentiles=(101,))
  assert road.road(model, None, x, maps['gradcam'], t, percentiles='auto').shape == (2, 1)
  with pytest.raises(ValueError, match='order'):
    road.road(model, None, x, maps['gradcam'], t, order='mif')
  change = road.cam_mult_image_confidence_change(model, None, x, maps['gradcam'], t)
  logit = lambda xx: jnp.take_along_axis(model(xx), t[:, None], 1)[:, 0]  # noqa: E731
  ref = logit(x * maps['gradcam'][..., None]) - logit(x)
  np.testing.assert_allclose(np.asarray(change), np.asarray(ref), atol=1e-5)
