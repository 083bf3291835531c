"""What a run refuses or repairs before any work, without training: incomplete config records,
the workdir lock (eval.py too, liveness from the flock), a read-only workdir, a user's .lock
file in a generated set. Quick: no step runs here."""

import json
import os
import subprocess
import sys

import pytest
import smoke_helpers
from smoke_helpers import ROOT, smoke_config

from dualsig_jax import experiment, workdir
from dualsig_jax.train import resume

smoke_data = smoke_helpers.smoke_data


def _workdir_with_recorded_step(tmp_path, config):
  """config.json and a checkpoint step whose record holds the config (as the loop saves it)."""
  wd = tmp_path / 'run'
  resume.check_and_write_config(config, str(wd))
  meta = wd / 'vanilla' / 'checkpoints' / '4' / 'meta'
  meta.mkdir(parents=True)
  (meta / 'metadata').write_text(json.dumps({'config': resume.config_values(config)}))
  return wd


@pytest.mark.parametrize(
  'record',
  [
    {},
    {'experiment': 'synthetic_smoke'},
    'drop vanilla',
    'drop vanilla.lr and dual.weight_decay',
  ],
)
def test_an_incomplete_config_record_is_completed_from_the_checkpoint(tmp_path, record):
  """config.json that parses but lacks fields: the checkpoint's copy guards the resume, so a
  changed lr and weight decay are refused (not let through with a warning)."""
  config = smoke_config(tmp_path / 'data')
  wd = _workdir_with_recorded_step(tmp_path, config)
  saved = json.loads((wd / 'config.json').read_text())
  if record == 'drop vanilla':
    del saved['vanilla']
    record = saved
  elif isinstance(record, str):
    del saved['vanilla']['lr'], saved['dual']['weight_decay']
    record = saved
  (wd / 'config.json').write_text(json.dumps(record))
  changed = smoke_config(tmp_path / 'data', **{'vanilla.lr': 0.1, 'dual.weight_decay': 0.5})
  with pytest.raises(resume.ConfigChangedError, match='vanilla.lr: 0.05 -> 0.1') as e:
    resume.check_and_write_config(changed, str(wd), write=False)
  assert 'dual.weight_decay: 0.0001 -> 0.5' in str(e.value)
  # The same config resumes, and the record is made whole again.
  resume.check_and_write_config(config, str(wd))
  assert resume.saved_values(str(wd)) == resume.config_values(config)


def test_an_empty_record_without_a_checkpoint_copy_is_refused(tmp_path):
  config = smoke_config(tmp_path / 'data')
  wd = tmp_path / 'run'
  resume.check_and_write_config(config, str(wd))
  (wd / 'vanilla' / 'checkpoints' / '4').mkdir(parents=True)
  for record in ({}, {'model': {'arch': 'resnet_tiny'}}):
    (wd / 'config.json').write_text(json.dumps(record))
    with pytest.raises(resume.ConfigChangedError, match='cannot be checked'):
      resume.check_and_write_config(config, str(wd), write=False)


def _hold_lock(wd):
  """A child process holding workdir.locked(wd) until killed; returns it once it holds."""
  code = (
    'import sys, time; sys.path.insert(0, sys.argv[2]); from dualsig_jax import workdir\n'
    'with workdir.locked(sys.argv[1]):\n  print("locked", flush=True); time.sleep(120)\n'
  )
  p = subprocess.Popen([sys.executable, '-c', code, wd, ROOT], stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == 'locked'
  return p


@pytest.mark.parametrize('damage', ['removed', 'emptied', 'replaced by a folder'])
def test_a_live_lock_holds_when_its_file_is_removed(tmp_path, damage):
  """`.run.lock` removed (or emptied, or replaced) by hand while a run is active: a second run
  is still refused, naming the live holder's pid, and deletes none of its temporaries."""
  wd = str(tmp_path / 'run')
  tmp = tmp_path / 'run' / 'vanilla' / 'checkpoints' / '8.orbax-checkpoint-tmp-1733100000'
  p = _hold_lock(wd)
  try:
    tmp.mkdir(parents=True)
    lock = os.path.join(wd, workdir.LOCK_FILE)
    os.remove(lock)
    if damage == 'emptied':
      open(lock, 'w').close()
    elif damage == 'replaced by a folder':
      os.mkdir(lock)
    with pytest.raises(workdir.WorkdirBusyError, match=f'pid {p.pid}'):
      experiment.run(smoke_config(tmp_path / 'data'), wd, evaluate=False)
    assert tmp.is_dir(), "the live run's unfinished save was deleted"
  finally:
    p.kill()
    p.wait()
  if damage == 'replaced by a folder':
    os.rmdir(os.path.join(wd, workdir.LOCK_FILE))
  with workdir.locked(wd):  # the holder died: the next run takes it
    pass


def _eval_cmd(wd, data):
  return [
    sys.executable,
    os.path.join(ROOT, 'eval.py'),
    f'--config={os.path.join(ROOT, "configs", "synthetic.py")}:smoke',
    f'--workdir={wd}',
    f'--config.input.data_root={data}',
    f'--config.input.metadata_root={os.path.join(str(data), "metadata")}',
  ]


def _train_cmd(wd, data):
  return [
    os.path.join(ROOT, 'train.py') if a.endswith('eval.py') else a for a in _eval_cmd(wd, data)
  ]


def test_eval_py_takes_the_workdir_lock(tmp_path):
  """eval.py on a workdir that train.py holds refuses in one line naming the holder's pid,
  before reading any checkpoint or writing any result."""
  wd = tmp_path / 'run'
  (wd / 'dual' / 'checkpoints').mkdir(parents=True)
  p = _hold_lock(str(wd))
  try:
    r = subprocess.run(
      _eval_cmd(wd, tmp_path / 'data'), capture_output=True, text=True, cwd=ROOT, timeout=300
    )
  finally:
    p.kill()
    p.wait()
  assert r.returncode == 2, r.stderr[-2000:]
  assert f'pid {p.pid}' in r.stderr and 'Traceback' not in r.stderr
  assert sorted(os.listdir(wd)) == ['.run.lock', 'dual']


def _make_read_only(path):
  """chmod for a user; root ignores modes, so chattr +i (an immutable folder) for root."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    return lambda: os.chmod(path, 0o755)
  r = subprocess.run(['chattr', '+i', str(path)], capture_output=True)
  if r.returncode != 0:
    pytest.skip(f'cannot make a folder read-only as root here: {r.stderr!r}')
  return lambda: subprocess.run(['chattr', '-i', str(path)], check=True)


@pytest.mark.parametrize('entry', ['train.py', 'eval.py'])
def test_a_read_only_workdir_is_one_line_before_any_work(tmp_path, entry):
  wd = tmp_path / 'run'
  (wd / 'dual' / 'checkpoints').mkdir(parents=True)
  undo = _make_read_only(wd)
  try:
    cmd = (
      _eval_cmd(wd, tmp_path / 'data') if entry == 'eval.py' else _train_cmd(wd, tmp_path / 'data')
    )
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  finally:
    undo()
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and 'is not writable' in lines[0] and 'another --workdir' in lines[0]
  assert not (tmp_path / 'data').exists(), 'work started before the check'


def _one_line(r):
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in r.stderr, (
    r.stderr[-3000:]
  )
  return lines[0]


def test_eval_split_typo_in_train_py_is_one_line(tmp_path):
  from dualsig_jax import preflight
  from dualsig_jax.data import synthetic

  assert preflight.SYNTH_SPLITS == synthetic.SPLITS
  for field in ('eval_split', 'train_split'):
    cmd = _train_cmd(tmp_path / 'run', tmp_path / 'data') + [f'--config.input.{field}=tset']
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert f"input.{field}='tset' is not a split" in r.stderr and 'valid: train, val, test' in (
      r.stderr
    )
    assert not (tmp_path / 'data').exists()


def test_refused_regeneration_through_train_py_is_one_line(tmp_path):
  """The generator refuses a folder holding a user's files: train.py says so in one line and
  the files stay (variant: a user's non-empty `.lock` in a generated set, which earlier
  versions counted as the generator's own and deleted)."""
  data = tmp_path / 'data'
  data.mkdir()
  (data / 'notes.txt').write_text('mine')
  line = _one_line(
    subprocess.run(
      _train_cmd(tmp_path / 'run', data), capture_output=True, text=True, cwd=ROOT, timeout=300
    )
  )
  assert 'not a complete generated SYNTH set' in line and 'notes.txt' in line
  assert (data / 'notes.txt').read_text() == 'mine'


def test_a_users_lock_file_in_a_generated_set_is_kept(tmp_path):
  from ml_collections import ConfigDict

  from dualsig_jax.data import synthetic

  syn = dict(num_classes=10, image_size=32, num_train=4, num_val=0, num_test=2, seed=7)
  cfg = ConfigDict(
    dict(dataset_name='SYNTH', data_root=str(tmp_path / 'd'), metadata_root='', synthetic=syn)
  )
  cfg.synthetic.generate = True
  synthetic.ensure_synthetic(cfg)
  (tmp_path / 'd' / '.lock').write_text('my notes')
  cfg.synthetic.seed = 8  # other parameters: the set would be replaced
  with pytest.raises(FileExistsError, match=r'\.lock'):
    synthetic.ensure_synthetic(cfg)
  assert (tmp_path / 'd' / '.lock').read_text() == 'my notes'
  (tmp_path / 'd' / '.lock').write_text('')  # an earlier version's empty flock file: replaced
  synthetic.ensure_synthetic(cfg)
  assert synthetic._marker(str(tmp_path / 'd'))['seed'] == 8


def _run_one_line(capsys, fn):
  """Runs `fn` under the entry points' error handling; returns its one stderr line."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    with experiment.one_line_errors():
      fn()
  assert e.value.code == 2
  err = capsys.readouterr().err  # (progress bars also write to stderr)
  lines = [x for x in err.splitlines() if x.startswith('error')]
  assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
  return lines[0]


@pytest.mark.parametrize('where', ['manifest', 'orbax'])
def test_a_full_disk_during_a_save_is_one_line_and_loses_nothing(
  smoke_data, tmp_path, capsys, monkeypatch, where
):
  """ENOSPC at the write of step 4 (in the checksum manifest, or inside Orbax's save, which
  wraps it): one line; step 2 stays complete, and the same command then resumes and finishes."""
  import errno

  from dualsig_jax.train import checkpoints

  config = smoke_config(
    smoke_data, **{'vanilla.max_steps': 4, 'checkpoint.every_steps': 2, 'checkpoint.max_to_keep': 3}
  )
  config.unlock()
  config.stages = ('vanilla',)
  wd = str(tmp_path / 'run')
  full = OSError(errno.ENOSPC, 'No space left on device', os.path.join(wd, 'x'))
  if where == 'manifest':
    real = checkpoints.write_manifest

    def write(path):
      if path.endswith('/4'):
        raise full
      real(path)

    monkeypatch.setattr(checkpoints, 'write_manifest', write)
  else:
    real = checkpoints.ocp.CheckpointManager.save

    def save(self, step, *a, **k):
      if step == 4:
        raise ValueError('tensorstore write failed') from full
      return real(self, step, *a, **k)

    monkeypatch.setattr(checkpoints.ocp.CheckpointManager, 'save', save)
  line = _run_one_line(capsys, lambda: experiment.run(config, wd, evaluate=False))
  assert 'disk is full' in line and 'run the same command again' in line
  assert smoke_helpers.checkpoint_steps(wd)[0] == 2
  if where == 'manifest':  # (once: the resume is the same for both)
    monkeypatch.undo()
    out = experiment.run(config, wd, evaluate=False)
    assert out['stages']['vanilla']['step'] == 4


@pytest.mark.parametrize('damage', ['truncated', 'missing'])
def test_a_bad_test_image_at_evaluation_is_one_line(smoke_data, tmp_path, capsys, damage):
  """A test image cut short or gone: one line naming the file and its metadata line, with
  the remedy; nothing is written."""
  import shutil

  from dualsig_jax import evaluate
  from dualsig_jax.train import stage as stage_lib

  data = tmp_path / 'data'
  shutil.copytree(smoke_data, data)
  config = smoke_config(data, **{'eval.max_batches': 1, 'eval.methods': ('cam',)})
  config.unlock()
  config.input.synthetic.generate = False
  first = (data / 'metadata' / 'SYNTH' / 'test' / 'image_ids.txt').read_text().split()[0]
  image = data / first
  if damage == 'missing':
    image.unlink()
  else:
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 3])
  variables = stage_lib.fresh_variables(config, stage_lib.build_stage_model(config, 'dual'))
  wd = tmp_path / 'eval'
  line = _run_one_line(capsys, lambda: evaluate.evaluate(config, str(wd), variables=variables))
  assert str(image) in line and 'image_ids.txt' in line and 'Restore the file' in line
  assert not wd.exists() or not [p for p in os.listdir(wd) if p.startswith('results')]


def test_an_arch_mismatch_names_every_field_with_a_remedy_that_works(tmp_path):
  """A vanilla checkpoint of vgg_tiny (small feature map) under the smoke config (resnet_tiny,
  large feature map): both fields in one message, and the overrides it names make the synthetic
  config fit (the earlier hint named a config argument the synthetic config refuses)."""
  import re

  from dualsig_jax import defaults
  from dualsig_jax.train import stage as stage_lib

  config = smoke_config(tmp_path / 'data')
  info = dict(arch='vgg_tiny', family='cam', num_classes=10, large_feature_map=False)
  with pytest.raises(ValueError) as e:
    stage_lib.check_source_matches(info, config, 'CKPT')
  msg = str(e.value)
  assert "model.arch='vgg_tiny'" in msg and 'model.large_feature_map=False' in msg
  fixed = smoke_config(tmp_path / 'data')
  overrides = re.findall(r'--config\.model\.(\w+)=(\S+)', msg)
  assert {k for k, _ in overrides} == {'arch', 'large_feature_map'}
  for key, text in overrides:
    fixed.model[key] = {'True': True, 'False': False}.get(text, text)
  defaults.validate(fixed)
  stage_lib.check_source_matches(info, fixed, 'CKPT')


@pytest.mark.parametrize('split', ['train', 'test'])
def test_labels_beyond_num_classes_are_one_line(smoke_data, tmp_path, capsys, split):
  """Labels up to 9 with model.num_classes=5 (variant: only the eval split's labels too large,
  train.py checks it before training too): one line naming class_labels.txt:line."""
  import shutil

  data = tmp_path / 'data'
  shutil.copytree(smoke_data, data)
  config = smoke_config(data, **{'model.num_classes': 10 if split == 'test' else 5})
  config.unlock()
  config.input.synthetic.generate = False
  if split == 'test':  # one label of the test split beyond the 10 classes
    labels = data / 'metadata' / 'SYNTH' / 'test' / 'class_labels.txt'
    lines = labels.read_text().splitlines()
    lines[3] = lines[3].rsplit(',', 1)[0] + ',12'
    labels.write_text('\n'.join(lines) + '\n')
  wd = tmp_path / 'run'
  line = _run_one_line(capsys, lambda: experiment.run(config, str(wd)))
  assert 'class_labels.txt:' in line
  assert ('model.num_classes' in line) if split == 'train' else ('fix the label' in line)
  assert not (wd / 'vanilla').exists(), 'training started'


def test_a_manifest_is_required_unless_a_kill_interrupted_its_write(tmp_path):
  """A step whose record holds the config and whose manifest was deleted is damaged; one killed
  between Orbax's rename and the manifest (its `.manifest-pending` mark is still there) is a
  complete step; a step from before the config record is read unverified, as before."""
  import numpy as np

  from dualsig_jax.train import checkpoints

  mgr = checkpoints.manager(str(tmp_path / 'c'), max_to_keep=3)
  checkpoints.save(mgr, 1, {'a': np.ones(3)}, None, {'config': {'seed': 0}})
  checkpoints.save(mgr, 2, {'a': np.ones(3)}, None, {'arch': 'x'})  # an older record
  assert not list((tmp_path / 'c').glob('*' + checkpoints.PENDING))
  for step in (1, 2):
    os.remove(tmp_path / 'c' / str(step) / checkpoints.MANIFEST)
  with pytest.raises(checkpoints.CheckpointCorruptError, match='manifest is missing'):
    checkpoints.check_files(str(tmp_path / 'c' / '1'), data=False)
  checkpoints.check_files(str(tmp_path / 'c' / '2'), data=False)
  (tmp_path / 'c' / ('1' + checkpoints.PENDING)).touch()
  checkpoints.check_files(str(tmp_path / 'c' / '1'), data=False)
