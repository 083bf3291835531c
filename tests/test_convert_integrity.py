"""Nothing damaged is converted or read (issue 23 items 4 and 5): a .pth whose bytes changed
inside a valid zip is refused by the archive's CRCs (torch's reader ignores them), weights
stored as integers are refused, a converter output carries a checksum manifest that every read
verifies (a deleted manifest is damage), and every reader of weights refuses NaN / Inf."""

import json
import os
import struct
import zipfile

import numpy as np
import pytest

from dualsig_jax import convert, models
from dualsig_jax.train import checkpoints

K = 3
ARCH = 'resnet_tiny'


@pytest.fixture(scope='module')
def sd():
  variables = models.init_variables(models.build_model(ARCH, K), 0)
  return convert.flax_to_torch(variables, ARCH, as_numpy=True)


def _payload(path, member_suffix) -> tuple[int, int, str]:
  """(file offset, size, name) of the stored bytes of the first zip member ending with
  ``member_suffix``."""
  with zipfile.ZipFile(path) as z:
    info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
  with open(path, 'rb') as f:
    f.seek(info.header_offset)
    head = f.read(30)
  name_len, extra_len = struct.unpack_from('<HH', head, 26)
  return info.header_offset + 30 + name_len + extra_len, info.compress_size, info.filename


def _flip(path, offset, nbytes=4):
  with open(path, 'r+b') as f:
    f.seek(offset)
    old = f.read(nbytes)
    f.seek(offset)
    f.write(bytes(b ^ 0x5A for b in old))


def _torch_file(tmp_path, sd, name='w.pth'):
  torch = pytest.importorskip('torch')
  path = tmp_path / name
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)
  return path


def test_damaged_pth_inside_a_valid_zip_is_refused(tmp_path, sd):
  torch = pytest.importorskip('torch')
  cases = {'tensor_first': '/data/0', 'tensor_last': f'/data/{len(sd) - 1}', 'pickle': 'data.pkl'}
  for case, member in cases.items():
    path = _torch_file(tmp_path, sd, f'{case}.pth')
    offset, size, name = _payload(path, member)
    _flip(path, offset + size // 2)
    if case != 'pickle':  # torch itself reads it without a word: the danger is real
      loaded = torch.load(path, weights_only=True)
      assert any(not np.array_equal(loaded[k].numpy(), sd[k]) for k in sd), case
    with pytest.raises(ValueError, match='CRC-32') as e:
      convert.load_state_dict(str(path))
    assert name in str(e.value) and str(path) in str(e.value), case


def test_damaged_zip_directory_and_npz_are_refused(tmp_path, sd):
  path = _torch_file(tmp_path, sd)
  data = path.read_bytes()
  cut = tmp_path / 'cut.pth'
  cut.write_bytes(data[: len(data) - 30])  # the end of the central directory is gone
  with pytest.raises(ValueError, match='damaged'):
    convert.load_state_dict(str(cut))
  npz = tmp_path / 'w.npz'
  np.savez(npz, **sd)
  offset, size, name = _payload(npz, 'conv1.weight.npy')
  _flip(npz, offset + size - 8)
  with pytest.raises(ValueError, match='CRC-32'):
    convert.load_state_dict(str(npz))


def test_cli_damaged_pth_is_one_line(tmp_path, sd, capsys):
  path = _torch_file(tmp_path, sd)
  offset, size, _ = _payload(path, '/data/3')
  _flip(path, offset + size // 3)
  with pytest.raises(SystemExit) as e:
    convert.cli(['--arch', ARCH, '--torch_checkpoint', str(path), '--output', str(tmp_path / 'o')])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'CRC-32' in err[0], err
  assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('dtype', ['int64', 'int32', 'uint8', 'bool'])
def test_float_weights_stored_as_integers_are_refused(tmp_path, sd, dtype):
  key = 'layer1.0.conv1.weight'
  bad = dict(sd, **{key: np.round(sd[key] * 100).astype(dtype)})
  with pytest.raises(ValueError, match=f"'{key}' is stored as {dtype}"):
    convert.torch_to_flax(bad, ARCH)
  torch = pytest.importorskip('torch')
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in bad.items()}
  with pytest.raises(ValueError, match=f"'{key}' is stored as"):
    convert.torch_to_flax(tensors, ARCH)


def test_counters_stay_integers(sd):
  """BatchNorm step counters are integers by nature, not weights."""
  counters = {k: np.array(7, np.int64) for k in sd if k.endswith('.running_mean')}
  counters = {k.replace('.running_mean', '.num_batches_tracked'): v for k, v in counters.items()}
  _, info = convert.torch_to_flax(dict(sd, **counters), ARCH, return_info=True)
  assert set(info.num_batches_tracked.values()) == {7}


@pytest.fixture()
def output(tmp_path, sd):
  """A converter output (CLI) and the variables it holds."""
  src = tmp_path / 'w.npz'
  np.savez(src, **sd)
  out = tmp_path / 'out'
  assert convert.cli(['--arch', ARCH, '--torch_checkpoint', str(src), '--output', str(out)]) == 0
  return out


def _largest_array_file(out):
  files = [os.path.join(d, f) for d, _, fs in os.walk(out / 'variables') for f in fs]
  return max(files, key=os.path.getsize)


def test_converter_output_has_a_manifest_that_every_read_verifies(output):
  record = json.loads((output / 'conversion.json').read_text())
  manifest = json.loads((output / 'checksums.json').read_text())['sha256']
  assert record['checksums'] == 'checksums.json' and 'conversion.json' in manifest
  assert any(k.startswith('variables') for k in manifest)
  v = convert.load_variables(str(output))
  ref, info = checkpoints.restore_variables(str(output))
  assert info['arch'] == ARCH
  np.testing.assert_array_equal(v['params']['fc']['kernel'], ref['params']['fc']['kernel'])


def test_damaged_converter_output_is_refused_by_every_reader(output, tmp_path):
  import shutil

  variants = {}
  for name in ('byte', 'manifest_gone', 'record_edited', 'file_gone', 'file_added'):
    variants[name] = tmp_path / name
    shutil.copytree(output, variants[name])
  _flip(_largest_array_file(variants['byte']), os.path.getsize(_largest_array_file(output)) // 2)
  os.remove(variants['manifest_gone'] / 'checksums.json')
  rec = json.loads((variants['record_edited'] / 'conversion.json').read_text())
  (variants['record_edited'] / 'conversion.json').write_text(json.dumps(rec | {'fc2': 'loaded'}))
  os.remove(_largest_array_file(variants['file_gone']))
  (variants['file_added'] / 'variables' / 'extra').write_bytes(b'x')
  why = {
    'byte': 'checksum mismatch',
    'manifest_gone': 'manifest checksums.json is missing',
    'record_edited': 'conversion.json differ',
    'file_gone': 'is missing',
    'file_added': 'not written by the converter',
  }
  for name, folder in variants.items():
    for read in (convert.load_variables, checkpoints.restore_variables):
      with pytest.raises(ValueError, match=why[name]):
        read(str(folder))


def test_non_finite_weights_are_refused_on_save_and_on_every_read(tmp_path, output):
  import orbax.checkpoint as ocp

  v = convert.load_variables(str(output))
  v['params']['fc']['kernel'] = np.array(v['params']['fc']['kernel'])
  v['params']['fc']['kernel'][0, 0] = np.nan
  with pytest.raises(ValueError, match='fc/kernel holds 1 non-finite'):
    convert.save_variables(v, str(tmp_path / 'never'), arch=ARCH)
  assert not (tmp_path / 'never').exists()
  # An output of an older version (a record without 'checksums', no manifest) holding NaN.
  old = tmp_path / 'old'
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(str(old / 'variables'), v)
  ckptr.wait_until_finished()
  record = dict(arch=ARCH, family='cam', num_classes=K, large_feature_map=False)
  (old / 'conversion.json').write_text(json.dumps(record))
  for read in (convert.load_variables, checkpoints.restore_variables):
    with pytest.raises(ValueError, match='params/fc/kernel holds 1 non-finite'):
      read(str(old))
  # A stage checkpoint (intact files, manifest and all) whose weights are not finite.
  mgr = checkpoints.manager(str(tmp_path / 'stage'), max_to_keep=2)
  checkpoints.save(mgr, 4, {'params': v['params'], 'batch_stats': v['batch_stats']}, None, {})
  with pytest.raises(ValueError, match='params/fc/kernel holds 1 non-finite'):
    checkpoints.restore_variables(str(tmp_path / 'stage'))
