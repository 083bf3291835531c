"""results.md / results.json put the paper's published numbers beside a run's."""

import json
import types

import pytest

from dualsig_jax import paper, report
from dualsig_jax.defaults import dataset_config


def _fake_results(methods):
  """An ImageNet-sized result: 50,000 images of the test split, every metric present."""
  head = dict(
    top1_loc=45.0,
    gt_known_loc=61.0,
    maxboxacc_v2=61.5,
    maxboxacc=60.0,
    maxboxacc_v1=59.0,
    avg_drop=30.0,
    inc_conf=12.0,
  )
  return {
    'classification': {'softmax_top1': 67.0, 'sigmoid_top1': 60.0, 'vanilla_softmax_top1': 67.0},
    'num_images': 50000,
    'split': 'test',
    'methods': {m: {'softmax': dict(head), 'sigmoid': {**head, 'top1_loc': 46.0}} for m in methods},
  }


def test_imagenet_vgg16_cam_run_gets_paper_columns(tmp_path):
  config = dataset_config('configs/imagenet.py', 'vgg16', dataset_name='ILSVRC', num_classes=1000)
  config.unlock()
  config.eval.methods = ('cam', 'gradcam')
  results = _fake_results(config.eval.methods)
  curves = {(m, b): (None, None) for m in config.eval.methods for b in ('softmax', 'sigmoid')}
  plots = types.SimpleNamespace(image=[], maps={}, boxes=[], title=[])
  report.write_outputs(config, str(tmp_path), results, curves, plots)

  md = (tmp_path / 'results.md').read_text()
  assert '| Head | Metric | ours | paper (PyTorch) | ours − paper |' in md
  # CAM on the CAM family: Table 2's VGG16 row (Top-1 Cls 66.56, sigmoid Top-1 Loc 43.13).
  assert '| softmax (baseline) | Top-1 Cls | 67.00 | 66.56 | +0.44 |' in md
  assert '| sigmoid (ours) | Top-1 Loc | 46.00 | 43.13 | +2.87 |' in md
  assert '| sigmoid (ours) | MaxBoxAccV2 | 61.50 | 60.25 | +1.25 |' in md
  # The paper's Grad-CAM rows come from the standard family: this CAM-family run has none.
  assert "gradcam rows for vgg16 use family 'standard'" in md
  saved = json.loads((tmp_path / 'results.json').read_text())
  rows = {(r['head'], r['metric']): r for r in saved['paper']['cam']['rows']}
  assert rows[('softmax', 'top1_loc')]['paper'] == 43.11
  assert rows[('softmax', 'top1_loc')]['diff'] == pytest.approx(45.0 - 43.11)
  assert 'Table 2' in saved['paper']['cam']['source']
  assert saved['paper']['gradcam']['source'] is None


def test_fidelity_rows_and_unmatched_runs():
  row, why = paper.lookup('CUB', 'resnet50', 'standard', 'layercam')
  assert row['sigmoid'] == {'avg_drop': 19.07, 'inc_conf': 13.22} and 'Table 1' in why
  cmp = report.paper_comparison(_fake_results(['layercam']), 'CUB', 'resnet50', 'standard')
  got = {(r['head'], r['metric']): r['paper'] for r in cmp['layercam']['rows']}
  assert got == {
    ('softmax', 'avg_drop'): 43.69,
    ('softmax', 'inc_conf'): 13.91,
    ('sigmoid', 'avg_drop'): 19.07,
    ('sigmoid', 'inc_conf'): 13.22,
  }
  none = report.paper_comparison(_fake_results(['cam']), 'SYNTH', 'resnet_tiny', 'cam')
  assert none['cam']['source'] is None and 'no published row' in none['cam']['why']
  assert 'no published row' in report.paper_table(none)


def test_every_published_row_names_known_vocabulary():
  from dualsig_jax import vocab

  assert len(paper.PUBLISHED) == 6 + 6 + 20
  for dataset, arch, method in paper.PUBLISHED:
    assert dataset in ('ILSVRC', 'OpenImages', 'CUB', 'CARS')
    assert arch in vocab.PAPER_ARCHS and method in vocab.CAM_METHODS
