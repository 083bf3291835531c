"""The sigmoid branch on a user's NNX classifier with an MLP head: dual steps, freezing, maps."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dualsig_jax.cam import explain
from dualsig_jax.models.nnx_branch import nnx_dual_branch
from dualsig_jax.train import optim
from dualsig_jax.train import state as st

K = 4


class Classifier(nnx.Module):
  """A user's model: conv + BatchNorm backbone, GAP, an MLP head at ``self.head``."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Sequential(nnx.Linear(8, 16, rngs=rngs), nnx.relu, nnx.Linear(16, K, rngs=rngs))

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv1(x)))
    x = self.drop(nnx.relu(self.conv2(x)))
    return self.head(x.mean(axis=(1, 2)))


def snapshot(module):
  """Every state leaf of ``module`` as NumPy (RNG keys as their key data)."""

  def leaf(a):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a = jax.random.key_data(a)
    return np.asarray(a)

  return jax.tree.map(leaf, nnx.state(module))


def optim_cfg():
  return ml_collections.ConfigDict(
    dict(
      name='sgd',
      lr=0.1,
      lr_classifier_ratio=1.0,
      momentum=0.9,
      weight_decay=1e-4,
      nesterov=False,
      lr_decay_rate=0.1,
      lr_decay_frequency=10,
      lr_schedule='reference',
    )
  )


@pytest.mark.numerics
def test_three_dual_steps_freeze_backbone_and_fc_then_explain_both_heads():
  user = Classifier(nnx.Rngs(0))
  before_user = snapshot(user)
  dual = nnx_dual_branch(user, head='head')
  variables = dual.init_variables()
  assert sorted(variables['params']) == ['backbone', 'fc', 'fc2']
  tx, labels, _ = optim.make_optimizer(
    variables['params'], arch=None, stage='dual', optim_cfg=optim_cfg(), steps_per_epoch=10
  )
  state = st.create_state(variables, tx, seed=0)
  step = jax.jit(
    functools.partial(
      st.train_step,
      model=dual,
      tx=tx,
      stage='dual',
      train_mode=True,
      keep_batch_stats=False,
      pos_weight=K - 1.0,
      gamma=1.0,
      temp=1.0,
    )
  )
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = {
      'image': jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32),
      'label': jnp.asarray(rng.integers(0, K, 8), jnp.int32),
    }
    state, metrics = step(state, batch)
  assert np.isfinite(float(metrics['bce']))
  p0, p1 = variables['params'], state.params
  for part in ('backbone', 'fc'):
    jax.tree.map(np.testing.assert_array_equal, p0[part], p1[part])
  jax.tree.map(np.testing.assert_array_equal, variables['batch_stats'], state.batch_stats)
  changed = jax.tree.map(
    lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), p0['fc2'], p1['fc2']
  )
  assert any(jax.tree.leaves(changed))
  # The user's object is untouched, and the trained dual model explains with both heads.
  jax.tree.map(np.testing.assert_array_equal, before_user, snapshot(user))
  module = dual.to_nnx(state.variables())
  x = batch['image'][:4]
  soft, t = explain(
    module, None, x, 'model.conv2', methods=('gradcam', 'layercam'), logits_fn='softmax_logits'
  )
  sig, t2 = explain(
    module,
    None,
    x,
    'model.conv2',
    methods=('gradcam', 'layercam'),
    targets=t,
    logits_fn='sigmoid_logits',
  )
  np.testing.assert_array_equal(np.asarray(t), np.asarray(t2))
  assert soft['gradcam'].shape == sig['gradcam'].shape == (4, 16, 16)
  assert not np.allclose(np.asarray(soft['gradcam']), np.asarray(sig['gradcam']))
  out = module(x)
  np.testing.assert_allclose(
    np.asarray(out['softmax_logits']),
    np.asarray(dual.apply(state.variables(), x)['softmax_logits']),
    atol=1e-6,
  )
