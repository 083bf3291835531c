"""The pod plan: the project's steps compiled for a small TPU topology (libtpu, no TPU) with
tiny models; the largest-batch search and the estimates' arithmetic; the no-libtpu message.

CI must install the `tpu-plan` extra (libtpu) for the compile tests to run; without it they
skip and say so."""

import importlib.util

import pytest

from configs import synthetic
from dualsig_jax.plan import __main__ as plan_main
from dualsig_jax.plan import chips, compiled, estimate

NO_LIBTPU = importlib.util.find_spec('libtpu') is None
needs_libtpu = pytest.mark.skipif(
  NO_LIBTPU, reason="libtpu is not installed: pip install -e '.[tpu-plan]' (CI must install it)"
)


def _tiny_config(arch='vgg_tiny'):
  c = synthetic.get_config('smoke')
  c.model.arch = arch
  c.model.large_feature_map = False
  c.input.resize_size = c.input.crop_size = c.input.eval_size = 32
  c.eval.methods = ('cam',)
  return c


@pytest.fixture(scope='module')
def mesh():
  return compiled.topology_mesh('v5e:2x2')


@needs_libtpu
def test_train_steps_per_image_flops_constant_and_memory_grows(mesh):
  """FLOPs per step are a fixed part (the optimizer update, batch-free) plus a part per image:
  the per-image part is the same, within 1%, between per-chip batches 8 -> 16 and 16 -> 32; the
  HBM footprint grows with the batch. The dual step: positive, growing with the batch.

  Below 8 images per chip the TPU program pads the batch (measured for vgg_tiny at 32 px on
  v5e:2x2: 36.7, 36.1 and 29.9 MFLOP per image at 2, 4 and 8 per chip; the marginal cost from 8
  to 16 and from 16 to 32 was 29.61 MFLOP per image both times), so the test starts at 8."""
  assert mesh.devices.size == 4
  c = _tiny_config()
  a, b, d = (compiled.compile_step(c, 'vanilla', mesh, n) for n in (8, 16, 32))
  for cost in (a, b, d):
    assert cost.flops > 0 and cost.bytes_accessed > 0
    assert cost.argument > 0 and cost.hbm > 0
  per_image_small = (b.flops - a.flops) / 8
  per_image_big = (d.flops - b.flops) / 16
  assert per_image_small > 0
  assert per_image_big == pytest.approx(per_image_small, rel=0.01)
  assert a.hbm < b.hbm < d.hbm
  small, big = (compiled.compile_step(c, 'dual', mesh, n) for n in (8, 16))
  assert 0 < small.flops < big.flops and 0 < small.hbm < big.hbm


@needs_libtpu
def test_eval_step_compiles(mesh):
  cost = compiled.compile_step(_tiny_config(), 'eval', mesh, 2)
  assert cost.flops > 0 and cost.hbm > 0


def _fake(hbm_per_image, fixed):
  def measure(b):
    return compiled.StepCost('vanilla', b, fixed + hbm_per_image * b, 0, 0, 0, 1e9 * b, 1e6 * b)

  return measure


def test_largest_batch_search():
  m = _fake(hbm_per_image=100, fixed=1000)
  # 1000 + 100 b <= 10000 -> b <= 90 -> 88 (multiple of 8), found in 3 compiles.
  best, seen = compiled.largest_batch(m, 10_000, start=m(8), max_compiles=3)
  assert best == 88 and len(seen) == 3
  best, _ = compiled.largest_batch(m, 1050, start=m(8), max_compiles=4)
  assert best is None  # not even 8 per chip fits
  # The line through two compiles alone (--max_compiles 2): the same 88, and 8 at the least.
  assert compiled.linear_fit_batch(m(8), m(16), 10_000) == 88
  assert compiled.linear_fit_batch(m(16), m(8), 10_000) == 88
  assert compiled.linear_fit_batch(m(8), m(16), 1050) == 8
  with pytest.raises(ValueError, match='different batches'):
    compiled.linear_fit_batch(m(8), m(8), 10_000)


def test_roofline_and_stage_hours():
  chip = chips.CHIPS['v5e']
  cost = compiled.StepCost('vanilla', 32, 1, 1, 1, 0, flops=32 * 197e9, bytes_accessed=1.0)
  img_s, bound = estimate.roofline(cost, chip)
  assert bound == 'compute' and img_s == pytest.approx(1000.0)  # 197 GFLOP/img at 197 TFLOP/s
  c = synthetic.get_config()
  steps, sec = estimate.stage_seconds(c, 'vanilla', 64, 640.0)
  assert steps == 8 * (3000 // 64) and sec == pytest.approx(steps * 64 / 640.0)
  assert estimate.workers_per_host(1000.0, 4, 150.0) == 27


def test_without_libtpu_one_line(monkeypatch, capsys):
  def no_libtpu(_):
    raise compiled.NoLibtpuError(f'the pod plan needs libtpu: {compiled.INSTALL_HINT}')

  monkeypatch.setattr(compiled, 'topology_mesh', no_libtpu)
  rc = plan_main.main(['--config', 'configs/synthetic.py:smoke', '--topology', 'v5e:2x2'])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and 'tpu-plan' in err[0]


def test_unknown_topology_generation(capsys):
  rc = plan_main.main(['--config', 'configs/synthetic.py:smoke', '--topology', 'v9x:2x2'])
  assert rc == 2 and 'valid' in capsys.readouterr().err


def test_times_are_printed_in_a_readable_unit():
  # An ImageNet-val pass at roofline takes seconds: it printed as '0.0 min'.
  assert plan_main._fmt_h(2.07) == '2 s'
  assert plan_main._fmt_h(90) == '1.5 min'
  assert plan_main._fmt_h(7200) == '2.00 h'
