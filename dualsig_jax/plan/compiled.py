"""The project's steps compiled ahead of time for a TPU slice, on a machine without one.

`jax.experimental.topologies.get_topology_desc` (with the `libtpu` wheel installed) gives the
slice's devices; a `Mesh` over them makes `jax.jit(...).lower(...).compile()` produce the real
TPU executable, whose `memory_analysis()` (per-chip argument / temporary / output bytes) and
`cost_analysis()` (FLOPs and bytes accessed of the per-chip SPMD program) are read here. The
steps are the ones train.py and eval.py run, with their shardings: `loop.jit_train_step` for
the vanilla and dual stages, evaluate's batch function (forward of both heads, the maps of
every configured method, the confidence changes) for eval.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

STEPS = ('vanilla', 'dual', 'eval')
INSTALL_HINT = "pip install -e '.[tpu-plan]' (the libtpu wheel that matches the installed jax)"


class NoLibtpuError(RuntimeError):
  """libtpu is not installed, so no TPU topology can be described."""


def topology_mesh(topology: str) -> jax.sharding.Mesh:
  """A 1-D 'data' mesh over every chip of the TPU slice `topology` ('v5e:4x4').

  Raises NoLibtpuError (how to install) without libtpu, ValueError for an unknown topology."""
  from jax.experimental import topologies

  from dualsig_jax.train import sharding

  # Only compiling: several plans (or a plan and its test) may hold libtpu at once.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    import libtpu  # noqa: F401  (only its presence is checked)
  except ImportError as e:
    raise NoLibtpuError(f'the pod plan needs libtpu: {INSTALL_HINT}') from e
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform='tpu')
  except Exception as e:  # libtpu's own error text names the problem
    raise ValueError(f'cannot describe TPU topology {topology!r}: {e}'.splitlines()[0]) from e
  return jax.sharding.Mesh(np.asarray(desc.devices), (sharding.DATA_AXIS,))


@dataclasses.dataclass(frozen=True)
class StepCost:
  """What XLA reports for one compiled step, per chip, at `per_chip_batch` images per chip.

  Bytes: `argument`, `temp`, `output`, `alias` (outputs that reuse donated arguments);
  `hbm` = argument + temp + output - alias, the step's peak HBM footprint on a chip.
  `flops`, `bytes_accessed`: of the per-chip program, one step. Per image they include the
  step's batch-free part (the optimizer update) spread over the batch, so at a small batch
  they are a little higher than the marginal cost of one more image.
  """

  step: str
  per_chip_batch: int
  argument: int
  temp: int
  output: int
  alias: int
  flops: float
  bytes_accessed: float

  @property
  def hbm(self) -> int:
    return self.argument + self.temp + self.output - self.alias

  @property
  def flops_per_image(self) -> float:
    return self.flops / self.per_chip_batch

  @property
  def bytes_per_image(self) -> float:
    return self.bytes_accessed / self.per_chip_batch


def _sds(tree, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _abstract_variables(model) -> dict:
  """{'params', 'batch_stats'} of `model` as shapes only (nothing initialised; the same
  shapes as stage.fresh_variables, whose numpy initialisers cannot be traced)."""
  from dualsig_jax import models

  size = models.init_input_size(model)
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
  )
  return {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}


def _lower_train(config: ml_collections.ConfigDict, stage: str, mesh, global_batch: int):
  """The stage's train step lowered for `mesh` at `global_batch` (abstract arrays only)."""
  from dualsig_jax.train import loop, optim, sharding
  from dualsig_jax.train import stage as stage_lib
  from dualsig_jax.train.state import create_state

  model = stage_lib.build_stage_model(config, stage)
  variables = _abstract_variables(model)
  settings = stage_lib.stage_settings(config, stage)
  tx, _, _ = optim.make_optimizer(
    variables['params'],
    arch=config.model.arch,
    stage=stage,
    optim_cfg=settings.section,
    steps_per_epoch=1000,  # the schedule's numbers do not change the program
    unfreeze=settings.unfreeze,
    family=config.model.family,
    global_batch=global_batch,
  )
  state = jax.eval_shape(functools.partial(create_state, tx=tx, seed=config.seed), variables)
  size = config.input.crop_size
  batch = {
    'image': jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32),
    'label': jax.ShapeDtypeStruct((global_batch,), jnp.int32),
  }
  fn = loop.jit_train_step(config, stage, model, tx, mesh)
  return fn.lower(_sds(state, sharding.replicated(mesh)), _sds(batch, sharding.data_sharded(mesh)))


def _lower_eval(config: ml_collections.ConfigDict, mesh, global_batch: int):
  """evaluate's per-batch function (both heads, vanilla Top-1 forward, every method's maps
  and confidence changes) lowered for `mesh` at `global_batch`."""
  from dualsig_jax import evaluate
  from dualsig_jax.train import sharding
  from dualsig_jax.train import stage as stage_lib

  model = stage_lib.build_stage_model(config, 'dual')
  variables = _sds(_abstract_variables(model), sharding.replicated(mesh))
  size = config.input.eval_size
  data = sharding.data_sharded(mesh)
  images = jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32, sharding=data)
  labels = jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=data)
  fn = evaluate.make_batch_fn(model, config, mesh)
  # The vanilla classifier's forward (eval's Top-1 of the vanilla stage) is included.
  return fn.lower(variables, variables, images, labels)


def compile_step(
  config: ml_collections.ConfigDict, step: str, mesh, per_chip_batch: int
) -> StepCost:
  """Compiles `step` ('vanilla' | 'dual' | 'eval') for `mesh` at `per_chip_batch` images per
  chip (global batch = per_chip_batch x chips) and returns its per-chip costs."""
  if step not in STEPS:
    raise ValueError(f'unknown step {step!r}; valid: {list(STEPS)}')
  global_batch = per_chip_batch * mesh.devices.size
  if step == 'eval':
    lowered = _lower_eval(config, mesh, global_batch)
  else:
    lowered = _lower_train(config, step, mesh, global_batch)
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per program
  return StepCost(
    step=step,
    per_chip_batch=per_chip_batch,
    argument=int(mem.argument_size_in_bytes),
    temp=int(mem.temp_size_in_bytes),
    output=int(mem.output_size_in_bytes),
    alias=int(mem.alias_size_in_bytes),
    flops=float(cost.get('flops', 0.0)),
    bytes_accessed=float(cost.get('bytes accessed', 0.0)),
  )


def linear_fit_batch(a: StepCost, b: StepCost, hbm_bytes: int, multiple: int = 8) -> int:
  """The largest per-chip batch (a multiple of `multiple`, at least `multiple`) that the line
  through the HBM footprints of two compiles `a` and `b` of one step puts within `hbm_bytes`:
  a prediction, exact only as far as HBM is linear in the batch (XLA's buffer assignment is
  close to it, not exactly). 4x the larger batch when the footprint does not grow."""
  if a.per_chip_batch == b.per_chip_batch:
    raise ValueError('two compiles at different batches are needed for a line')
  slope = (b.hbm - a.hbm) / (b.per_chip_batch - a.per_chip_batch)
  fixed = a.hbm - slope * a.per_chip_batch
  guess = (
    int((hbm_bytes - fixed) / slope) if slope > 0 else 4 * max(a.per_chip_batch, b.per_chip_batch)
  )
  return max(multiple, guess // multiple * multiple)


def largest_batch(
  measure, hbm_bytes: int, *, start: StepCost, multiple: int = 8, max_compiles: int = 4
) -> tuple[int | None, list[StepCost]]:
  """The largest per-chip batch (a multiple of `multiple`) whose step fits `hbm_bytes`.

  Cheap: HBM is close to linear in the batch, so a second compile at 2x `start`'s batch
  gives the slope, the line predicts the largest fitting batch, and at most `max_compiles`
  compiles in all (bisecting between the largest fitting and the smallest failing batch
  seen) refine it. `measure(per_chip_batch) -> StepCost` compiles one step.
  Returns (largest fitting batch found, or None if even `multiple` does not fit; the costs
  compiled on the way).
  """
  seen = {start.per_chip_batch: start}
  second = measure(2 * start.per_chip_batch)
  seen[second.per_chip_batch] = second
  guess = linear_fit_batch(start, second, hbm_bytes, multiple)
  for _ in range(max_compiles - 2):
    fit = [b for b, c in seen.items() if c.hbm <= hbm_bytes]
    over = [b for b, c in seen.items() if c.hbm > hbm_bytes]
    lo, hi = max(fit, default=0), min(over, default=None)
    if hi is not None and hi - lo <= multiple:
      break
    if guess in seen or guess <= lo or (hi is not None and guess >= hi):
      guess = (lo + hi) // 2 // multiple * multiple if hi is not None else 2 * lo
    if guess in seen or guess <= 0:
      break
    seen[guess] = measure(guess)
  fit = [b for b, c in seen.items() if c.hbm <= hbm_bytes]
  return (max(fit) if fit else None), sorted(seen.values(), key=lambda c: c.per_chip_batch)
