"""Evaluation outputs: results.json, the paper-style markdown table and the plots."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np

from dualsig_jax import cam, paper, vocab
from dualsig_jax.train import resume
from dualsig_jax.wsol import plots as wsol_plots

BRANCHES = vocab.BRANCHES

# Config fields that change neither the numbers nor the plots of an evaluation (where the same
# data lives, how it is batched, the train side), left out of its settings record.
_NOT_SHAPING = (
  'eval.force',
  'eval.batch_size',
  'eval.save_scoremaps',
  'input.batch_size',
  'input.num_workers',
  'input.train_split',
  'input.eval_split',  # recorded as the evaluated `split`
  'input.augment',
  'input.resize_size',
  'input.crop_size',
  'input.data_root',
  'input.mask_root',
  'input.metadata_root',
)
_SHAPING_SECTIONS = ('eval.', 'input.', 'model.')


def _settings_of(values: dict, split: str, checkpoint: str | None) -> dict:
  out = {
    k: v for k, v in values.items() if k.startswith(_SHAPING_SECTIONS) and k not in _NOT_SHAPING
  }
  out.update(split=split, checkpoint=None if checkpoint is None else os.path.abspath(checkpoint))
  return json.loads(json.dumps(out, sort_keys=True))  # tuples as the lists JSON reads back


def evaluation_settings(config, split: str, checkpoint: str | None = None) -> dict:
  """Every setting that shapes an evaluation's results (split, methods, thresholds, model,
  eval input, the checkpoint folder named by eval.py --checkpoint or None), as JSON values.
  Stored in results.json (`settings`) and compared before saved results are reused."""
  return _settings_of(resume.config_values(config), split, checkpoint)


@dataclasses.dataclass(frozen=True)
class OutputNames:
  """Where one evaluation writes: `<stem>.json`, `<stem>.md` and the plots folder."""

  stem: str  # 'results' for the run's own settings, else 'results-<split>-<methods>-<hash>'
  plots: str  # 'plots', or 'plots/<tag>' next to a tagged stem
  settings: dict


def output_names(config, workdir: str, split: str, checkpoint: str | None = None) -> OutputNames:
  """The file names for evaluating `workdir` with these settings, so that evaluations with
  different settings never overwrite each other.

  The run's own settings (those of `<workdir>/config.json` on its eval split, its own dual
  checkpoints) keep `results.json` / `results.md` / `plots/`; any other setting gets
  `results-<split>-<methods>-<hash8>.*` and `plots/<same tag>/`. A workdir without a readable
  config.json (eval.py --checkpoint into a new folder) uses the plain names unless a
  results.json of other settings is already there."""
  settings = evaluation_settings(config, split, checkpoint)
  own = resume.saved_values(workdir)
  if own is not None:
    run_split = own.get('input.eval_split', split)
    plain = settings == _settings_of(own, run_split, None)
  else:
    prior = _recorded_settings(os.path.join(workdir, 'results.json'))
    plain = prior is None or prior == settings
  if plain:
    return OutputNames('results', 'plots', settings)
  tag = _tag(settings)
  return OutputNames(f'results-{tag}', os.path.join('plots', tag), settings)


def _tag(settings: dict) -> str:
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
  methods = '+'.join(settings.get('eval.methods') or ['none'])
  return f'{settings["split"]}-{methods}-{digest}'


def _recorded_settings(path: str) -> dict | None:
  """The `settings` a results file records; {} for one without (older runs), None if absent."""
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return None
  return saved.get('settings', {}) if isinstance(saved, dict) else {}


def _keep_other_settings(workdir: str, names: OutputNames) -> None:
  """Before results.json is written: one of other settings (or of unknown ones, from an older
  version) is renamed to its own tagged name rather than overwritten."""
  path = os.path.join(workdir, names.stem + '.json')
  prior = _recorded_settings(path)
  if prior is None or prior == names.settings:
    return
  tag = _tag(prior) if prior else f'earlier-{time.strftime("%Y%m%d-%H%M%S")}'
  for ext in ('.json', '.md'):
    old = os.path.join(workdir, names.stem + ext)
    if os.path.exists(old):
      os.replace(old, os.path.join(workdir, f'results-{tag}{ext}'))


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


def write_outputs(
  config, workdir: str, results: dict, curves: dict, plots, names: OutputNames | None = None
) -> None:
  """Writes `<workdir>/<names.stem>.json` / `.md` and `<names.plots>/` (call on one process).

  `curves[(method, branch)]` = (box metrics | None, mask metrics | None); `plots` holds the
  CAM grid's images: `.image` list of `[S, S, 3]`, `.boxes`, `.title`, `.maps['<m>/<b>']`.
  `names`: from `output_names` (default: the plain names for the results' own split). A
  results.json of other settings already there is renamed to its tagged name, never lost.
  """
  os.makedirs(workdir, exist_ok=True)
  if names is None:
    names = output_names(config, workdir, results['split'])
  m = config.model
  if 'paper' not in results:  # evaluate() adds it on every process; a caller's own results
    results = {
      **results,
      'paper': paper_comparison(results, config.input.dataset_name, m.arch, m.family),
    }
  results = {**results, 'settings': names.settings}
  if names.stem == 'results':
    _keep_other_settings(workdir, names)
  _write_text(os.path.join(workdir, names.stem + '.json'), json.dumps(results, indent=2))
  table = results_table(results)
  _write_text(
    os.path.join(workdir, names.stem + '.md'),
    f'# {config.experiment}: {m.arch} on {config.input.dataset_name}\n\n'
    + table
    + '\n'
    + paper_table(results['paper']),
  )
  print(table)
  plot_dir = os.path.join(workdir, names.plots)
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
        method=m,
      )


def _write_text(path: str, text: str) -> None:
  """Whole or not at all: a full disk leaves the previous file, not half of a new one."""
  tmp = path + '.tmp'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(tmp, path)
  except OSError:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
