"""ScoreCAM runs each distinct masked image once: constant channels share the zero image's
forward, channels identical to an earlier one of the same image share its score; the weights
equal those of one forward per (image, channel), and the chunks past the distinct images are
not run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualsig_jax.cam import perturbation as P


def _acts():
  """[2, 4, 4, 8] with image 0: ch 0 zeros, ch 1 constant 3, ch 5 = ch 2, ch 7 = ch 2;
  image 1: ch 3 zeros, ch 6 = ch 4; the rest distinct."""
  a = np.array(jax.random.uniform(jax.random.key(0), (2, 4, 4, 8)))
  a[0, ..., 0] = 0.0
  a[0, ..., 1] = 3.0
  a[0, ..., 5] = a[0, ..., 2]
  a[0, ..., 7] = a[0, ..., 2]
  a[1, ..., 3] = 0.0
  a[1, ..., 6] = a[1, ..., 4]
  return jnp.asarray(a)


def test_plan_finds_constant_and_repeated_channels():
  rep, constant = jax.jit(P.scorecam_plan)(_acts())
  want_rep = np.tile(np.arange(8), (2, 1))
  want_rep[0, [5, 7]] = 2
  want_rep[1, 6] = 4
  np.testing.assert_array_equal(np.asarray(rep)[:, 2:], want_rep[:, 2:])
  want_const = np.zeros((2, 8), bool)
  want_const[0, [0, 1]] = True
  want_const[1, 3] = True
  np.testing.assert_array_equal(np.asarray(constant), want_const)


def test_plan_keeps_maps_apart_that_differ_in_one_element():
  a = np.array(_acts())
  a[0, 3, 3, 7] += 1e-6  # ch 7 no longer equals ch 2
  rep, _ = P.scorecam_plan(jnp.asarray(a))
  assert int(rep[0, 7]) == 7 and int(rep[0, 5]) == 2


def _model():
  k = jax.random.split(jax.random.key(1), 2)
  w = jax.random.normal(k[0], (3, 7)) * 0.3

  def forward(x):  # [N, 8, 8, 3] -> [N, 7]: a smooth non-linear function of the whole image
    h = jnp.tanh(x.reshape(x.shape[0], -1, 3) @ w)
    return h.mean(axis=1) + 0.1 * jnp.sin(x).sum(axis=(1, 2)) @ w

  return forward, jax.random.normal(k[1], (2, 8, 8, 3))


def _weights(fn, forward, images, acts, targets, batch_size):
  """``fn`` (scorecam_weights or _all) with a stateless ``forward(x) -> logits [N, K]`` and the
  target logit as the score, in the calling convention of cam.explain."""

  def score(out, rows):
    return jnp.take_along_axis(out, targets[rows][:, None], axis=1)[:, 0]

  return fn(lambda _, x: forward(x), None, images, acts, score, batch_size)


@pytest.mark.numerics
def test_weights_equal_one_forward_per_channel_and_fewer_forwards_run():
  forward, images = _model()
  acts, targets = _acts(), jnp.array([3, 5], jnp.int32)
  calls = []

  def counted(x):
    jax.debug.callback(lambda n: calls.append(int(n)), x.shape[0])
    return forward(x)

  new = jax.jit(lambda: _weights(P.scorecam_weights, counted, images, acts, targets, 2))()
  jax.block_until_ready(new)
  new_calls, calls[:] = list(calls), []
  old = jax.jit(lambda: _weights(P.scorecam_weights_all, counted, images, acts, targets, 2))()
  jax.block_until_ready(old)
  np.testing.assert_allclose(np.asarray(new), np.asarray(old), rtol=0, atol=1e-6)
  # 16 (image, channel) pairs: 3 constant, 3 repeats -> 10 distinct masks = 5 chunks of 2,
  # plus the zero image once; the old way runs all 8 chunks.
  assert sorted(new_calls) == [1] + [2] * 5, new_calls
  assert calls == [2] * 8, calls


@pytest.mark.numerics
def test_no_savings_when_every_map_differs():
  forward, images = _model()
  acts = jax.random.normal(jax.random.key(3), (2, 4, 4, 8))
  targets = jnp.array([0, 6], jnp.int32)
  new = _weights(P.scorecam_weights, forward, images, acts, targets, 3)
  old = _weights(P.scorecam_weights_all, forward, images, acts, targets, 3)
  np.testing.assert_allclose(np.asarray(new), np.asarray(old), rtol=0, atol=1e-6)
  rep, constant = P.scorecam_plan(acts)
  assert not bool(constant.any()) and bool((rep == jnp.arange(8)).all())
