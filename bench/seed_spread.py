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

from dualsig_jax.report import METRIC_COLUMNS as METRICS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _cell(v: np.ndarray, delta: bool) -> str:
  if delta:
    text = f'{v.mean():+.2f} ({v.min():+.2f} – {v.max():+.2f})'
    return text + (' ≈ 0' if v.min() <= 0 <= v.max() else '')
  return f'{v.mean():.2f} ({v.min():.2f} – {v.max():.2f})'


def table(runs: list[dict]) -> str:
  """results.md's layout with 'mean (min – max)' cells; a delta whose range spans zero is
  marked '≈ 0' (no difference)."""
  cols = ['Top-1 Cls', *(name for name, _ in METRICS)]
  lines = ['| Method | Head | ' + ' | '.join(cols) + ' |', '|---|---|' + '---|' * len(cols)]
  top1 = np.asarray([r['classification']['softmax_top1'] for r in runs])
  for m in runs[0]['methods']:
    for head, label in (
      ('softmax', 'softmax (baseline)'),
      ('sigmoid', 'sigmoid (ours)'),
      ('Δ', 'Δ (ours − baseline)'),
    ):
      cells = [_cell(top1, False) if head == 'softmax' else '–']
      for _, key in METRICS:
        if runs[0]['methods'][m]['softmax'].get(key) is None:
          cells.append('–')
          continue
        base = np.asarray([r['methods'][m]['softmax'][key] for r in runs])
        ours = np.asarray([r['methods'][m]['sigmoid'][key] for r in runs])
        v = {'softmax': base, 'sigmoid': ours, 'Δ': ours - base}[head]
        cells.append(_cell(v, head == 'Δ'))
      lines.append(f'| {m} | {label} | ' + ' | '.join(cells) + ' |')
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
