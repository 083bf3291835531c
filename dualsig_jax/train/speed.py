"""How fast the step loop runs, measured on the host without waiting on the device, and the
optional jax.profiler trace of a range of steps.

The loop dispatches steps asynchronously and reads a device value only at a log step (the
loss), so the wall time between two log steps, over the steps in between, is the step time
once the device is the bottleneck. The first step is compiled ahead of time
(`jit.lower().compile()`): its compile time is logged once on its own, kept out of every
window, and the compiled program's `cost_analysis()` gives the FLOPs of one step on one device
for MFU against the chip's published peak (`plan.chips`; no peak, e.g. a CPU: no MFU field).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import jax

from dualsig_jax import defaults
from dualsig_jax.plan import chips

log = logging.getLogger('dualsig_jax')

# The timing fields of a training record (they differ between two runs of the same steps).
SPEED_FIELDS = ('images_per_s', 'images_per_s_per_device', 'step_time_s', 'mfu')


class Speed:
  """Throughput fields of the training log (`fields()` at each log step).

  global_batch: images per step over all devices; devices: how many share it.
  """

  def __init__(self, global_batch: int, devices: list):
    self.global_batch = global_batch
    self.devices = len(devices)
    self.chip = chips.chip_for_kind(devices[0].device_kind)
    self.flops_per_step = None  # one device's program, one step (cost_analysis)
    self.compile_s = None
    self._t0, self._steps = time.perf_counter(), 0

  def compile(self, jitted, *args):
    """`jitted` compiled for `args` (timed: the compile record); returns the executable."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    self.compile_s = time.perf_counter() - t0
    try:
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      self.flops_per_step = float(cost['flops']) if cost and cost.get('flops') else None
    except Exception:  # a backend without cost analysis: no MFU, nothing else lost
      self.flops_per_step = None
    self.restart()
    return compiled

  def compile_record(self) -> dict:
    """The once-per-stage record of the first step's compile."""
    rec = {'event': 'compile', 'compile_s': self.compile_s}
    if self.flops_per_step is not None:
      rec['flops_per_step_per_device'] = self.flops_per_step
    return rec

  def restart(self) -> None:
    """Starts a new timing window now (after the compile, or after a pause such as a save)."""
    self._t0, self._steps = time.perf_counter(), 0

  def step(self) -> None:
    self._steps += 1

  def fields(self) -> dict:
    """Speed over the steps since the last call; call after a device value was read (the
    device has then finished those steps). Starts the next window."""
    dt = max(time.perf_counter() - self._t0, 1e-9)
    n = max(self._steps, 1)
    step_s = dt / n
    out = {
      'images_per_s': self.global_batch * n / dt,
      'images_per_s_per_device': self.global_batch * n / dt / self.devices,
      'step_time_s': step_s,
    }
    if self.chip is not None and self.flops_per_step:
      out['mfu'] = self.flops_per_step / step_s / self.chip.bf16_flops
    self.restart()
    return out


class Profile:
  """A jax.profiler trace of steps `config.profile_steps` ('a,b') of one stage, written to
  `<workdir>/profile/<stage>` (process 0 only)."""

  def __init__(self, config, workdir: str, stage: str):
    rng = defaults.profile_range(config.profile_steps)
    self.first, self.last = rng if rng else (0, -1)
    self.dir = os.path.join(workdir, 'profile', stage)
    self.on = rng is not None and jax.process_index() == 0
    self.active = False

  def before(self, step: int) -> None:
    """Call before running (1-based) step `step`."""
    if self.on and not self.active and self.first <= step <= self.last:
      os.makedirs(self.dir, exist_ok=True)
      jax.profiler.start_trace(self.dir)
      self.active = True

  def after(self, step: int, outputs) -> None:
    """Call after dispatching step `step` with its outputs; ends the trace after the last."""
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)  # the traced steps finish inside the trace
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      log.info('profile of steps %d-%d written to %s', self.first, self.last, self.dir)


# Tests set this to e.g. `lambda: jax.transfer_guard_device_to_host('disallow_explicit')` to
# show that the steps between two log (or save) steps read nothing back from the device.
BETWEEN_LOGS_GUARD = None


def between_logs(step: int, total: int, config):
  """The guard around (1-based) step `step` when it is neither a log nor a save step, else a
  no-op context."""
  edge = (
    step % config.log_every_steps == 0 or step % config.checkpoint.every_steps == 0 or step == total
  )
  if BETWEEN_LOGS_GUARD is None or edge:
    return contextlib.nullcontext()
  return BETWEEN_LOGS_GUARD()
