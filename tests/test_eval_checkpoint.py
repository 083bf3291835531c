"""A dual-branch checkpoint saved as the reference's main.py saves it (a `.pth.tar` holding
`{'state_dict': ...}` with `fc` and `fc2`), converted with the converter's CLI and evaluated with
`eval.py --checkpoint`, gives the torch model's Top-1 and the torch path's CAM score maps."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
import torch_models  # noqa: E402  (bench/, on sys.path from conftest)
from test_cam import np_pipeline  # noqa: E402  (the reference's raw map -> score map path)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from xla_flags import with_device_count  # noqa: E402

from configs import synthetic  # noqa: E402

K = 10
NUM_TEST = 12
EVAL_SIZE = 64
# The smoke experiment's model: resnet_tiny (ResNet-CAM structure) with large_feature_map.
OVERRIDES = [
  '--config.input.synthetic.num_train=4',
  '--config.input.synthetic.num_val=2',
  f'--config.input.synthetic.num_test={NUM_TEST}',
  '--config.input.synthetic.seed=5',
  f'--config.input.eval_size={EVAL_SIZE}',
  '--config.input.num_workers=0',
  '--config.eval.batch_size=4',
  "--config.eval.methods=('cam',)",
  '--config.eval.save_scoremaps=True',
  '--config.eval.num_plot_images=2',
]


def _env():
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', XLA_FLAGS=with_device_count(2))


def _run(args, cwd):
  r = subprocess.run(
    [sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600
  )
  return r


@pytest.fixture(scope='module')
def reference_checkpoint(tmp_path_factory):
  """The torch mirror of the reference's ResNet-CAM with non-trivial weights, saved in the
  reference's layout."""
  root = tmp_path_factory.mktemp('ref_ckpt')
  torch.manual_seed(0)
  model = torch_models.build_torch_model('resnet_tiny', K, large_feature_map=True)
  torch_models.randomize_(model, seed=1)
  with torch.no_grad():  # distinct heads: fc2 is not a copy of fc
    model.fc2.weight.copy_(0.3 * torch.randn(model.fc2.weight.shape))
  path = root / 'resnet_tiny_best.pth.tar'
  torch.save({'state_dict': model.state_dict(), 'epoch': 3, 'architecture': 'resnet_tiny'}, path)
  return root, model, path


def test_eval_py_evaluates_a_converted_reference_checkpoint(reference_checkpoint):
  root, model, pth = reference_checkpoint
  converted = root / 'converted'
  r = _run(
    [
      '-m',
      'dualsig_jax.convert',
      '--arch',
      'resnet_tiny',
      '--num_classes',
      str(K),
      '--large_feature_map',
      '--torch_checkpoint',
      str(pth),
      '--output',
      str(converted),
    ],
    ROOT,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  data_root, workdir = root / 'data', root / 'eval'
  r = _run(
    [
      'eval.py',
      '--config',
      'configs/synthetic.py:smoke',
      '--workdir',
      str(workdir),
      '--checkpoint',
      str(converted),
      f'--config.input.data_root={data_root}',
      f'--config.input.metadata_root={data_root / "metadata"}',
      *OVERRIDES,
    ],
    ROOT,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads((workdir / 'results.json').read_text())
  assert results['checkpoints']['dual']['path'] == str(converted)
  assert results['num_images'] == NUM_TEST

  # The torch path on the very images eval.py read (the project's loader; its resize and
  # normalisation are checked against the reference's elsewhere).
  from dualsig_jax import data

  config = synthetic.get_config('smoke')
  config.unlock()
  config.input.data_root = str(data_root)
  config.input.metadata_root = str(data_root / 'metadata')
  config.input.eval_size = EVAL_SIZE
  config.input.num_workers = 0
  config.input.synthetic.generate = False  # read the set eval.py read, never regenerate it
  loader = data.make_eval_loader(config.input, 'test', batch_size=NUM_TEST)
  batch = next(iter(loader))
  images = np.asarray(batch['image'])
  labels = torch.from_numpy(np.asarray(batch['label']).astype(np.int64))
  with torch.no_grad():
    out = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  top1 = 100.0 * (out['logits'].argmax(1) == labels).double().mean().item()
  assert results['classification']['softmax_top1'] == pytest.approx(top1, abs=1e-9)

  a = out['features'].numpy()
  worst = 0.0
  for branch, head in (('softmax', model.fc), ('sigmoid', model.fc2)):
    w = head.weight.detach().numpy()[labels.numpy()]
    if branch == 'sigmoid':  # the sigmoid head's maps clamp negative weights (the method)
      w = np.maximum(w, 0)
    want = np_pipeline('cam', (w[:, :, None, None] * a).mean(1), (EVAL_SIZE, EVAL_SIZE))
    for i in np.flatnonzero(np.asarray(batch['valid'])):
      image_id = loader.metadata.image_ids[int(batch['index'][i])]
      got = np.load(workdir / 'scoremaps' / f'cam_{branch}' / f'{image_id}.npy')
      np.testing.assert_allclose(got, want[i], atol=1e-5, err_msg=f'{branch} {image_id}')
      worst = max(worst, float(np.abs(got - want[i]).max()))
  print(f'worst |map difference| over {NUM_TEST} images x 2 heads: {worst:.2e}')


def test_eval_py_refuses_a_missing_or_single_head_checkpoint(tmp_path, reference_checkpoint):
  r = _run(
    [
      'eval.py',
      '--config',
      'configs/synthetic.py:smoke',
      '--workdir',
      str(tmp_path / 'w'),
      '--checkpoint',
      str(tmp_path / 'nowhere'),
    ],
    ROOT,
  )
  assert r.returncode == 2
  assert 'nowhere does not exist' in r.stderr and 'Traceback' not in r.stderr
