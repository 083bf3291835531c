"""Evaluation outputs: results.json, the paper-style markdown table and the plots."""

from __future__ import annotations

import json
import os

import numpy as np

from dualsig_jax import cam, paper, vocab
from dualsig_jax.wsol import plots as wsol_plots

BRANCHES = vocab.BRANCHES


def _fmt(v):
  return '–' if v is None else f'{v:.2f}'


def results_table(results: dict) -> str:
  """Markdown table laid out like the paper's Table 2 (plus fidelity), with a delta row."""
  cls = results['classification']
  cols = METRIC_COLUMNS
  lines = [
    '| Method | Head | Top-1 Cls | ' + ' | '.join(c for c, _ in cols) + ' |',
    '|---|---|---|' + '---|' * len(cols),
  ]
  for m, heads in results['methods'].items():
    base, ours = heads['softmax'], heads['sigmoid']
    lines.append(
      f'| {m} | softmax (baseline) | {_fmt(cls["softmax_top1"])} | '
      + ' | '.join(_fmt(base.get(k)) for _, k in cols)
      + ' |'
    )
    lines.append(
      f'| {m} | sigmoid (ours) | – | ' + ' | '.join(_fmt(ours.get(k)) for _, k in cols) + ' |'
    )
    delta = [None if base.get(k) is None else ours[k] - base[k] for _, k in cols]
    lines.append(
      f'| {m} | Δ (ours − baseline) | | '
      + ' | '.join('–' if d is None else f'{d:+.2f}' for d in delta)
      + ' |'
    )
  vanilla = cls.get('vanilla_softmax_top1')
  note = (
    f'\nTop-1 Cls of the softmax head: dual model {cls["softmax_top1"]:.2f}'
    + ('' if vanilla is None else f', vanilla checkpoint {vanilla:.2f}')
    + f'; sigmoid head (for information) {cls["sigmoid_top1"]:.2f}. '
    f'{results["num_images"]} images of split "{results["split"]}".\n'
  )
  return '\n'.join(lines) + '\n' + note


# Metric columns of results.md (after Top-1 Cls): (title, results key), in the paper's order.
METRIC_COLUMNS = (
  ('Top-1 Loc', 'top1_loc'),
  ('GT-known Loc', 'gt_known_loc'),
  ('MaxBoxAccV2', 'maxboxacc_v2'),
  ('PxAP', 'pxap'),
  ('Avg Drop ↓', 'avg_drop'),
  ('Inc Conf ↑', 'inc_conf'),
)
# Metrics the paper publishes, with the names used here.
PAPER_METRICS = (('Top-1 Cls', 'top1_cls'), *METRIC_COLUMNS)


def paper_comparison(results: dict, dataset: str, arch: str, family: str) -> dict:
  """The run's numbers beside the paper's published ones, per method.

  Returns `{method: {'source': str, 'rows': [{'head', 'metric', 'ours', 'paper', 'diff'}]}}`
  for methods with a published row, and `{method: {'source': None, 'why': str}}` otherwise.
  """
  out = {}
  for m, heads in results['methods'].items():
    row, why = paper.lookup(dataset, arch, family, m)
    if row is None:
      out[m] = {'source': None, 'why': why}
      continue
    rows = []
    for head in BRANCHES:
      ours_all = dict(heads[head])
      if head == 'softmax':
        ours_all['top1_cls'] = results['classification']['softmax_top1']
      for _, key in PAPER_METRICS:
        if key in row[head] and ours_all.get(key) is not None:
          ours, pub = float(ours_all[key]), float(row[head][key])
          rows.append(dict(head=head, metric=key, ours=ours, paper=pub, diff=ours - pub))
    out[m] = {'source': why, 'rows': rows}
  return out


def paper_table(comparison: dict) -> str:
  """Markdown: ours, paper (PyTorch) and ours − paper for every published metric."""
  names = dict((k, n) for n, k in PAPER_METRICS)
  lines = ['## Beside the paper', '']
  for m, c in comparison.items():
    if c['source'] is None:
      lines.append(f'- {m}: {c["why"]}.')
      continue
    if not c['rows']:
      lines.append(f'- {m}: {c["source"]} publishes no metric this run computed.')
      continue
    lines += [
      f'{m} ({c["source"]}):',
      '',
      '| Head | Metric | ours | paper (PyTorch) | ours − paper |',
      '|---|---|---|---|---|',
    ]
    head_name = {'softmax': 'softmax (baseline)', 'sigmoid': 'sigmoid (ours)'}
    for r in c['rows']:
      lines.append(
        f'| {head_name[r["head"]]} | {names[r["metric"]]} | {r["ours"]:.2f} | '
        f'{r["paper"]:.2f} | {r["diff"]:+.2f} |'
      )
    lines.append('')
  return '\n'.join(lines) + '\n'


def write_outputs(config, workdir: str, results: dict, curves: dict, plots) -> None:
  """Writes `<workdir>/results.json`, `results.md` and `plots/` (call on one process).

  `curves[(method, branch)]` = (box metrics | None, mask metrics | None); `plots` holds the
  CAM grid's images: `.image` list of `[S, S, 3]`, `.boxes`, `.title`, `.maps['<m>/<b>']`.
  """
  os.makedirs(workdir, exist_ok=True)
  m = config.model
  if 'paper' not in results:  # evaluate() adds it on every process; a caller's own results
    results = {
      **results,
      'paper': paper_comparison(results, config.input.dataset_name, m.arch, m.family),
    }
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  table = results_table(results)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(f'# {config.experiment}: {m.arch} on {config.input.dataset_name}\n\n')
    f.write(table)
    f.write('\n' + paper_table(results['paper']))
  print(table)
  plot_dir = os.path.join(workdir, 'plots')
  os.makedirs(plot_dir, exist_ok=True)
  for m in config.eval.methods:
    boxes = {b: curves[(m, b)][0] for b in BRANCHES if curves[(m, b)][0] is not None}
    masks = {b: curves[(m, b)][1] for b in BRANCHES if curves[(m, b)][1] is not None}
    if boxes:
      wsol_plots.plot_box_curves(
        boxes,
        os.path.join(plot_dir, f'boxacc_{m}.png'),
        title=f'{m}: box accuracy vs CAM threshold',
      )
    if masks:
      wsol_plots.plot_pr_curves(
        masks, os.path.join(plot_dir, f'pxap_pr_{m}.png'), title=f'{m}: pixel precision-recall'
      )
    if plots.image:
      cam.save_cam_grid(
        os.path.join(plot_dir, f'cams_{m}.png'),
        np.stack(plots.image),
        np.stack(plots.maps[f'{m}/softmax']),
        np.stack(plots.maps[f'{m}/sigmoid']),
        gt_boxes=plots.boxes,
        threshold=config.eval.loc_threshold,
        titles=plots.title,
      )
