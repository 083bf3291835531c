"""Speed in every log line (images/s, per device, step time, compile once, no MFU on CPU), the
profile trace of --config.profile_steps, and a loop that reads nothing from the device
between two log steps."""

import contextlib
import json
import os

import jax
import jax.numpy as jnp
import pytest
import smoke_helpers

from dualsig_jax import defaults
from dualsig_jax.plan import chips
from dualsig_jax.train import loop, speed

smoke_data = smoke_helpers.smoke_data


@contextlib.contextmanager
def GUARD():
  """No device value may be read: jax's device-to-host transfer guard (on accelerators), and,
  since a CPU array needs no transfer, every read of an array's value (float(), np.asarray,
  device_get, .item) and every wait on one refused outright."""
  from jax._src import array

  cls = array.ArrayImpl
  saved = cls._value, cls.block_until_ready

  def refuse(*_):
    raise AssertionError('a device value was read between two log steps')

  cls._value, cls.block_until_ready = property(refuse), refuse
  try:
    with jax.transfer_guard_device_to_host('disallow_explicit'):
      yield
  finally:
    cls._value, cls.block_until_ready = saved


def test_the_guard_refuses_device_reads():
  """The guard the loop test installs does refuse device reads (so that test can fail)."""
  x = jnp.ones(3) * 2
  for read in (lambda: float(x[0]), lambda: jax.device_get(x), lambda: x.block_until_ready()):
    with GUARD(), pytest.raises(AssertionError, match='read between two log steps'):
      read()
  assert float(x[0]) == 2.0  # restored after the guard


def test_log_lines_carry_speed_and_the_loop_never_waits(smoke_data, tmp_path, monkeypatch):
  monkeypatch.setattr(speed, 'BETWEEN_LOGS_GUARD', GUARD)
  c = smoke_helpers.smoke_config(smoke_data)
  c.stages = ('vanilla',)
  c.vanilla.max_steps = 7
  c.log_every_steps = 3
  c.checkpoint.every_steps = 100
  c.profile_steps = '2,3'
  out = loop.train_stage(c, str(tmp_path), 'vanilla')
  assert out['step'] == 7
  with open(tmp_path / 'metrics.jsonl') as f:
    recs = [json.loads(line) for line in f]
  compiles = [r for r in recs if r.get('event') == 'compile']
  assert len(compiles) == 1 and compiles[0]['compile_s'] > 0 and compiles[0]['step'] == 1
  logs = [r for r in recs if 'loss' in r]
  assert [r['step'] for r in logs] == [3, 6, 7]
  for r in logs:
    assert r['images_per_s'] > 0 and r['step_time_s'] > 0
    assert r['images_per_s_per_device'] == pytest.approx(r['images_per_s'] / jax.device_count())
    assert r['images_per_s'] == pytest.approx(c.input.batch_size / r['step_time_s'])
    assert 'mfu' not in r  # CPU: no published peak, no invented MFU
  trace = tmp_path / 'profile' / 'vanilla'
  files = [os.path.join(d, f) for d, _, fs in os.walk(trace) for f in fs]
  assert any(f.endswith('.xplane.pb') for f in files), files


def test_mfu_from_flops_and_peak():
  s = speed.Speed(64, jax.devices()[:1])
  s.chip = chips.CHIPS['v5e']
  s.flops_per_step = 197e12 * 0.5  # half a second of the chip's peak per step
  s._steps = 4
  s._t0 -= 4.0  # four steps in four seconds
  f = s.fields()
  assert f['step_time_s'] == pytest.approx(1.0, rel=0.05)
  assert f['mfu'] == pytest.approx(0.5, rel=0.05)


def test_chip_kinds():
  assert chips.chip_for_kind('TPU v5 lite') is chips.CHIPS['v5e']
  assert chips.chip_for_kind('NVIDIA H100 80GB HBM3') is chips.CHIPS['h100']
  assert chips.chip_for_kind('cpu') is None


def test_profile_steps_validated():
  assert defaults.profile_range('') is None
  assert defaults.profile_range('4,9') == (4, 9)
  for bad in ('9,4', '0,3', 'x', '3'):
    with pytest.raises(ValueError, match='profile_steps'):
      defaults.profile_range(bad)
