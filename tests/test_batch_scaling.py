"""Any global batch: lr scaling rules, warmup, gradient accumulation, and the tuned batch
unchanged bit for bit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import synthetic
from dualsig_jax import defaults, models
from dualsig_jax.train import optim, sharding
from dualsig_jax.train.state import create_state, train_step


def _section(stage='vanilla', **kw):
  o = defaults.base_config()[stage]
  o.update(kw)
  return o


def test_lr_scale_rules():
  assert optim.lr_scale('linear', 256, 32) == 8.0
  assert optim.lr_scale('sqrt', 128, 32) == 2.0
  assert optim.lr_scale('none', 256, 32) == 1.0
  assert optim.lr_scale('linear', 32, 32) == 1.0
  with pytest.raises(ValueError, match='valid'):
    optim.lr_scale('cubic', 64, 32)


def test_schedules_follow_batch_and_warmup():
  params = {'conv': {'kernel': jnp.zeros((2, 2))}}
  o = _section(lr=0.1, lr_classifier_ratio=1.0, warmup_epochs=2.0, lr_decay_frequency=10)
  _, _, s = optim.make_optimizer(
    params, arch=None, stage='vanilla', optim_cfg=o, steps_per_epoch=5, global_batch=256
  )
  # Linear rule, 8x the base batch 32; warmup over 2 epochs = 10 steps: (step + 1) / 10.
  assert s['feature'](0) == pytest.approx(0.8 * 0.1)
  assert s['feature'](4) == pytest.approx(0.8 * 0.5)
  assert s['feature'](9) == pytest.approx(0.8)
  assert s['feature'](12) == pytest.approx(0.8)
  # Traced steps (inside optax) give the same values.
  assert float(jax.jit(s['feature'])(jnp.int32(4))) == pytest.approx(0.8 * 0.5)


def _vanilla_steps(o, batches, global_batch, arch='vgg_tiny'):
  model = models.build_model(arch, 4, frozen_backbone=False)
  variables = models.init_variables(model, jax.random.PRNGKey(0), 32)
  tx, _, _ = optim.make_optimizer(
    variables['params'],
    arch=arch,
    stage='vanilla',
    optim_cfg=o,
    steps_per_epoch=10,
    global_batch=global_batch,
  )
  mesh = Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
  state = jax.device_put(create_state(variables, tx, 0), sharding.replicated(mesh))
  step = jax.jit(
    functools.partial(
      train_step,
      model=model,
      tx=tx,
      accum_steps=int(o.accum_steps),
      stage='vanilla',
      train_mode=True,
      keep_batch_stats=True,
      pos_weight=3.0,
      gamma=1.0,
      temp=1.0,
    )
  )
  for b in batches:
    state, metrics = step(state, b)
  return jax.device_get(state), jax.device_get(metrics)


def _batches(n=16, count=3):
  rng = np.random.default_rng(0)
  return [
    {
      'image': rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
      'label': rng.integers(0, 4, size=n).astype(np.int32),
    }
    for _ in range(count)
  ]


def test_tuned_batch_is_bit_identical_to_unscaled():
  """At the batch the lr was tuned at, the new fields (linear rule, no warmup, no
  accumulation) change nothing: the same parameters bit for bit as the unscaled optimizer
  (global_batch=None, the code path of before the fields existed)."""
  o = _section(lr=0.05)
  assert (o.base_batch_size, o.lr_scaling, o.warmup_epochs, o.accum_steps) == (32, 'linear', 0, 1)
  batches = _batches()
  new, _ = _vanilla_steps(o, batches, global_batch=32)
  old, _ = _vanilla_steps(o, batches, global_batch=None)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(old.params), strict=True):
    np.testing.assert_array_equal(a, b)
  # The scaled run differs (so the comparison above can fail).
  big, _ = _vanilla_steps(o, batches, global_batch=64)
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(big.params), jax.tree.leaves(old.params), strict=True)
  )


def test_synthetic_config_is_at_its_tuned_batch():
  for arg in (None, 'smoke'):
    c = synthetic.get_config(arg)
    for stage in ('vanilla', 'dual'):
      assert c[stage].base_batch_size == c.input.batch_size, (arg, stage)


def test_accumulation_matches_the_whole_batch():
  """accum_steps=2 (optax.MultiSteps over two micro-batches) takes the same steps as the
  whole batch at once on a model without BatchNorm (vgg_tiny)."""
  batches = _batches()
  whole, m1 = _vanilla_steps(_section(lr=0.05), batches, global_batch=32)
  acc, m2 = _vanilla_steps(_section(lr=0.05, accum_steps=2), batches, global_batch=32)
  assert int(acc.step) == int(whole.step) == 3
  for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(whole.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  assert float(m2['loss']) == pytest.approx(float(m1['loss']), rel=1e-4)


def test_accumulation_must_split_the_device_batch():
  mesh = Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
  sharding.check_accumulation(32, 4, mesh, 'vanilla.accum_steps')
  with pytest.raises(ValueError, match='vanilla.accum_steps=3 does not split'):
    sharding.check_accumulation(32, 3, mesh, 'vanilla.accum_steps')


def test_validate_refuses_unknown_rule():
  c = synthetic.get_config()
  with c.unlocked():
    c.vanilla.lr_scaling = 'cubic'
  with pytest.raises(ValueError, match='lr_scaling'):
    defaults.validate(c)


def test_batch_report_states_the_scaled_lr_and_warns_outside_validation():
  # At the tuned batch: the lr as configured, nothing to warn about.
  info, warns = optim.batch_report(_section('dual', lr=0.01), 'dual', 32, 10, 30)
  assert 'lr 0.01 tuned at batch 32, x1 (linear) = 0.01 at batch 32' in info
  assert warns == []
  # The dual stage at 8x: validated, no warning.
  info, warns = optim.batch_report(_section('dual', lr=0.01), 'dual', 256, 10, 30)
  assert 'x8 (linear) = 0.08 at batch 256' in info
  assert warns == []
  # 16x: beyond what was validated.
  _, warns = optim.batch_report(_section('dual', lr=0.01), 'dual', 512, 10, 30)
  assert len(warns) == 1 and 'validated up to 8x only' in warns[0]
  # sqrt was never validated, at any scaled batch; at the tuned batch it changes nothing.
  _, warns = optim.batch_report(_section('dual', lr=0.01, lr_scaling='sqrt'), 'dual', 64, 10, 30)
  assert len(warns) == 1 and 'sqrt rule is not validated' in warns[0]
  _, warns = optim.batch_report(_section('dual', lr=0.01, lr_scaling='sqrt'), 'dual', 32, 10, 30)
  assert warns == []
  # 'none' scales nothing, so it claims nothing about validation.
  _, warns = optim.batch_report(_section('dual', lr=0.01, lr_scaling='none'), 'dual', 512, 10, 30)
  assert warns == []
  # The vanilla stage at any scaled batch: no validated rule.
  _, warns = optim.batch_report(_section('vanilla', lr=0.05), 'vanilla', 64, 10, 80)
  assert len(warns) == 1 and 'no lr rule is validated for the vanilla stage' in warns[0]
  # A warmup as long as the stage: the scaled lr is never reached.
  o = _section('dual', lr=0.01, warmup_epochs=3.0)
  _, warns = optim.batch_report(o, 'dual', 64, 10, 30)
  assert len(warns) == 1 and 'never reaches its scaled value 0.02' in warns[0]
  _, warns = optim.batch_report(_section('dual', lr=0.01, warmup_epochs=2.0), 'dual', 64, 10, 30)
  assert warns == []
