"""ResNet18 / ResNet34 (torchvision's BasicBlock ResNets in wsolevaluation's CAM layout), added
through the backbone table alone: parity with the PyTorch mirror at 224 px in both families,
torchvision's file layout in the converter, training-ready lr groups."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax
import jax.numpy as jnp
from torch_models import build_torch_model, randomize_

from dualsig_jax.convert import flax_to_torch, torch_to_flax
from dualsig_jax.models import build_model, cam_fns, lr_group

K = 5
# torchvision.models.resnet18/34().state_dict(): entries (with BN counters) and parameters.
TORCHVISION = {'resnet18': (122, 11_689_512), 'resnet34': (218, 21_797_672)}


# The standard family has the same spec (the reference's wsol/ ResNets are its CAM ones): one
# size of it is enough.
@pytest.mark.parametrize(
  'arch,family', [('resnet18', 'cam'), ('resnet34', 'cam'), ('resnet18', 'standard')]
)
def test_parity_224(arch, family):
  torch.manual_seed(0)
  tmodel = randomize_(build_torch_model(arch, K, family=family))
  sd = tmodel.state_dict()
  variables = torch_to_flax(sd, arch, family=family)
  back = flax_to_torch(variables, arch, family=family)
  assert list(back) == list(sd)  # same keys, same order
  assert all(torch.equal(back[k], sd[k]) for k in sd)
  x = np.random.RandomState(0).randn(2, 3, 224, 224).astype(np.float32)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x))
  model = build_model(arch, K, family=family)
  out = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert out['features'].shape == (2, 14, 14, 512)  # layer4 keeps stride 1, as ResNetCam
  worst = 0.0
  for ours, theirs in (('features', 'features'), ('softmax_logits', 'logits'),
                       ('sigmoid_logits', 'logits2')):  # fmt: skip
    r = ref[theirs].numpy()
    r = r.transpose(0, 2, 3, 1) if r.ndim == 4 else r
    rel = float(np.abs(np.asarray(out[ours]) - r).max() / np.abs(r).max())
    worst = max(worst, rel)
    assert rel <= 1e-4, (arch, family, ours, rel)
  print(f'{arch} ({family}) 224 px: max |jax - torch| / max |torch| = {worst:.2e}')
  # Plain CAM reads the linear head's weights.
  w, b = cam_fns(model)['head_weights_fn'](variables, 'sigmoid')
  assert w.shape == (512, K) and b.shape == (K,)


@pytest.mark.parametrize('arch', ['resnet18', 'resnet34'])
def test_torchvision_file_layout(arch):
  """torchvision's file: the same keys plus an ImageNet fc; with K classes the fc is dropped and
  both heads get the reference's fresh init."""
  tv = build_torch_model(arch, 1000, fc2=False)
  sd = tv.state_dict()
  entries, params = TORCHVISION[arch]
  assert len(sd) == entries and sum(p.numel() for p in tv.parameters()) == params
  variables, info = torch_to_flax(sd, arch, num_classes=K, return_info=True)
  assert info.source == 'torchvision'
  assert sorted(info.dropped) == ['fc.bias', 'fc.weight']
  assert sorted(info.initialised) == ['fc.bias', 'fc.weight', 'fc2.bias', 'fc2.weight']
  np.testing.assert_array_equal(
    variables['params']['layer2']['0']['downsample']['0']['kernel'],
    sd['layer2.0.downsample.0.weight'].numpy().transpose(2, 3, 1, 0),
  )
  # The standard family reads it as a vanilla ImageNet classifier.
  variables, info = torch_to_flax(sd, arch, family='standard', return_info=True)
  assert info.source == 'torchvision' and info.num_classes == 1000
  np.testing.assert_array_equal(variables['params']['fc']['kernel'], sd['fc.weight'].numpy().T)


def test_lr_groups_follow_the_resnet_rule():
  assert lr_group('resnet18', ('layer4', '1', 'conv2', 'kernel')) == 'classifier'
  assert lr_group('resnet34', ('layer3', '5', 'bn2', 'scale')) == 'feature'
  assert lr_group('resnet18', ('fc', 'kernel')) == 'classifier'
  assert lr_group('resnet18', ('fc2', 'kernel'), family='standard') == 'feature'
