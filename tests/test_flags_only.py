"""Every command-line argument is a flag (issue 23 item 8): a word without its dashes
(``config.vanilla.lr=0.1``), a value after a boolean flag, a flag after a bare ``--`` is one line
and exit 2 from train.py, eval.py, the converter and the WSOL CLI, before any work; argparse
errors of the two module CLIs are one line too."""

import os
import subprocess
import sys

import pytest

from dualsig_jax import arguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  return subprocess.run(
    [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
  )


def _one_line(r) -> str:
  assert r.returncode == 2, r.stdout + r.stderr
  assert 'Traceback' not in r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  return lines[0]


@pytest.mark.parametrize(
  'script, extra, hint',
  [
    ('train.py', ['config.vanilla.lr=0.1'], '--config.vanilla.lr=0.1'),
    ('train.py', ['--skip_eval', 'false'], '--name=false'),
    ('train.py', ['--', '--config.vanilla.lr=0.1'], "bare '--'"),
    ('eval.py', ['split=val'], '--split=val'),
    ('eval.py', ['config.eval.methods=layercam'], '--config.eval.methods=layercam'),
  ],
)
def test_entry_points_refuse_words_that_are_not_flags(tmp_path, script, extra, hint):
  workdir = tmp_path / 'run'
  r = _run(
    os.path.join(ROOT, script),
    f'--config={ROOT}/configs/synthetic.py',
    f'--workdir={workdir}',
    *extra,
    cwd=str(tmp_path),
  )
  line = _one_line(r)
  word = [w for w in extra if w != '--' and not w.startswith('--skip')][0]
  assert f'unexpected argument {word!r}' in line and hint in line, line
  assert not workdir.exists()  # refused before anything is written


def _module_cli(capsys, fn, argv) -> str:
  with pytest.raises(SystemExit) as e:
    fn(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  return lines[0]


def test_converter_refuses_words_that_are_not_flags(tmp_path, capsys):
  from dualsig_jax import convert

  base = ['--arch', 'resnet_tiny', '--torch_checkpoint', str(tmp_path / 'x.npz')]
  base += ['--output', str(tmp_path / 'out')]
  line = _module_cli(capsys, convert.cli, base + ['fc2_init=clone'])
  assert "unexpected argument 'fc2_init=clone'" in line and '--fc2_init=clone' in line
  line = _module_cli(capsys, convert.cli, base + ['--fc2_init', 'maybe'])  # a bad choice
  assert "invalid choice: 'maybe'" in line
  line = _module_cli(capsys, convert.cli, base[:2] + ['--output', 'o'])  # a missing flag
  assert '--torch_checkpoint' in line
  assert not (tmp_path / 'out').exists()


def test_wsol_cli_refuses_words_that_are_not_flags(tmp_path, capsys):
  from dualsig_jax.wsol import cli

  base = ['--scoremap_root', str(tmp_path), '--metadata_root', str(tmp_path)]
  base += ['--dataset_name', 'SYNTH', '--split', 'test']
  line = _module_cli(capsys, cli.main, base + ['loc_threshold=0.5'])
  assert "unexpected argument 'loc_threshold=0.5'" in line and '--loc_threshold=0.5' in line
  line = _module_cli(capsys, cli.main, base + ['--multi_contour_eval', 'maybe'])
  assert 'expected true or false' in line


def test_positional_error_names_the_first_word_and_counts_the_rest():
  assert arguments.positional_error([]) is None
  msg = arguments.positional_error(['a=1', 'b', 'c'])
  assert "'a=1' (and 2 more)" in msg and '--a=1' in msg


def test_converter_refuses_a_bad_seed_and_an_unwritable_output_before_converting(
  tmp_path, capsys, monkeypatch
):
  """Variants of the same hole: values that were a traceback deep in JAX or after the whole
  conversion are one line before any work."""
  from dualsig_jax import convert
  from dualsig_jax.convert import command

  monkeypatch.setattr(command, 'load_state_dict', lambda p: pytest.fail('read the checkpoint'))
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  base = ['--arch', 'resnet_tiny', '--torch_checkpoint', str(a_file)]
  for extra, words in [
    (['--seed', '99999999999999999999', '--output', str(tmp_path / 'o')], '--seed must be'),
    (['--seed', '-1', '--output', str(tmp_path / 'o')], '--seed must be'),
    (['--output', str(a_file / 'out')], 'is a file, not a folder'),
    (['--output', '/proc/dualsig_out'], 'is not writable'),  # read-only, even for root
  ]:
    line = _module_cli(capsys, convert.cli, base + extra)
    assert words in line, line
