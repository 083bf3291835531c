"""The pod plan: a config's steps compiled for a TPU slice on this machine, and what they imply.

    python -m dualsig_jax.plan --config configs/imagenet.py:resnet50 --topology v5e:4x4 \
        [--per_chip_batch 32] [--dtype bfloat16] [--steps vanilla,dual,eval] [--json out.json]

Needs libtpu (`pip install -e '.[tpu-plan]'`), not a TPU. Prints per step and chip the HBM
footprint against the chip's HBM, FLOPs and bytes per image, the roofline images/s and the
largest per-chip batch that fits; per run, the hours of each stage and of an eval pass, and the
loader workers per host. These are compiled-program estimates, not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # the host compiles; no TPU is opened
# Several plans (or a plan and its test) may describe topologies at once: only compiling.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m dualsig_jax.plan', description=__doc__.split('\n')[0])
  p.add_argument(
    '--config', required=True, help='config file[:arg], e.g. configs/imagenet.py:vgg16'
  )
  p.add_argument('--topology', required=True, help="TPU slice, e.g. 'v5e:4x4', 'v4:2x2x2'")
  p.add_argument('--per_chip_batch', type=int, default=32, help='images per chip compiled first')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), help='model.dtype override')
  p.add_argument('--steps', default='vanilla,dual,eval', help='subset of vanilla,dual,eval')
  p.add_argument(
    '--max_compiles', type=int, default=3, help='compiles per step for the largest batch (>= 1)'
  )
  p.add_argument('--worker_img_s', type=float, help='one loader worker, images/s (see estimate.py)')
  p.add_argument('--json', help='also write the results here')
  return p.parse_args(argv)


def _fmt_h(seconds: float) -> str:
  if seconds >= 360:
    return f'{seconds / 3600:.2f} h'
  return f'{seconds / 60:.1f} min' if seconds >= 60 else f'{seconds:.0f} s'


def main(argv=None) -> int:
  a = parse_args(argv)
  from dualsig_jax import entry
  from dualsig_jax.plan import chips, compiled, estimate

  try:
    chip = chips.chip_for_topology(a.topology)
    steps = [s for s in a.steps.split(',') if s]
    bad = [s for s in steps if s not in compiled.STEPS]
    if bad:
      raise ValueError(f'unknown steps {bad}; valid: {list(compiled.STEPS)}')
    if a.per_chip_batch < 1 or a.max_compiles < 1:
      raise ValueError('--per_chip_batch and --max_compiles must be >= 1')
    config = entry._load_config_file(a.config)
    if a.dtype:
      config.model.dtype = a.dtype  # this tool's own copy of the config
    mesh = compiled.topology_mesh(a.topology)
  except (compiled.NoLibtpuError, ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  worker_img_s = a.worker_img_s or estimate.DEFAULT_WORKER_IMG_S
  n = mesh.devices.size
  hosts = len({d.process_index for d in mesh.devices.flat})
  print(
    f'Pod plan: {a.config} (model.dtype={config.model.dtype}) on {a.topology}: {n} chips '
    f'({chip.name}: {chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bw / 1e9:.0f} GB/s, '
    f'{chip.hbm_bytes / GIB:.0f} GiB HBM), {hosts} hosts'
  )
  print(
    'ESTIMATES from the compiled TPU program (XLA memory_analysis / cost_analysis) and published '
    'peaks, not measurements. On a device, bench/bench_accelerator.py measures the real '
    'images/s of vanilla_step, dual_step and cam/gradcam (compare them with "roofline img/s").'
  )
  rows = []
  for step in steps:
    t0 = time.perf_counter()
    measure = lambda b, step=step: compiled.compile_step(config, step, mesh, b)  # noqa: E731
    first = measure(a.per_chip_batch)
    largest, seen = None, [first]
    if a.max_compiles >= 2:
      largest, seen = compiled.largest_batch(
        measure, chip.hbm_bytes, start=first, max_compiles=a.max_compiles
      )
    img_s, bound = estimate.roofline(first, chip)
    best = max(
      (c for c in seen if c.hbm <= chip.hbm_bytes), key=lambda c: c.per_chip_batch, default=None
    )
    # The line through the first two compiles: with --max_compiles 2 the only estimate of the
    # largest batch, named as a prediction (the search above compiles to confirm it).
    predicted = (
      compiled.linear_fit_batch(seen[0], seen[1], chip.hbm_bytes) if len(seen) >= 2 else None
    )
    row = dict(
      step=step,
      per_chip_batch=first.per_chip_batch,
      hbm_args_gib=first.argument / GIB,
      hbm_temp_gib=first.temp / GIB,
      hbm_out_gib=first.output / GIB,
      hbm_gib=first.hbm / GIB,
      fits=first.hbm <= chip.hbm_bytes,
      gflop_per_image=first.flops_per_image / 1e9,
      mb_per_image=first.bytes_per_image / 1e6,
      roofline_img_s_per_chip=img_s,
      bound=bound,
      largest_per_chip_batch=largest,
      predicted_largest_per_chip_batch=predicted,
      largest_roofline_img_s_per_chip=estimate.roofline(best, chip)[0] if best else None,
      compiled=[
        dict(batch=c.per_chip_batch, hbm_gib=c.hbm / GIB, gflop=c.flops / 1e9) for c in seen
      ],
      compile_s=time.perf_counter() - t0,
    )
    rows.append(row)
    print(
      f'[{step}] per-chip batch {row["per_chip_batch"]}: HBM {row["hbm_gib"]:.2f} GiB '
      f'(args {row["hbm_args_gib"]:.2f} + temp {row["hbm_temp_gib"]:.2f} + out '
      f'{row["hbm_out_gib"]:.2f} - aliased) of {chip.hbm_bytes / GIB:.0f}: '
      f'{"fits" if row["fits"] else "DOES NOT FIT"}; {row["gflop_per_image"]:.2f} GFLOP and '
      f'{row["mb_per_image"]:.1f} MB per image; roofline {img_s:.0f} img/s/chip ({bound}-bound); '
      f'largest compiled per-chip batch that fits {largest if largest else "n/a"}'
      f'{"" if a.max_compiles >= 2 else " (not searched: --max_compiles 1)"}'
      f'{f", linear-fit prediction {predicted} (not compiled)" if predicted else ""} '
      f'[{len(seen)} compiles, {row["compile_s"]:.0f} s]',
      flush=True,
    )
  by = {r['step']: r for r in rows}
  run = {}
  for scale, key, label in (
    ('first', 'roofline_img_s_per_chip', 'per_chip_batch'),
    ('largest', 'largest_roofline_img_s_per_chip', 'largest_per_chip_batch'),
  ):
    for stage in (s for s in ('vanilla', 'dual') if s in by and by[s][key]):
      b = by[stage][label] * n
      steps_n, sec = estimate.stage_seconds(config, stage, b, by[stage][key] * n)
      workers = estimate.workers_per_host(by[stage][key], n // hosts, worker_img_s)
      run[f'{stage}@{scale}'] = dict(global_batch=b, steps=steps_n, seconds=sec, workers=workers)
      print(
        f'[run] stage {stage} at global batch {b} ({scale} batch): {steps_n} steps, '
        f'~{_fmt_h(sec)} at roofline; {workers} loader workers per host at '
        f'{worker_img_s:.0f} img/s per worker'
      )
    if 'eval' in by and by['eval'][key]:
      images = estimate.split_images(config, config.input.eval_split) or 50_000
      sec = images / (by['eval'][key] * n)
      workers = estimate.workers_per_host(by['eval'][key], n // hosts, worker_img_s)
      run[f'eval@{scale}'] = dict(images=images, seconds=sec, workers=workers)
      print(
        f'[run] eval of {images} images ({config.input.eval_split}; ImageNet val: 50000) at '
        f'per-chip batch {by["eval"][label]}: ~{_fmt_h(sec)} at roofline, device side only '
        f'(the WSOL evaluators run on the hosts); {workers} loader workers per host'
      )
  if a.json:
    with open(a.json, 'w') as f:
      json.dump(
        dict(
          config=a.config,
          topology=a.topology,
          chips=n,
          hosts=hosts,
          chip=chip.name,
          dtype=config.model.dtype,
          steps=rows,
          run=run,
          estimates=True,
        ),
        f,
        indent=1,
      )
  return 0


if __name__ == '__main__':
  sys.exit(main())
