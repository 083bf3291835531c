"""The whole synthetic pipeline at smoke size: train both stages, evaluate, check invariants.

One session-scoped run feeds most tests here (it is the expensive part); resume and bad-config
tests reuse its dataset and workdir.
"""

import json
import logging
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
import smoke_helpers
from smoke_helpers import ROOT, loss_steps, smoke_config, train_cmd

from dualsig_jax import data, experiment
from dualsig_jax.train import checkpoints, loop
from dualsig_jax.train import stage as stage_lib

smoke_data = smoke_helpers.smoke_data


@pytest.fixture(scope='session')
def smoke_run(smoke_data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  config = smoke_config(smoke_data)
  out = experiment.run(config, str(workdir))
  return config, str(workdir), out


def _latest(workdir, stage):
  """Variables of the newest checkpoint of a stage."""
  return checkpoints.restore_variables(stage_lib.checkpoint_dir(workdir, stage))[0]


def _same_tree(a, b):
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb))


def test_results_schema_and_invariants(smoke_run):
  config, workdir, out = smoke_run
  with open(os.path.join(workdir, 'results.json')) as f:
    res = json.load(f)
  assert res == json.loads(json.dumps(out['results']))
  cls = res['classification']
  # The paper's "no drop in classification": the softmax head is untouched by the dual stage.
  assert cls['vanilla_softmax_top1'] == cls['softmax_top1']
  assert 0.0 <= cls['sigmoid_top1'] <= 100.0
  assert set(res['methods']) == set(config.eval.methods)
  for method, heads in res['methods'].items():
    assert set(heads) == {'softmax', 'sigmoid'}
    for head, r in heads.items():
      for key in ('top1_loc', 'gt_known_loc', 'maxboxacc_v2', 'pxap', 'avg_drop', 'inc_conf'):
        assert 0.0 <= r[key] <= 100.0, (method, head, key, r[key])
      assert set(r['maxboxacc']) == {'30', '50', '70'}
      assert r['top1_loc'] <= r['gt_known_loc'] + 1e-9
  for name in ('results.md', 'config.json', 'metrics.jsonl'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  plots = os.listdir(os.path.join(workdir, 'plots'))
  for m in config.eval.methods:
    assert f'cams_{m}.png' in plots and f'boxacc_{m}.png' in plots and f'pxap_pr_{m}.png' in plots
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  steps = [r for r in records if 'loss' in r]
  assert {r['stage'] for r in steps} == {'vanilla', 'dual'}
  assert all(np.isfinite(r['loss']) and 'lr' in r for r in steps)


def test_dual_stage_keeps_backbone_fc_and_bn_bit_identical(smoke_run):
  _, workdir, _ = smoke_run
  start = _latest(workdir, 'vanilla')
  end = _latest(workdir, 'dual')
  for name in start['params']:
    if name == 'fc2':
      continue
    assert _same_tree(start['params'][name], end['params'][name]), name
  assert _same_tree(start['batch_stats'], end['batch_stats'])
  # fc2 started as a copy of fc and trained away from it.
  assert not _same_tree(end['params']['fc2'], end['params']['fc'])


def test_maps_are_in_unit_interval(smoke_run):
  from dualsig_jax import cam, models

  config, workdir, _ = smoke_run
  model = stage_lib.build_stage_model(config, 'dual')
  variables = _latest(workdir, 'dual')
  batch = next(iter(data.make_eval_loader(config.input, 'test', batch_size=8)))
  fns = models.cam_fns(model)
  maps, targets = cam.compute_cams_multi(
    fns['apply_fn'],
    variables,
    batch['image'],
    methods=('cam', 'gradcam'),
    head_fn=fns['head_fn'],
    head_weights_fn=fns['head_weights_fn'],
  )
  for k, m in maps.items():
    m = np.asarray(m)
    assert m.shape == (8, config.input.eval_size, config.input.eval_size)
    assert m.min() >= 0.0 and m.max() <= 1.0 and np.isfinite(m).all(), k


def test_rerun_resumes_instead_of_retraining(smoke_run):
  config, workdir, _ = smoke_run
  before = os.path.getsize(os.path.join(workdir, 'metrics.jsonl'))
  out = experiment.run(config, workdir, evaluate=False)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    new = [json.loads(line) for line in f.read()[before:].splitlines() if line]
  assert all('loss' not in r for r in new), 'a finished stage trained again'
  assert out['stages']['dual']['step'] == out['stages']['dual']['step']


def test_unknown_arch_and_value_fail_before_training(smoke_data, tmp_path):
  c = smoke_config(smoke_data)
  c.model.arch = 'resnet9000'
  with pytest.raises(ValueError, match='resnet9000'):
    experiment.run(c, str(tmp_path))
  c = smoke_config(smoke_data)
  c.eval.methods = ('scorecam',)
  with pytest.raises(ValueError, match='scorecam'):
    experiment.run(c, str(tmp_path))
  c = smoke_config(smoke_data)
  with pytest.raises(AttributeError, match='lrr'):
    c.dual.lrr = 0.1


def test_batch_not_divisible_by_devices_fails(smoke_data, tmp_path):
  c = smoke_config(smoke_data, **{'input.batch_size': 12})
  with pytest.raises(ValueError, match='input.batch_size=12 does not split over the 8 devices'):
    loop.train_stage(c, str(tmp_path), 'vanilla')


def test_dual_without_vanilla_checkpoint_fails(smoke_data, tmp_path):
  c = smoke_config(smoke_data)
  c.stages = ('dual',)
  with pytest.raises(FileNotFoundError, match='vanilla checkpoint'):
    loop.train_stage(c, str(tmp_path), 'dual')


def test_workdir_of_another_experiment_is_refused(smoke_run, smoke_data):
  _, workdir, _ = smoke_run
  c = smoke_config(smoke_data, **{'model.arch': 'vgg_tiny'})
  with pytest.raises(ValueError, match='another experiment'):
    loop.train_stage(c, workdir, 'vanilla')


def test_kill_and_resume_matches_uninterrupted_run(smoke_data, tmp_path):
  steps = 24
  env = dict(os.environ)
  ref_dir, cut_dir = tmp_path / 'ref', tmp_path / 'cut'
  subprocess.run(
    train_cmd(smoke_data, ref_dir, steps), check=True, env=env, cwd=ROOT, capture_output=True
  )
  proc = subprocess.Popen(
    train_cmd(smoke_data, cut_dir, steps),
    env=env,
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  ckpt = cut_dir / 'vanilla' / 'checkpoints'
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    # Orbax writes into a temporary folder and renames it: a numeric folder is complete.
    done = [int(p) for p in os.listdir(ckpt) if p.isdigit()] if ckpt.exists() else []
    if done and max(done) >= 4:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
  killed_at = max(int(p) for p in os.listdir(ckpt) if p.isdigit())
  assert killed_at < steps
  subprocess.run(
    train_cmd(smoke_data, cut_dir, steps), check=True, env=env, cwd=ROOT, capture_output=True
  )
  ref = _latest(str(ref_dir), 'vanilla')
  got = _latest(str(cut_dir), 'vanilla')
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # metrics.jsonl: every step once, in order, with the uninterrupted run's losses (the records
  # the killed run wrote after its last checkpoint were dropped on resume, then rewritten).
  assert loss_steps(cut_dir) == loss_steps(ref_dir) == list(range(2, steps + 1, 2))
  losses = {
    d: [r['loss'] for r in smoke_helpers.metrics(d) if 'loss' in r] for d in (ref_dir, cut_dir)
  }
  np.testing.assert_allclose(losses[cut_dir], losses[ref_dir], rtol=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(smoke_data, tmp_path):
  good = smoke_config(smoke_data, **{'vanilla.max_steps': 4, 'checkpoint.every_steps': 4})
  good.stages = ('vanilla',)
  loop.train_stage(good, str(tmp_path), 'vanilla')
  # Resume the same run with an absurd learning rate (validate caps lr itself, not the
  # classifier group's ratio): the weights overflow within a few steps.
  bad = smoke_config(
    smoke_data,
    **{'vanilla.max_steps': 12, 'vanilla.lr_classifier_ratio': 1e30, 'checkpoint.every_steps': 4},
  )
  bad.stages = ('vanilla',)
  with pytest.raises(FloatingPointError, match='last good checkpoint'):
    loop.train_stage(bad, str(tmp_path), 'vanilla')
  ckpts = sorted(
    int(p) for p in os.listdir(stage_lib.checkpoint_dir(str(tmp_path), 'vanilla')) if p.isdigit()
  )
  assert ckpts == [4]
  kept = _latest(str(tmp_path), 'vanilla')
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(kept))


def test_saved_scoremaps_reproduce_results_through_the_cli(smoke_run, smoke_data, tmp_path):
  """eval.py's score maps, read back by the evaluate_wsol drop-in, give the same metrics."""
  from dualsig_jax import evaluate, wsol

  config, workdir, _ = smoke_run
  c = smoke_config(smoke_data, **{'eval.save_scoremaps': True})
  c.eval.methods = ('cam',)
  variables = _latest(workdir, 'dual')
  res = evaluate.evaluate(c, str(tmp_path), variables=variables)
  cli = wsol.evaluate_wsol(
    str(tmp_path / 'scoremaps' / 'cam_sigmoid'),
    c.input.metadata_root,
    'SYNTH',
    'test',
    mask_root=str(smoke_data),
    cam_curve_interval=c.eval.cam_curve_interval,
    progress=False,
  )
  ours = res['methods']['cam']['sigmoid']
  assert cli['maxboxacc_v2'] == pytest.approx(ours['maxboxacc_v2'], abs=1e-9)
  assert cli['gt_known_loc']['50'] == pytest.approx(ours['gt_known_loc'], abs=1e-9)
  assert cli['pxap'] == pytest.approx(ours['pxap'], abs=1e-9)
  assert cli['num_images'] == res['num_images']


def test_dual_checkpoint_of_another_model_is_refused_before_flax(smoke_run, smoke_data, tmp_path):
  """Evaluation's loader (stage.load_dual_variables) names the mismatching config field, with
  the checkpoint's record and, for a checkpoint without one, with its arrays."""
  import shutil

  from dualsig_jax import evaluate

  config, workdir, _ = smoke_run
  assert _same_tree(stage_lib.load_dual_variables(config, workdir), _latest(workdir, 'dual'))
  for field, value in (('model.num_classes', 5), ('model.arch', 'vgg_tiny')):
    c = smoke_config(smoke_data, **{field: value})
    with pytest.raises(ValueError, match=f'{field}='):
      stage_lib.load_dual_variables(c, workdir)
  c = smoke_config(smoke_data, **{'model.num_classes': 5})
  with pytest.raises(ValueError, match='model.num_classes='):
    evaluate.evaluate(c, workdir)
  # Without the record (a checkpoint that predates it): the arrays tell.
  bare = tmp_path / 'bare'
  shutil.copytree(stage_lib.checkpoint_dir(workdir, 'dual'), stage_lib.checkpoint_dir(bare, 'dual'))
  for meta in bare.glob('dual/checkpoints/*/meta'):
    shutil.rmtree(meta)
    os.remove(meta.parent / 'checksums.json')  # nor the manifest, which came later still
  with pytest.raises(
    ValueError, match=r"'params/fc/bias' of shape \(10,\), the model expects \(5,\)"
  ):
    stage_lib.load_dual_variables(c, str(bare))


def test_labels_beyond_num_classes_fail_before_training(smoke_data, tmp_path):
  """The synthetic labels go up to 9: with 5 classes the loss would turn NaN a step in."""
  c = smoke_config(smoke_data, **{'model.num_classes': 5})
  with pytest.raises(ValueError, match='model.num_classes=5'):
    experiment.run(c, str(tmp_path), evaluate=False)
  assert not os.path.exists(tmp_path / 'vanilla'), 'training started'


def _copy_run(smoke_run, tmp_path):
  import shutil

  config, workdir, out = smoke_run
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  return config, copy, out


def test_a_finished_run_prints_its_saved_results(smoke_run, tmp_path, capsys, caplog, monkeypatch):
  """Rerunning train.py on a finished workdir evaluates nothing: it prints the saved results
  and says how to force a new evaluation (eval.force, which does evaluate again)."""
  from dualsig_jax import evaluate as evaluate_lib
  from dualsig_jax.train import stage as stage_lib

  config, workdir, first = _copy_run(smoke_run, tmp_path)
  progress = stage_lib.stage_progress(config, workdir)
  assert progress['vanilla'] == {'step': 16, 'total': 16, 'finished': True}
  assert progress['dual']['finished'] and progress['dual']['source_change'] is None
  results_json = os.path.join(workdir, 'results.json')
  mtime = os.path.getmtime(results_json)
  calls = []
  monkeypatch.setattr(evaluate_lib, 'evaluate', lambda c, w: calls.append(c) or {'fake': 1})
  with caplog.at_level(logging.INFO, logger='dualsig_jax'):
    out = experiment.run(config, workdir)
  assert out['reused'] and not calls and os.path.getmtime(results_json) == mtime
  assert out['results'] == json.loads(json.dumps(first['results']))
  with open(os.path.join(workdir, 'results.md')) as f:
    assert f.read().strip() in capsys.readouterr().out
  assert '--config.eval.force=True' in caplog.text
  forced = smoke_config(config.input.data_root, **{'eval.force': True})
  forced.stages = ('dual',)  # (resume-safe; spares restoring the vanilla stage here)
  out = experiment.run(forced, workdir)
  assert not out['reused'] and len(calls) == 1 and out['results'] == {'fake': 1}


def test_longer_vanilla_on_a_finished_run_retrains_the_dual_stage(smoke_run, tmp_path, caplog):
  """vanilla.num_epochs 2 -> 3 on a finished run: the vanilla stage trains on to step 24 and
  the dual stage, whose input changed, is trained again from it (old checkpoints kept)."""
  config, workdir, _ = _copy_run(smoke_run, tmp_path)
  longer = smoke_config(config.input.data_root, **{'vanilla.num_epochs': 3})
  with caplog.at_level(logging.WARNING, logger='dualsig_jax'):
    experiment.run(longer, workdir, evaluate=False)
  assert smoke_helpers.checkpoint_steps(workdir, 'vanilla')[-1] == 24
  start, end = _latest(workdir, 'vanilla'), _latest(workdir, 'dual')
  for name in start['params']:
    if name != 'fc2':
      assert _same_tree(start['params'][name], end['params'][name]), name
  assert _same_tree(start['batch_stats'], end['batch_stats'])
  assert 'at step 16, which is now at step 24' in caplog.text
  assert [p for p in os.listdir(os.path.join(workdir, 'dual')) if '.stale-' in p]
