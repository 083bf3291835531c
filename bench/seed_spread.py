"""The synthetic main job over several seeds (and optionally XLA's AVX2 code path): mean and
min-max of every column of results.md, so the README states a spread, not one run (not a test),
and the 90% prediction interval of one new run, mean ± t(0.95, n-1)·s·sqrt(1 + 1/n) (s: the
sample standard deviation over the n seeds; needs n >= 2).

Each run is `python train.py --config configs/synthetic.py --workdir <out>/<isa>_seed<S>
--config.seed=S`; finished runs are reused (the command resumes), so the script can be stopped
and started again. A delta whose min-max range spans zero is reported as no difference.

`--set input.batch_size=512 --set vanilla.warmup_epochs=1` passes config overrides to every run
(give each setting its own `--out`: finished runs there are reused as they are). `{seed}` in
an override is the run's seed, e.g. the dual stage alone from each seed's vanilla checkpoint:
`--set stages="('dual',)" --set dual.init_checkpoint=runs/seeds/native_seed{seed}` (a vanilla run's workdir).

Usage: python bench/seed_spread.py [--seeds 0 1 2] [--isa native AVX2] [--out runs/seeds]
       [--set FIELD=VALUE ...] [--markdown spread.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import numpy as np
from scipy import stats

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


def run(seed: int, isa: str, out: str, overrides=()) -> dict:
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
      *(f'--config.{o.replace("{seed}", str(seed))}' for o in overrides),
    ]
    print('+', ' '.join(cmd), f'(XLA_FLAGS={env.get("XLA_FLAGS", "")})', flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
  with open(results) as f:
    return json.load(f)


def prediction_interval(v: np.ndarray, level: float = 0.90) -> tuple[float, float]:
  """Two-sided `level` prediction interval of one new run from the n runs `v` [n]
  (Student t, normal runs assumed): mean ± t((1 + level) / 2, n - 1)·s·sqrt(1 + 1/n)."""
  n = len(v)
  if n < 2:
    return float('nan'), float('nan')
  half = stats.t.ppf((1 + level) / 2, n - 1) * v.std(ddof=1) * np.sqrt(1 + 1 / n)
  return float(v.mean() - half), float(v.mean() + half)


def _cell(v: np.ndarray, delta: bool) -> str:
  lo, hi = prediction_interval(v)
  sign = '+' if delta else ''
  text = f'{v.mean():{sign}.2f} ({v.min():{sign}.2f} – {v.max():{sign}.2f})'
  # One run has no spread to predict from: no interval rather than '[nan, nan]'.
  text += '' if np.isnan(lo) else f' [{lo:{sign}.2f}, {hi:{sign}.2f}]'
  if delta:
    text += ' ≈ 0' if v.min() <= 0 <= v.max() else ''
  return text


def table(runs: list[dict]) -> str:
  """results.md's layout with 'mean (min – max) [90% prediction interval]' cells; a delta
  whose min-max range spans zero is marked '≈ 0' (no difference)."""
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
  p.add_argument(
    '--set',
    dest='overrides',
    action='append',
    default=[],
    metavar='FIELD=VALUE',
    help='config override for every run (--config.FIELD=VALUE; {seed}: the seed), repeatable',
  )
  a = p.parse_args()
  import jax  # only for the versions line

  header = (
    f'CPU: {cpu_name()}, {os.cpu_count()} cores; python {platform.python_version()}, '
    f'jax {jax.__version__}; seeds {a.seeds}; overrides {a.overrides or "none"}; cells: mean '
    '(min – max) [90% prediction interval of one new run]'
  )
  parts = [header]
  all_runs = []
  for isa in a.isa:
    runs = [run(s, isa, a.out, a.overrides) for s in a.seeds]
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
