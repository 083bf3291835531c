"""Training: losses against PyTorch, optimizer groups, freezing, sharding equivalence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from dualsig_jax import defaults, models
from dualsig_jax.train import losses, optim, sharding
from dualsig_jax.train.state import create_state, train_step


def _np_bce(x, labels, pos_weight):
  y = np.eye(x.shape[1])[labels]
  s = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
  return float(np.mean(-(pos_weight * y * np.log(s) + (1 - y) * np.log(1 - s))))


def test_balanced_bce_matches_formula_and_torch():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 10)).astype(np.float32) * 3
  labels = rng.integers(0, 10, size=16)
  got = float(losses.balanced_bce_with_logits(jnp.asarray(x), jnp.asarray(labels), pos_weight=9.0))
  assert got == pytest.approx(_np_bce(x, labels, 9.0), rel=1e-5)
  crit = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(9.0))
  ref = float(
    crit(torch.from_numpy(x), torch.nn.functional.one_hot(torch.from_numpy(labels), 10).float())
  )
  assert got == pytest.approx(ref, rel=1e-5)
  # Without a positive weight it is optax's plain sigmoid BCE.
  plain = float(
    losses.balanced_bce_with_logits(jnp.asarray(x), jnp.asarray(labels), pos_weight=None)
  )
  ox = float(optax.sigmoid_binary_cross_entropy(x, np.eye(10)[labels]).mean())
  assert plain == pytest.approx(ox, rel=1e-5)


def test_bce_is_stable_for_large_logits():
  x = jnp.array([[80.0, -80.0]])
  v = losses.balanced_bce_with_logits(x, jnp.array([1]), pos_weight=1.0)
  assert np.isfinite(float(v)) and float(v) == pytest.approx(
    80.0, rel=1e-5
  )  # both terms wrong by 80


def test_bce_gamma_and_temp_options_follow_reference():
  x = np.array([[1.0, -2.0, 0.5]], np.float32)
  lab = np.array([2])
  gamma, temp, eps = 0.5, 2.0, 1e-6
  p = 1 / (1 + np.exp(-x / temp))
  y = np.eye(3)[lab]
  ref = np.mean(-y * np.log(p + eps) * gamma - (1 - y) * np.log(1 - p + eps) * gamma)
  got = losses.balanced_bce_with_logits(
    jnp.asarray(x), jnp.asarray(lab), pos_weight=2.0, gamma=gamma, temp=temp
  )
  assert float(got) == pytest.approx(ref, rel=1e-5)


def test_cross_entropy_matches_torch():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 5)).astype(np.float32)
  lab = rng.integers(0, 5, size=8)
  ref = float(torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(lab)))
  assert float(losses.softmax_cross_entropy(jnp.asarray(x), jnp.asarray(lab))) == pytest.approx(
    ref, rel=1e-5
  )


def test_steplr_schedule():
  s = optim.step_decay_schedule(0.1, decay_rate=0.1, frequency=2, steps_per_epoch=5, rule='steplr')
  assert [round(float(s(i)), 8) for i in (0, 9, 10, 25)] == [0.1, 0.1, 0.01, 0.001]


def test_reference_schedule_decays_at_the_start_of_epoch_frequency():
  """main.py:493/572 of the reference: x0.1 at the start of 1-based epoch E when E % f == 0."""
  spe = 4
  s = optim.step_decay_schedule(1.0, decay_rate=0.1, frequency=3, steps_per_epoch=spe)
  per_epoch = [round(float(s(e * spe + spe - 1)), 10) for e in range(10)]
  assert per_epoch == [1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001]
  # The published ImageNet run: 3 epochs, frequency 3: the third epoch at lr / 10.
  assert [float(s(e * spe)) for e in range(3)] == [1.0, 1.0, 0.1]


@pytest.mark.parametrize(
  'arch,fc2_group',
  [('resnet50', 'feature'), ('vgg16', 'classifier'), ('inception_v3', 'classifier')],
)
def test_reference_grouping_of_the_sigmoid_head(arch, fc2_group):
  """The reference groups by name: fc2 trains at lr x 1 for ResNet50 but at lr x 10 for VGG16 / InceptionV3."""
  assert models.lr_group(arch, ('fc2', 'kernel')) == fc2_group


def _tiny_setup(stage='dual', arch='resnet_tiny', num_classes=4, size=32, lr=0.05):
  model = models.build_model(arch, num_classes, frozen_backbone=(stage == 'dual'))
  variables = models.init_variables(model, jax.random.PRNGKey(0), size)
  variables = models.clone_head(variables, mode='clone')
  o = _optim_cfg(lr, stage)
  tx, labels, _ = optim.make_optimizer(
    variables['params'], arch=arch, stage=stage, optim_cfg=o, steps_per_epoch=10
  )
  return model, variables, tx, labels


def _optim_cfg(lr=0.05, stage='dual'):
  # The schema's stage section (every optimizer field the code may read), at a test lr.
  o = defaults.base_config()[stage]
  o.lr = lr
  return o


def _batch(n=16, size=32, num_classes=4, seed=0):
  rng = np.random.default_rng(seed)
  return {
    'image': rng.normal(size=(n, size, size, 3)).astype(np.float32),
    'label': rng.integers(0, num_classes, size=n).astype(np.int32),
  }


def _run_steps(mesh, model, variables, tx, batches, *, stage='dual'):
  repl = sharding.replicated(mesh)
  # Copy: donation would otherwise delete the caller's arrays, which the next run reuses.
  state = jax.device_put(create_state(jax.tree.map(jnp.array, variables), tx, 0), repl)
  fn = jax.jit(
    functools.partial(
      train_step,
      model=model,
      tx=tx,
      stage=stage,
      train_mode=(stage != 'dual'),
      keep_batch_stats=(stage != 'dual'),
      pos_weight=3.0,
      gamma=1.0,
      temp=1.0,
    ),
    in_shardings=(repl, sharding.data_sharded(mesh)),
    out_shardings=(repl, repl),
    donate_argnums=(0,),
  )
  for b in batches:
    state, _ = fn(state, sharding.to_global(b, mesh))
  return jax.device_get(state)


def test_dual_step_freezes_everything_but_fc2():
  model, variables, tx, labels = _tiny_setup('dual')
  flat_labels = optim.describe_labels(labels)
  assert all(n.startswith('fc2/') for n in flat_labels['feature'] + flat_labels['classifier'])
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  start = jax.device_get(variables)
  end = _run_steps(mesh, model, variables, tx, [_batch(seed=i) for i in range(3)])
  for name in start['params']:
    same = jax.tree.map(
      lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
      start['params'][name],
      end.params[name],
    )
    if name == 'fc2':
      assert not all(jax.tree.leaves(same)), 'fc2 did not train'
    else:
      assert all(jax.tree.leaves(same)), f'{name} changed in the dual stage'
  stats_same = jax.tree.map(
    lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), start['batch_stats'], end.batch_stats
  )
  assert all(jax.tree.leaves(stats_same))
  # set_to_zero keeps no optimizer state for frozen leaves: only fc2 has momentum buffers.
  n_state = sum(np.size(x) for x in jax.tree.leaves(end.opt_state))
  n_fc2 = sum(np.size(x) for x in jax.tree.leaves(start['params']['fc2']))
  assert n_state <= n_fc2 + 8


@pytest.mark.parametrize('stage', ['vanilla', 'dual'])
def test_eight_devices_match_one_device(stage):
  assert jax.device_count() == 8
  # A moderate lr: float32 reductions in another order (8 shards) differ by ~1e-7 relative,
  # and a large lr would amplify that past the 1e-5 tolerance within three steps.
  model, variables, tx, _ = _tiny_setup(stage, lr=0.01)
  batches = [_batch(seed=i) for i in range(3)]
  one = _run_steps(
    Mesh(np.asarray(jax.devices()[:1]), ('data',)), model, variables, tx, batches, stage=stage
  )
  eight = _run_steps(sharding.make_mesh(), model, variables, tx, batches, stage=stage)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one.batch_stats), jax.tree.leaves(eight.batch_stats)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_batch_not_divisible_by_devices_is_rejected():
  with pytest.raises(ValueError, match='input.batch_size=12 does not split over the 8 devices'):
    sharding.check_global_batch(12, sharding.make_mesh())
