"""The converter's command line speaks in one line (issue 17, section 4 and appendix item 10):
user errors print one line and exit 2 without a traceback, unreadable files and non-finite
weights are refused by name, and save_variables writes the CLI's conversion.json record."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dualsig_jax import convert, models

K = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny_npz(tmp_path_factory):
  """A resnet_tiny (cam, 3 classes) state dict as numpy arrays in an .npz file."""
  variables = models.init_variables(models.build_model('resnet_tiny', K), 0)
  sd = convert.flax_to_torch(variables, 'resnet_tiny', as_numpy=True)
  path = tmp_path_factory.mktemp('sd') / 'tiny.npz'
  np.savez(path, **sd)
  return path, sd


def _cli_error(capsys, argv) -> str:
  with pytest.raises(SystemExit) as e:
    convert.cli(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  return lines[0]


def test_usage_names_the_module(capsys):
  with pytest.raises(SystemExit):
    convert.cli(['--help'])
  assert capsys.readouterr().out.startswith('usage: python -m dualsig_jax.convert ')


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, tiny_npz):
  src, sd = tiny_npz
  out = tmp_path / 'out'
  args = ['--arch', 'resnet_tiny', '--torch_checkpoint', str(src), '--output', str(out)]
  assert convert.cli(args) == 0
  capsys.readouterr()
  assert '--overwrite' in _cli_error(capsys, args)
  bad = tmp_path / 'bad.npz'
  np.savez(bad, **(sd | {'layer1.0.conv2.weight': np.zeros((8, 8, 1, 1), np.float32)}))
  line = _cli_error(capsys, ['--arch', 'resnet_tiny', '--torch_checkpoint', str(bad),
                             '--output', str(tmp_path / 'o2')])  # fmt: skip
  assert "'layer1.0.conv2.weight'" in line and 'shape' in line
  line = _cli_error(capsys, ['--arch', 'resnet9', '--torch_checkpoint', str(src),
                             '--output', str(tmp_path / 'o3')])  # fmt: skip
  assert 'resnet9' in line and 'resnet_tiny' in line


def test_unreadable_files_are_one_line_naming_the_file(tmp_path, capsys):
  noise = tmp_path / 'noise.pth'
  noise.write_bytes(np.random.RandomState(3).bytes(4096))
  renamed = tmp_path / 'array.npz'
  with open(renamed, 'wb') as f:
    np.save(f, np.zeros(3, np.float32))  # an .npy file under an .npz name
  for path in (noise, renamed):
    with pytest.raises(ValueError, match=str(path)):
      convert.load_state_dict(str(path))
    line = _cli_error(capsys, ['--arch', 'resnet_tiny', '--torch_checkpoint', str(path),
                               '--output', str(tmp_path / 'o')])  # fmt: skip
    assert str(path) in line


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_the_key(tiny_npz, bad):
  _, sd = tiny_npz
  w = sd['layer2.0.bn1.running_var'].copy()
  w[1] = bad
  with pytest.raises(ValueError, match=r"'layer2\.0\.bn1\.running_var'.*(nan|inf)"):
    convert.torch_to_flax(sd | {'layer2.0.bn1.running_var': w}, 'resnet_tiny')


def test_save_variables_writes_the_record_of_the_cli(tmp_path, tiny_npz):
  src, sd = tiny_npz
  cli_out = tmp_path / 'cli'
  assert convert.cli(['--arch', 'resnet_tiny', '--torch_checkpoint', str(src),
                      '--output', str(cli_out)]) == 0  # fmt: skip
  py_out = tmp_path / 'py'
  convert.save_variables(convert.torch_to_flax(sd, 'resnet_tiny'), str(py_out), arch='resnet_tiny')
  want = ('arch', 'family', 'num_classes', 'large_feature_map')
  cli = json.loads((cli_out / 'conversion.json').read_text())
  py = json.loads((py_out / 'conversion.json').read_text())
  assert {k: py[k] for k in want} == {k: cli[k] for k in want}
  assert convert.read_checkpoint_info(str(py_out))['num_classes'] == K
  # The record cannot lie: variables of another model are refused, and the arch is required.
  with pytest.raises(ValueError, match='vgg_tiny'):
    convert.save_variables(
      convert.load_variables(str(py_out)), str(tmp_path / 'x'), arch='vgg_tiny'
    )
  with pytest.raises(ValueError, match='arch'):
    convert.save_variables(convert.load_variables(str(py_out)), str(tmp_path / 'y'))


def test_module_entry_point_exits_2_with_one_line(tmp_path):
  noise = tmp_path / 'noise.pth'
  noise.write_bytes(b'not a checkpoint at all')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run(
    [sys.executable, '-m', 'dualsig_jax.convert', '--arch', 'resnet_tiny',
     '--torch_checkpoint', str(noise), '--output', str(tmp_path / 'o')],
    capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
  )  # fmt: skip
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == [r.stderr.strip()] and str(noise) in r.stderr
