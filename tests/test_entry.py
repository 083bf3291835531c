"""The entry points on a machine without data: one message listing every missing input, before
JAX starts; a mistyped override is one line naming the field and the closest valid names."""

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=ROOT, timeout=120):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  return subprocess.run(
    [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
  )


def test_imagenet_without_data_lists_everything_before_jax(tmp_path):
  t0 = time.perf_counter()
  r = _run(
    os.path.join(ROOT, 'train.py'),
    f'--config={ROOT}/configs/imagenet.py',
    f'--workdir={tmp_path}/run',
    cwd=str(tmp_path),
  )
  elapsed = time.perf_counter() - t0
  assert r.returncode == 2, r.stderr
  err = r.stderr
  assert 'provide the following (3)' in err, err
  assert 'input.data_root' in err
  assert 'make_metadata' in err and '--dataset_name ILSVRC --split train' in err
  assert 'python -m dualsig_jax.convert --arch vgg16' in err and 'dual.init_checkpoint' in err
  assert 'Traceback' not in err
  assert elapsed < 5.0, f'{elapsed:.1f} s'
  assert not os.path.exists(tmp_path / 'run')  # nothing written


def test_preflight_imports_no_jax():
  code = (
    'import sys, importlib.util; sys.path.insert(0, {!r});'
    'from dualsig_jax import entry, preflight;'
    "spec = importlib.util.spec_from_file_location('c', {!r});"
    'm = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);'
    'print(preflight.problems(m.get_config(), None));'
    "print('jax' in sys.modules, 'grain' in sys.modules)"
  ).format(ROOT, os.path.join(ROOT, 'configs', 'imagenet.py'))
  r = _run('-c', code)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip().splitlines()[-1] == 'False False'


def test_unknown_override_is_one_line_with_suggestions(tmp_path):
  r = _run(
    'train.py',
    '--config=configs/synthetic.py:smoke',
    f'--workdir={tmp_path}/w',
    '--config.dual.lrr=0.1',
  )
  assert r.returncode == 2
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1, r.stderr
  assert "no field 'dual.lrr'" in lines[0] and 'dual.lr' in lines[0]


def test_old_section_name_points_at_the_new_one(tmp_path):
  r = _run(
    'train.py',
    '--config=configs/synthetic.py:smoke',
    f'--workdir={tmp_path}/w',
    '--config.optim.lr=0.1',
  )
  assert r.returncode == 2
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and 'dual.lr' in lines[0], r.stderr


def test_out_of_range_value_is_one_line(tmp_path):
  r = _run(
    'train.py',
    '--config=configs/synthetic.py:smoke',
    f'--workdir={tmp_path}/w',
    '--config.dual.weight_decay=-1',
  )
  assert r.returncode == 2
  assert r.stderr.strip() == (
    'error: config.dual.weight_decay=-1.0 is out of range (must be >= 0.0 and <= 1.0)'
  )


def test_eval_without_a_trained_workdir_says_so(tmp_path):
  r = _run('eval.py', '--config=configs/synthetic.py:smoke', f'--workdir={tmp_path}/none')
  assert r.returncode == 2
  assert 'has no dual-stage checkpoint' in r.stderr and 'Traceback' not in r.stderr


def test_evaluation_does_not_import_the_training_loop():
  """eval.py's library reads models and weights through train/stage.py and
  train/checkpoints.py; the step loop (and what only training needs) stays out."""
  code = (
    f'import sys; sys.path.insert(0, {ROOT!r}); import dualsig_jax.evaluate;'
    "print('dualsig_jax.train.loop' in sys.modules, 'dualsig_jax.experiment' in sys.modules)"
  )
  r = _run('-c', code)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip().splitlines()[-1] == 'False False'


def _train_8_devices(tmp_path, *overrides):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  args = [
    'train.py',
    '--config=configs/synthetic.py:smoke',
    f'--workdir={tmp_path}/w',
    f'--config.input.data_root={tmp_path}/data',
    f'--config.input.metadata_root={tmp_path}/data/metadata',
    *overrides,
  ]
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
  )


def test_a_batch_that_does_not_split_over_the_devices_is_one_line(tmp_path):
  r = _train_8_devices(tmp_path, '--config.input.batch_size=36')
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip() == (
    'error: config.input.batch_size=36 does not split over the 8 devices of this run; pick a '
    'multiple of 8'
  )
  assert not (tmp_path / 'data').exists()


def test_a_second_run_on_a_held_workdir_is_one_line(tmp_path):
  import socket

  from dualsig_jax import workdir

  with workdir.locked(str(tmp_path / 'w')):
    r = _train_8_devices(tmp_path)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: another run holds'), r.stderr
  assert f'pid {os.getpid()} on host {socket.gethostname()}' in lines[0]
