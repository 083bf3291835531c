"""The synthetic main job over several seeds (and optionally XLA's AVX2 code path): mean and
min-max of every column of results.md, so the README states a spread, not one run (not a test).

Each run is `python train.py --config configs/synthetic.py --workdir <out>/<isa>_seed<S>
--config.seed=S`; finished runs are reused (the command resumes), so the script can be stopped
and started again. A delta whose min-max range spans zero is reported as no difference.

Usage: python bench/seed_spread.py [--seeds 0 1 2] [--isa native AVX2] [--out runs/seeds]
       [--markdown spread.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = (
  ('Top-1 Loc', 'top1_loc'),
  ('GT-known Loc', 'gt_known_loc'),
  ('MaxBoxAccV2', 'maxboxacc_v2'),
  ('PxAP', 'pxap'),
  ('Avg Drop ↓', 'avg_drop'),
  ('Inc Conf ↑', 'inc_conf'),
)


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def run(seed: int, isa: str, out: str) -> dict:
  workdir = os.path.join(out, f'{isa}_seed{seed}')
  results = os.path.join(workdir, 'results.json')
  if not os.path.exists(results):
    env = dict(os.environ)
    if isa != 'native':
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + f' --xla_cpu_max_isa={isa}').strip()
    cmd = [
      sys.executable,
      'train.py',
      '--config',
      'configs/synthetic.py',
      '--workdir',
      workdir,
      f'--config.seed={seed}',
    ]
    print('+', ' '.join(cmd), f'(XLA_FLAGS={env.get("XLA_FLAGS", "")})', flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
  with open(results) as f:
    return json.load(f)


def rows_of(results: dict) -> dict:
  """{(method, column): value} of one run, deltas included."""
  out = {('', 'Top-1 Cls'): results['classification']['softmax_top1']}
  for m, heads in results['methods'].items():
    for name, key in METRICS:
      base, ours = heads['softmax'].get(key), heads['sigmoid'].get(key)
      if base is None:
        continue
      out[(m, f'{name} softmax')] = base
      out[(m, f'{name} sigmoid')] = ours
      out[(m, f'{name} Δ')] = ours - base
  return out


def table(runs: list[dict]) -> str:
  per_run = [rows_of(r) for r in runs]
  lines = [
    '| method | column | mean | min – max | note |',
    '|---|---|---|---|---|',
  ]
  for key in per_run[0]:
    v = np.asarray([r[key] for r in per_run])
    note = ''
    if key[1].endswith('Δ'):
      note = 'no difference (range spans 0)' if v.min() <= 0 <= v.max() else 'same sign in all'
    lines.append(
      f'| {key[0] or "–"} | {key[1]} | {v.mean():+.2f} | {v.min():+.2f} – {v.max():+.2f} | {note} |'
      if key[1].endswith('Δ')
      else f'| {key[0] or "–"} | {key[1]} | {v.mean():.2f} | {v.min():.2f} – {v.max():.2f} | |'
    )
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--isa', nargs='+', default=['native'], help="'native' and/or e.g. AVX2")
  p.add_argument('--out', default=os.path.join(ROOT, 'runs', 'seeds'))
  p.add_argument('--markdown', default=None, help='also write the tables here')
  a = p.parse_args()
  import jax  # only for the versions line

  header = (
    f'CPU: {cpu_name()}, {os.cpu_count()} cores; python {platform.python_version()}, '
    f'jax {jax.__version__}; seeds {a.seeds}'
  )
  parts = [header]
  all_runs = []
  for isa in a.isa:
    runs = [run(s, isa, a.out) for s in a.seeds]
    all_runs += runs
    parts.append(f'\n### XLA CPU code path: {isa} ({len(runs)} seeds)\n\n' + table(runs))
  if len(a.isa) > 1:
    parts.append(f'\n### All {len(all_runs)} runs together\n\n' + table(all_runs))
  text = '\n'.join(parts) + '\n'
  print(text)
  if a.markdown:
    with open(a.markdown, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
