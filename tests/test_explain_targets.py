"""cam.explain's targets (functions, shipped targets, every class / top k), several layers, and
maps_fn: a pure function whose maps are differentiated inside the caller's jit / vmap / grad.

The gradient check (float64, scoped with ``jax.enable_x64(True)``; ``jax.experimental.enable_x64``
is gone from this JAX) compares jax.grad of a scalar function of the maps, w.r.t. the parameters and
the images, with central finite differences in float64: directional derivatives agree to a
relative 1e-5 (float64 round-off of the differences at eps=1e-5 is ~1e-10 of the value).
"""

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dualsig_jax.cam import explain, maps_fn
from dualsig_jax.cam import targets as T

K = 4
SMOOTH_METHODS = ('gradcam', 'hirescam', 'gradcam++', 'xgradcam', 'layercam')


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    a = nn.relu(nn.Conv(6, (3, 3), name='conv1')(x))
    a = nn.Conv(6, (3, 3), name='conv2')(a)
    return nn.Dense(K, name='fc')(jnp.tanh(a).mean(axis=(1, 2)))


def setup(b=2, size=8, seed=0):
  net = Net()
  x = jax.random.normal(jax.random.key(seed), (b, size, size, 3))
  return net, net.init(jax.random.key(seed + 1), x), x


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol)


def test_target_functions_and_shipped_targets():
  net, v, x = setup()
  methods = ('gradcam', 'scorecam', 'ablationcam', 'shapleycam')
  by_index, _ = explain(net, v, x, 'conv2', methods, [2, 3], batch_size=4)
  shipped, scores = explain(
    net, v, x, 'conv2', methods, T.ClassifierOutputTarget(jnp.array([2, 3]))
  )
  logits = net.apply(v, x)
  close(scores, logits[jnp.arange(2), jnp.array([2, 3])])
  for m in methods:
    close(shipped[m], by_index[m])
  same, _ = explain(net, v, x, 'conv2', ('gradcam',), lambda out: out[:, 1])
  ref, _ = explain(net, v, x, 'conv2', ('gradcam',), [1, 1])
  close(same['gradcam'], ref['gradcam'])
  # The softmax target: Grad-CAM of p_c, against jax.grad of the softmax written here.
  soft, _ = explain(net, v, x, 'conv2', ('gradcam',), T.ClassifierOutputSoftmaxTarget(1))
  _, st = net.apply(v, x, capture_intermediates=lambda m, _: m.scope.path == ('conv2',))
  act = st['intermediates']['conv2']['__call__'][0]

  fc = v['params']['fc']

  def prob(a):
    out = jnp.tanh(a).mean(axis=(1, 2)) @ fc['kernel'] + fc['bias']
    return jnp.sum(jax.nn.softmax(out)[:, 1])

  g = jax.grad(prob)(act)
  from dualsig_jax.cam.compute import postprocess_maps

  raw = jnp.einsum('bhwc,bc->bhw', act, g.mean(axis=(1, 2)))
  close(soft['gradcam'], postprocess_maps(raw, 'gradcam', (8, 8)))
  raw_maps, raw_scores = explain(net, v, x, 'conv2', ('gradcam',), T.RawScoresOutputTarget())
  close(raw_scores, logits.sum(-1))
  with pytest.raises(ValueError, match=r'category \[7\] out of range'):
    explain(net, v, x, 'conv2', targets=T.ClassifierOutputTarget(7))
  with pytest.raises(ValueError, match='one score per image'):
    explain(net, v, x, 'conv2', targets=lambda out: out)


def test_binary_target_on_one_logit_model():
  class Binary(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = nn.relu(nn.Conv(4, (3, 3), name='conv')(x))
      return nn.Dense(1, name='fc')(jnp.tanh(a).mean(axis=(1, 2)))

  _, v0, x = setup()
  net = Binary()
  v = net.init(jax.random.key(2), x)
  pos, s1 = explain(net, v, x, 'conv', ('gradcam',), T.BinaryClassifierOutputTarget(1))
  neg, s0 = explain(net, v, x, 'conv', ('gradcam',), T.BinaryClassifierOutputTarget(0))
  close(s1, -s0)
  assert not np.allclose(np.asarray(pos['gradcam']), np.asarray(neg['gradcam']))
  with pytest.raises(ValueError, match='category'):
    explain(net, v, x, 'conv', targets=T.BinaryClassifierOutputTarget(2))


def test_all_classes_and_topk_equal_one_call_per_class():
  net, v, x = setup()
  methods = ('gradcam', 'layercam', 'scorecam', 'shapleycam', 'finercam', 'eigencam')
  maps, classes = explain(net, v, x, 'conv2', methods, 'all', batch_size=6)
  assert classes.shape == (2, K) and classes.tolist() == [list(range(K))] * 2
  for c in range(K):
    one, _ = explain(net, v, x, 'conv2', methods, [c, c], batch_size=6)
    for m in methods:
      assert maps[m].shape == (2, K, 8, 8)
      close(maps[m][:, c], one[m], tol=2e-5)
  top, top_cls = explain(net, v, x, 'conv2', methods, ('topk', 2), batch_size=6)
  order = np.argsort(-np.asarray(net.apply(v, x)), axis=-1)[:, :2]
  np.testing.assert_array_equal(np.asarray(top_cls), order)
  for m in methods:
    close(top[m], np.take_along_axis(np.asarray(maps[m]), order[:, :, None, None], axis=1))


def test_layer_list_of_one_is_the_layer_and_two_differ():
  net, v, x = setup()
  one, _ = explain(net, v, x, 'conv2', ('gradcam',))
  listed, _ = explain(net, v, x, ['conv2'], ('gradcam',))
  close(one['gradcam'], listed['gradcam'], tol=0)
  two, _ = explain(net, v, x, ['conv1', 'conv2'], ('gradcam',))
  assert two['gradcam'].shape == (2, 8, 8)
  assert not np.allclose(np.asarray(two['gradcam']), np.asarray(one['gradcam']))


def test_maps_fn_inside_jit_and_vmap():
  net, v, x = setup()
  fn, state = maps_fn(net, v, 'conv2', ('gradcam', 'scorecam'), batch_size=4)
  ref, t = explain(net, v, x, 'conv2', ('gradcam', 'scorecam'), batch_size=4)
  got, t2 = jax.jit(fn)(state, x, t)
  for m in ref:
    close(got[m], ref[m])
  stacked = jnp.stack([x, x[::-1]])
  vm, _ = jax.vmap(fn, in_axes=(None, 0, 0))(state, stacked, jnp.stack([t, t[::-1]]))
  close(vm['gradcam'][1], ref['gradcam'][::-1])


def test_gradients_of_maps_match_finite_differences_float64():
  with jax.enable_x64(True):  # scoped: float64 for this test only
    net = Net()
    x = jax.random.normal(jax.random.key(5), (2, 6, 6, 3), jnp.float64)
    v = jax.tree.map(lambda a: a.astype(jnp.float64), net.init(jax.random.key(6), x))
    weights = jax.random.uniform(jax.random.key(7), (2, 6, 6), jnp.float64)
    targets = jnp.array([1, 3])
    fn, _ = maps_fn(net, v, 'conv2', SMOOTH_METHODS)
    rng = np.random.default_rng(0)
    dv = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), v)
    dx = jnp.asarray(rng.normal(size=x.shape))
    for m in SMOOTH_METHODS:

      def f(v, x, m=m):
        maps, _ = fn(v, x, targets)
        assert maps[m].dtype == jnp.float64
        return jnp.sum(maps[m] * weights)

      gv, gx = jax.jit(jax.grad(f, argnums=(0, 1)))(v, x)
      analytic = sum(jax.tree.leaves(jax.tree.map(jnp.vdot, gv, dv))) + jnp.vdot(gx, dx)
      eps = 1e-5

      def at(s, m=m):
        return f(jax.tree.map(lambda a, d: a + s * d, v, dv), x + s * dx, m)

      numeric = (at(eps) - at(-eps)) / (2 * eps)
      assert abs(float(analytic)) > 1e-3, m  # the check is not vacuous
      np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-5, err_msg=m)


def test_non_differentiable_methods_say_so():
  net, v, x = setup()
  for method, kw in (
    ('eigencam', {}),
    ('fem', {}),
    ('randomcam', {}),
    ('gradcam', {'eigen_smooth': True}),
  ):
    fn, state = maps_fn(net, v, 'conv2', (method,), **kw)
    with pytest.raises(ValueError, match='cannot differentiate'):
      jax.grad(lambda s: jnp.sum(fn(s, x, jnp.array([0, 1]))[0][method]))(state)
    maps, _ = fn(state, x, jnp.array([0, 1]))  # the maps themselves still work
    assert maps[method].shape == (2, 8, 8)


def synthetic_batch(n=4, size=32, classes=10):
  from dualsig_jax.data.synthetic_render import render

  rng = np.random.default_rng(0)
  labels = np.arange(n) % classes
  imgs, inside = [], []
  for lab in labels:
    img, mask = render(int(lab), classes, size, rng)  # the size varies per image
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
    ys, xs = np.nonzero(mask)
    box = np.zeros((size, size), np.float32)
    box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1.0
    imgs.append(img.astype(np.float32) / 255.0 - 0.5)
    inside.append(box)
  return jnp.asarray(np.stack(imgs)), jnp.asarray(labels, jnp.int32), jnp.asarray(np.stack(inside))


def test_training_step_with_a_map_term_in_the_loss():
  from dualsig_jax import models

  model = models.build_model('vgg_tiny', 10)
  variables = models.init_variables(model, 0)
  images, labels, inside = synthetic_batch()
  fn, _ = maps_fn(model, variables, 'conv6', ('gradcam',), logits_fn='sigmoid_logits', train=False)
  opt = optax.adam(1e-3)
  params = variables['params']
  opt_state = opt.init(params)

  def loss_fn(params, images, labels, inside):
    v = {**variables, 'params': params}
    logits = model.apply(v, images, train=False)['sigmoid_logits']
    bce = optax.sigmoid_binary_cross_entropy(logits, jax.nn.one_hot(labels, 10)).mean()
    maps, _ = fn(v, images, labels)
    outside = jnp.sum(maps['gradcam'] * (1 - inside)) / jnp.sum(maps['gradcam'] + 1e-6)
    return bce + 0.1 * outside, outside

  @jax.jit
  def step(params, opt_state, images, labels, inside):
    (loss, outside), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, images, labels, inside
    )
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, outside

  losses = []
  for _ in range(4):
    params, opt_state, loss, outside = step(params, opt_state, images, labels, inside)
    losses.append(float(loss))
    assert np.isfinite(float(outside))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_more_classes_than_one_vmap_chunk():
  class Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = nn.relu(nn.Conv(6, (3, 3), name='conv')(x))
      return nn.Dense(40, name='fc')(a.mean(axis=(1, 2)))

  _, _, x = setup()
  net = Wide()
  v = net.init(jax.random.key(3), x)
  maps, classes = explain(net, v, x, 'conv', ('gradcam',), 'all')
  assert maps['gradcam'].shape == (2, 40, 8, 8) and classes[0].tolist() == list(range(40))
  for c in (0, 33, 39):
    one, _ = explain(net, v, x, 'conv', ('gradcam',), [c, c])
    close(maps['gradcam'][:, c], one['gradcam'])
