"""Weight import/export: parity with PyTorch, exact round trips, reference/torchvision
checkpoint forms, the Orbax CLI, and clear errors on bad input."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax
import jax.numpy as jnp
from torch_models import (
  TorchInceptionCam,
  TorchInceptionStandard,
  TorchResNetCam,
  TorchVGGCam,
  build_torch_model,
  randomize_,
)

from dualsig_jax import convert
from dualsig_jax.convert import (
  flax_to_torch,
  load_state_dict,
  load_variables,
  read_checkpoint_info,
  torch_to_flax,
)
from dualsig_jax.models import build_model, head_weights
from dualsig_jax.models.vgg import VGG16_CFG


def _same(a: dict, b: dict):
  assert list(a) == list(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert torch.equal(a[k], b[k]), k


def _flax_leaf(variables, key_path):
  node = variables
  for k in key_path:
    node = node[k]
  return np.asarray(node)


# Full-size models: one compile each, small inputs. 96 px exercises all three of
# InceptionV3-CAM's ceil-mode pools (odd spans), like 224 px does.
# The standard family's full-size models are checked at 224 px in test_standard_models.py.
@pytest.mark.parametrize(
  'arch,lfm,size,family',
  [
    ('vgg16', False, 64, 'cam'),
    ('resnet50', False, 64, 'cam'),
    ('inception_v3', False, 96, 'cam'),
    ('vgg_tiny', False, 96, 'cam'),
    ('vgg_tiny', True, 96, 'cam'),
    ('resnet_tiny', False, 96, 'cam'),
    ('resnet_tiny', True, 96, 'cam'),
    ('vgg_tiny', False, 64, 'standard'),  # 8x8 -> 3x3 adaptive pool: uneven bins
    ('vgg_tiny', True, 52, 'standard'),
    ('resnet_tiny', False, 64, 'standard'),
  ],
)
def test_parity_with_torch_and_round_trip(arch, lfm, size, family):
  torch.manual_seed(0)
  tmodel = randomize_(build_torch_model(arch, 7, family=family, large_feature_map=lfm))
  sd = tmodel.state_dict()
  variables = torch_to_flax(sd, arch, family=family, large_feature_map=lfm)
  _same(flax_to_torch(variables, arch, family=family), sd)  # bit-exact, same key order

  x = np.random.RandomState(0).randn(2, 3, size, size).astype(np.float32)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x))
  model = build_model(arch, 7, family=family, large_feature_map=lfm)
  out = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  for ours, theirs in (
    ('features', 'features'),
    ('softmax_logits', 'logits'),
    ('sigmoid_logits', 'logits2'),
  ):
    r = ref[theirs].numpy()
    r = r.transpose(0, 2, 3, 1) if r.ndim == 4 else r
    got = np.asarray(out[ours])
    assert got.shape == r.shape
    assert np.abs(got - r).max() <= 1e-4 * np.abs(r).max(), (arch, ours)


def test_resnet50_is_torchvision_layout_and_imagenet_head_is_replaced():
  tv = TorchResNetCam(num_classes=1000, fc2=False)
  sd = tv.state_dict()
  # torchvision.models.resnet50().state_dict(): 320 entries, 25,557,032 parameters.
  assert len(sd) == 320
  assert sum(p.numel() for p in tv.parameters()) == 25_557_032
  assert sd['layer1.0.downsample.0.weight'].shape == (256, 64, 1, 1)
  assert sd['layer4.2.bn3.running_var'].shape == (2048,)
  variables, info = torch_to_flax(
    sd, 'resnet50', num_classes=200, fc2_init='clone', return_info=True
  )
  assert info.source == 'torchvision' and info.fc2 == 'clone'
  assert sorted(info.dropped) == ['fc.bias', 'fc.weight']
  assert sorted(info.initialised) == ['fc.bias', 'fc.weight', 'fc2.bias', 'fc2.weight']
  assert variables['params']['fc']['kernel'].shape == (2048, 200)
  # The new head starts as the reference's: N(0, 0.01), bias 0.
  assert abs(variables['params']['fc']['kernel'].std() / 0.01 - 1) < 0.05
  np.testing.assert_array_equal(variables['params']['fc']['bias'], 0.0)
  np.testing.assert_array_equal(
    variables['params']['fc2']['kernel'], variables['params']['fc']['kernel']
  )
  np.testing.assert_array_equal(
    _flax_leaf(variables, ('params', 'conv1', 'kernel')),
    sd['conv1.weight'].numpy().transpose(2, 3, 1, 0),
  )
  # ImageNet itself: the file's fc is the head, fc2 the reference's fresh init (the default).
  variables, info = torch_to_flax(sd, 'resnet50', return_info=True)
  assert info.num_classes == 1000 and info.fc2 == 'init'
  assert sorted(info.initialised) == ['fc2.bias', 'fc2.weight']
  np.testing.assert_array_equal(variables['params']['fc']['kernel'], sd['fc.weight'].numpy().T)
  assert abs(variables['params']['fc2']['kernel'].std() / 0.01 - 1) < 0.05


def test_torchvision_vgg16_drops_classifier_and_renumbers_for_large_feature_map():
  tv = TorchVGGCam(VGG16_CFG + ('M',), num_classes=1000, fc2=False)
  sd = {k: v for k, v in tv.state_dict().items() if k.startswith('features.')}
  # torchvision's fc6/fc7/fc8 (tiny stand-ins: they are dropped by name).
  sd.update(
    {f'classifier.{i}.{leaf}': torch.zeros(3) for i in (0, 3, 6) for leaf in ('weight', 'bias')}
  )
  variables, info = torch_to_flax(
    sd, 'vgg16', num_classes=20, large_feature_map=True, return_info=True
  )
  assert info.source == 'torchvision' and len(info.dropped) == 6
  assert sorted(info.initialised) == [
    'conv6.bias',
    'conv6.weight',
    'fc.bias',
    'fc.weight',
    'fc2.bias',
    'fc2.weight',
  ]
  feats = variables['params']['features']
  assert sorted(feats, key=int)[-3:] == ['23', '25', '27']  # 4th pool removed
  np.testing.assert_array_equal(
    feats['27']['kernel'], sd['features.28.weight'].numpy().transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(feats['0']['bias'], sd['features.0.bias'].numpy())
  assert np.abs(variables['params']['conv6']['kernel']).max() > 0


@pytest.fixture(scope='module')
def inception_sd():
  torch.manual_seed(0)
  return randomize_(TorchInceptionCam(num_classes=5)).state_dict()


def test_torchvision_inception(inception_sd):
  sd = {k: v for k, v in inception_sd.items() if not k.startswith('SPG_')}
  sd.update(
    {
      'Mixed_7a.branch3x3_1.conv.weight': torch.zeros(2),
      'AuxLogits.fc.weight': torch.zeros(2),
      'fc.weight': torch.zeros(1000, 2048),
      'fc.bias': torch.zeros(1000),
    }
  )
  variables, info = torch_to_flax(sd, 'inception_v3', num_classes=5, return_info=True)
  assert info.source == 'torchvision'
  assert sorted(info.dropped) == [
    'AuxLogits.fc.weight',
    'Mixed_7a.branch3x3_1.conv.weight',
    'fc.bias',
    'fc.weight',
  ]
  assert {k.split('.')[0] for k in info.initialised} == {
    'SPG_A3_1b',
    'SPG_A3_2b',
    'SPG_A4',
    'SPG_A4_2',
  }
  np.testing.assert_array_equal(
    variables['batch_stats']['Mixed_6e']['branch_pool']['bn']['var'],
    sd['Mixed_6e.branch_pool.bn.running_var'].numpy(),
  )
  assert variables['params']['fc']['kernel'].shape == (1, 1, 1024, 5)


def test_inception_heads_named_fc(inception_sd):
  renamed = {
    k.replace('SPG_A4_2.', 'fc2.').replace('SPG_A4.', 'fc.'): v for k, v in inception_sd.items()
  }
  variables, info = torch_to_flax(renamed, 'inception_v3', return_info=True)
  assert info.head_names == 'fc' and info.source == 'reference' and info.num_classes == 5
  _same(flax_to_torch(variables, 'inception_v3', head_names='fc'), renamed)
  _same(flax_to_torch(variables, 'inception_v3'), inception_sd)
  # The 1x1-conv head: head() == GAP(features) @ w + b (cheap, no backbone involved).
  model = build_model('inception_v3', 5)
  feats = jnp.asarray(np.random.RandomState(0).rand(2, 3, 3, 1024).astype(np.float32))
  logits = model.apply(variables, feats, method='head')
  w, b = head_weights(variables, 'sigmoid')
  np.testing.assert_allclose(
    logits['sigmoid_logits'], feats.mean(axis=(1, 2)) @ w + b, rtol=1e-5, atol=1e-5
  )


def test_reference_checkpoint_forms_and_fc2_clone():
  torch.manual_seed(1)
  tmodel = randomize_(build_torch_model('resnet_tiny', 4, fc2=False))
  sd = tmodel.state_dict()
  sd['layer1.0.bn2.num_batches_tracked'] = torch.tensor(123)
  wrapped = {'state_dict': {'module.' + k: v for k, v in sd.items()}, 'epoch': 3}
  variables, info = torch_to_flax(wrapped, 'resnet_tiny', fc2_init='clone', return_info=True)
  assert info.fc2 == 'clone' and info.num_classes == 4 and not info.initialised
  p = variables['params']
  np.testing.assert_array_equal(p['fc2']['kernel'], p['fc']['kernel'])
  np.testing.assert_array_equal(p['fc2']['bias'], p['fc']['bias'])
  back = flax_to_torch(variables, 'resnet_tiny', num_batches_tracked=info.num_batches_tracked)
  _same({k: v for k, v in back.items() if not k.startswith('fc2.')}, sd)
  fresh, info = torch_to_flax(sd, 'resnet_tiny', rng=5, return_info=True)  # default: 'init'
  assert info.fc2 == 'init' and sorted(info.initialised) == ['fc2.bias', 'fc2.weight']
  assert not np.array_equal(fresh['params']['fc2']['kernel'], p['fc']['kernel'])
  np.testing.assert_array_equal(fresh['params']['fc2']['bias'], 0.0)


@pytest.fixture()
def tiny_sd():
  torch.manual_seed(2)
  return build_torch_model('vgg_tiny', 3).state_dict()


@pytest.mark.parametrize(
  'edit,match',
  [
    (lambda sd: sd.pop('features.0.bias'), 'missing keys.*features.0.bias'),
    (lambda sd: sd.update({'extra.weight': torch.zeros(1)}), 'unexpected keys.*extra.weight'),
    (
      lambda sd: sd.update({'conv6.weight': torch.zeros(128, 64, 3, 3)}),
      "shape mismatch for 'conv6.weight'",
    ),
    (lambda sd: sd.pop('fc.weight'), 'missing keys.*fc.weight'),
    (lambda sd: sd.update({'fc.bias': 'oops'}), "'fc.bias' is a str"),
  ],
)
def test_bad_state_dicts(tiny_sd, edit, match):
  edit(tiny_sd)
  with pytest.raises(ValueError, match=match):
    torch_to_flax(tiny_sd, 'vgg_tiny', num_classes=3)


def test_bad_arguments(tiny_sd):
  with pytest.raises(ValueError, match="shape mismatch for 'fc.weight'"):
    torch_to_flax(tiny_sd, 'vgg_tiny', num_classes=10)
  with pytest.raises(ValueError, match='valid: vgg16'):
    torch_to_flax(tiny_sd, 'vgg19')
  with pytest.raises(ValueError, match='valid: vgg16'):
    flax_to_torch({'params': {}}, 'vgg19')
  with pytest.raises(ValueError, match='source'):
    torch_to_flax(tiny_sd, 'vgg_tiny', source='timm')
  with pytest.raises(ValueError, match='no torchvision file'):
    torch_to_flax(tiny_sd, 'vgg_tiny', source='torchvision')
  with pytest.raises(ValueError, match='num_classes is required'):
    torch_to_flax({'features.0.weight': torch.zeros(64, 3, 3, 3)}, 'vgg16')


class _Evil:
  def __reduce__(self):
    return (os.system, ('echo pwned',))


def test_files_unsafe_pickle_npz_safetensors(tmp_path, tiny_sd):
  bad = tmp_path / 'bad.pth'
  torch.save({'state_dict': tiny_sd, 'evil': _Evil()}, bad)
  with pytest.raises(ValueError, match='refusing to load'):
    load_state_dict(str(bad))
  with pytest.raises(FileNotFoundError, match='nope.pth'):
    load_state_dict(str(tmp_path / 'nope.pth'))
  npz = tmp_path / 'w.npz'
  np.savez(npz, **{k: v.numpy() for k, v in tiny_sd.items()})
  got = torch_to_flax(load_state_dict(str(npz)), 'vgg_tiny')
  _same(flax_to_torch(got, 'vgg_tiny'), tiny_sd)
  st = tmp_path / 'w.safetensors'
  try:
    from safetensors.torch import save_file
  except ImportError:
    st.write_bytes(b'\0' * 16)
    with pytest.raises(ImportError, match='safetensors'):
      load_state_dict(str(st))
  else:
    save_file(tiny_sd, str(st))
    _same(flax_to_torch(torch_to_flax(load_state_dict(str(st)), 'vgg_tiny'), 'vgg_tiny'), tiny_sd)


def test_cli_writes_orbax_checkpoint(tmp_path):
  torch.manual_seed(3)
  sd = randomize_(build_torch_model('resnet_tiny', 6, fc2=False)).state_dict()
  ckpt = tmp_path / 'ref.pth.tar'
  torch.save({'state_dict': {'module.' + k: v for k, v in sd.items()}}, ckpt)
  out = tmp_path / 'converted'
  assert (
    convert.main(
      [
        '--arch',
        'resnet_tiny',
        '--torch_checkpoint',
        str(ckpt),
        '--num_classes',
        '6',
        '--output',
        str(out),
      ]
    )
    == 0
  )
  restored = load_variables(str(out))
  expected = torch_to_flax(sd, 'resnet_tiny')  # same seed (0): the same fresh fc2
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, expected
  )
  meta = json.loads((out / 'conversion.json').read_text())
  assert meta['arch'] == 'resnet_tiny' and meta['num_classes'] == 6 and meta['fc2'] == 'init'
  # A restored checkpoint runs as-is.
  model = build_model('resnet_tiny', 6)
  logits = model.apply(restored, jnp.zeros((1, 64, 64, 3)))['softmax_logits']
  assert logits.shape == (1, 6)


# ----------------------------------------------------------------------------- standard family
def _torchvision_vgg16_keys():
  """torchvision vgg16-397923af.pth's keys and shapes: 13 convs at the indices of
  VGG16's features Sequential (pools included), classifier.{0,3,6}, 1000 classes."""
  shapes, c, i = {}, 3, 0
  for v in VGG16_CFG + ('M',):
    if v == 'M':
      i += 1
      continue
    shapes[f'features.{i}.weight'] = (v, c, 3, 3)
    shapes[f'features.{i}.bias'] = (v,)
    c, i = v, i + 2
  for j, (n_out, n_in) in zip((0, 3, 6), ((4096, 25088), (4096, 4096), (1000, 4096))):
    shapes[f'classifier.{j}.weight'] = (n_out, n_in)
    shapes[f'classifier.{j}.bias'] = (n_out,)
  return shapes


def test_standard_vgg16_reads_torchvision_file_as_vanilla_checkpoint():
  shapes = _torchvision_vgg16_keys()
  assert len(shapes) == 32 and sum(int(np.prod(v)) for v in shapes.values()) == 138_357_544
  g = torch.Generator().manual_seed(0)
  # Zeros for the two big matrices (fast); distinct values where the mapping is checked.
  sd = {
    k: torch.zeros(v) if int(np.prod(v)) > 3e6 else torch.randn(v, generator=g)
    for k, v in shapes.items()
  }
  variables, info = torch_to_flax(
    sd, 'vgg16', family='standard', large_feature_map=True, return_info=True
  )
  assert info.source == 'torchvision' and info.num_classes == 1000 and info.fc2 == 'init'
  assert info.family == 'standard' and info.large_feature_map and not info.dropped
  assert sorted(info.initialised) == [
    f'classifier_2.{j}.{n}' for j in (0, 3, 6) for n in ('bias', 'weight')
  ]
  p = variables['params']
  # large_feature_map drops the 4th pool: convs 24, 26, 28 become 23, 25, 27.
  assert sorted(p['features'], key=int)[-3:] == ['23', '25', '27']
  np.testing.assert_array_equal(
    p['features']['27']['kernel'], sd['features.28.weight'].numpy().transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(p['fc']['6']['kernel'], sd['classifier.6.weight'].numpy().T)
  np.testing.assert_array_equal(p['fc']['3']['bias'], sd['classifier.3.bias'].numpy())
  # classifier_2: the reference's fresh N(0, 0.01) Linears with zero bias.
  assert abs(p['fc2']['6']['kernel'].std() / 0.01 - 1) < 0.02
  np.testing.assert_array_equal(p['fc2']['0']['bias'], 0.0)
  # Another dataset: the reference drops all of classifier.* and initialises it afresh.
  # ('clone' only saves drawing a second 120M-parameter MLP here.)
  variables, info = torch_to_flax(
    sd, 'vgg16', family='standard', num_classes=20, fc2_init='clone', return_info=True
  )
  assert len(info.dropped) == 6 and any('dropped and re-initialised' in n for n in info.notes)
  assert variables['params']['fc']['6']['kernel'].shape == (4096, 20)
  assert abs(variables['params']['fc']['3']['kernel'].std() / 0.01 - 1) < 0.02
  np.testing.assert_array_equal(variables['params']['fc']['0']['bias'], 0.0)


def test_standard_inception_reads_torchvision_file():
  torch.manual_seed(0)
  sd = dict(TorchInceptionStandard(num_classes=1000, fc2=False).state_dict())
  sd.update({'AuxLogits.conv0.conv.weight': torch.zeros(128, 768, 1, 1)})
  sd.update({'AuxLogits.fc.weight': torch.zeros(1000, 768), 'AuxLogits.fc.bias': torch.zeros(1000)})
  variables, info = torch_to_flax(sd, 'inception_v3', family='standard', return_info=True)
  assert info.source == 'torchvision' and info.num_classes == 1000
  assert sorted(info.dropped) == [
    'AuxLogits.conv0.conv.weight',
    'AuxLogits.fc.bias',
    'AuxLogits.fc.weight',
  ]
  assert any('AuxLogits' in n for n in info.notes)
  assert any('transform_input=False' in n for n in info.notes)
  p = variables['params']
  np.testing.assert_array_equal(p['fc']['kernel'], sd['fc.weight'].numpy().T)
  np.testing.assert_array_equal(
    variables['batch_stats']['Mixed_7c']['branch_pool']['bn']['var'],
    sd['Mixed_7c.branch_pool.bn.running_var'].numpy(),
  )
  # fc2 as the standard InceptionV3 initialises its Linears: trunc_normal(std 0.1), torch bias.
  assert abs(p['fc2']['kernel'].std() / 0.1 - 1) < 0.05
  assert 0 < np.abs(p['fc2']['bias']).max() <= 1 / np.sqrt(2048)
  _, info = torch_to_flax(sd, 'inception_v3', family='standard', num_classes=5, return_info=True)
  assert sorted(k for k in info.dropped if k.startswith('fc.')) == ['fc.bias', 'fc.weight']
  assert sorted(info.initialised) == ['fc.bias', 'fc.weight', 'fc2.bias', 'fc2.weight']


def test_standard_reference_checkpoint_clone_and_wrong_family():
  torch.manual_seed(5)
  sd = randomize_(build_torch_model('vgg_tiny', 4, family='standard', fc2=False)).state_dict()
  wrapped = {'state_dict': {'module.' + k: v for k, v in sd.items()}}
  variables, info = torch_to_flax(
    wrapped, 'vgg_tiny', family='standard', fc2_init='clone', return_info=True
  )
  assert info.num_classes == 4 and info.fc2 == 'clone' and info.source == 'reference'
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, variables['params']['fc2'], variables['params']['fc']
  )
  back = flax_to_torch(variables, 'vgg_tiny', family='standard')
  assert [k for k in back if k.startswith('classifier_2.')] == [
    f'classifier_2.{j}.{n}' for j in (0, 3, 6) for n in ('weight', 'bias')
  ]
  with pytest.raises(ValueError, match="unexpected keys.*classifier.*family='standard'"):
    torch_to_flax(sd, 'vgg_tiny', num_classes=4)


def test_cli_standard_family_records_family_and_large_feature_map(tmp_path):
  torch.manual_seed(6)
  sd = randomize_(build_torch_model('vgg_tiny', 3, family='standard', large_feature_map=True))
  ckpt = tmp_path / 'wsol_vgg.pth'
  torch.save({'state_dict': sd.state_dict()}, ckpt)
  out = tmp_path / 'converted'
  args = ['--arch', 'vgg_tiny', '--family', 'standard', '--large_feature_map']
  args += ['--torch_checkpoint', str(ckpt), '--output', str(out)]
  assert convert.main(args) == 0
  info = read_checkpoint_info(str(out))
  assert (info['arch'], info['family'], info['num_classes'], info['large_feature_map']) == (
    'vgg_tiny',
    'standard',
    3,
    True,
  )
  assert read_checkpoint_info(str(out / 'variables')) == info
  restored = load_variables(str(out))
  np.testing.assert_array_equal(
    restored['params']['fc2']['6']['kernel'], sd.classifier_2[6].weight.detach().numpy().T
  )
  with pytest.raises(FileExistsError, match='--overwrite'):
    convert.main(args)
  assert convert.main(args + ['--overwrite']) == 0
  # A record written before the standard family existed is a CAM one.
  old = tmp_path / 'old'
  old.mkdir()
  record = {k: v for k, v in info.items() if k != 'family'}
  (old / 'conversion.json').write_text(json.dumps(record))
  assert read_checkpoint_info(str(old))['family'] == 'cam'
  with pytest.raises(FileNotFoundError, match='conversion.json'):
    read_checkpoint_info(str(tmp_path / 'nothing'))
