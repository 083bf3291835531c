"""Plain PyTorch models mirroring dualsig_jax's architectures (for the tests and benchmarks).

Key names follow torchvision / wsolevaluation (and the dual-cam reference's ``fc2`` /
``SPG_A4_2`` / ``classifier_2``), so their ``state_dict()`` is what ``dualsig_jax.convert``
consumes. Both families: the CAM models (wsol_cam/) and the standard ones (wsol/: torchvision's
VGG16 with MLP heads and Inception3 through Mixed_7c, written here from the torchvision
architecture since torchvision is not a dependency). Each ``forward(x NCHW)`` returns
``{'features' NCHW, 'logits', 'logits2'}``. Importing this module requires torch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dualsig_jax.models.vgg import VGG16_CFG, VGG_TINY_CFG, vgg_cfg


def _vgg_features(cfg) -> tuple[nn.Sequential, int]:
  """torchvision's VGG ``features`` (conv3x3 + ReLU, 2x2 max pool at 'M'; torchvision's
  indices) and its output channel count."""
  layers, c = [], 3
  for v in cfg:
    if v == 'M':
      layers.append(nn.MaxPool2d(2, 2))
    else:
      layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
      c = v
  return nn.Sequential(*layers), c


class TorchVGGCam(nn.Module):
  def __init__(self, cfg, conv6=1024, num_classes=10, fc2=True):
    super().__init__()
    self.features, c = _vgg_features(cfg)
    self.conv6 = nn.Conv2d(c, conv6, 3, padding=1)
    self.relu = nn.ReLU(inplace=False)
    self.fc = nn.Linear(conv6, num_classes)
    if fc2:
      self.fc2 = nn.Linear(conv6, num_classes)

  def forward(self, x):
    f = self.relu(self.conv6(self.features(x)))
    p = f.mean(dim=(2, 3))
    out = {'features': f, 'logits': self.fc(p)}
    if hasattr(self, 'fc2'):
      out['logits2'] = self.fc2(p)
    return out


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
      )

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    idt = x if self.downsample is None else self.downsample(x)
    return self.relu(out + idt)


class BasicBlock(nn.Module):
  """torchvision BasicBlock (ResNet18 / ResNet34)."""

  expansion = 1

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
      )

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    idt = x if self.downsample is None else self.downsample(x)
    return self.relu(out + idt)


class TorchResNetCam(nn.Module):
  """torchvision ResNet key layout (Bottleneck or BasicBlock); wsolevaluation strides (layer4
  stride 1)."""

  def __init__(
    self,
    blocks=(3, 4, 6, 3),
    planes=(64, 128, 256, 512),
    stem=64,
    num_classes=10,
    large_feature_map=False,
    fc2=True,
    block=Bottleneck,
  ):
    super().__init__()
    self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(stem)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    strides = (1, 2, 1 if large_feature_map else 2, 1)
    c = stem
    for i, (n, p, s) in enumerate(zip(blocks, planes, strides)):
      layer = []
      for j in range(n):
        layer.append(block(c, p, s if j == 0 else 1))
        c = p * block.expansion
      setattr(self, f'layer{i + 1}', nn.Sequential(*layer))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(c, num_classes)
    if fc2:
      self.fc2 = nn.Linear(c, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    f = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    p = self.avgpool(f).flatten(1)
    out = {'features': f, 'logits': self.fc(p)}
    if hasattr(self, 'fc2'):
      out['logits2'] = self.fc2(p)
    return out


class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, k, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, 1)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, 1)

  def forward(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
    return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class InceptionB(nn.Module):
  """CAM variant: stride 1, padding 1, pool padding 1; torchvision: 2, 0, 0."""

  def __init__(self, cin, stride=1, padding=1, pool_padding=1):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=stride, padding=padding)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=stride, padding=padding)
    self.stride = stride
    self.pool_padding = pool_padding

  def forward(self, x):
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = F.max_pool2d(x, 3, stride=self.stride, padding=self.pool_padding)
    return torch.cat([self.branch3x3(x), bd, bp], 1)


class InceptionC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, 1)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, 1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = m(bd)
    bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
    return torch.cat([self.branch1x1(x), b7, bd, bp], 1)


class TorchInceptionCam(nn.Module):
  """wsolevaluation InceptionCam (+ the dual-cam reference's ``SPG_A4_2``)."""

  def __init__(self, num_classes=10, large_feature_map=False, fc2=True):
    super().__init__()
    self.large_feature_map = large_feature_map
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, padding=1)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
    self.Mixed_5b = InceptionA(192, 32)
    self.Mixed_5c = InceptionA(256, 64)
    self.Mixed_5d = InceptionA(288, 64)
    self.Mixed_6a = InceptionB(288, stride=1, padding=1)
    self.Mixed_6b = InceptionC(768, 128)
    self.Mixed_6c = InceptionC(768, 160)
    self.Mixed_6d = InceptionC(768, 160)
    self.Mixed_6e = InceptionC(768, 192)
    self.SPG_A3_1b = nn.Sequential(nn.Conv2d(768, 1024, 3, padding=1), nn.ReLU(True))
    self.SPG_A3_2b = nn.Sequential(nn.Conv2d(1024, 1024, 3, padding=1), nn.ReLU(True))
    self.SPG_A4 = nn.Conv2d(1024, num_classes, 1)
    if fc2:
      self.SPG_A4_2 = nn.Conv2d(1024, num_classes, 1)

  def forward(self, x):
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
    if not self.large_feature_map:
      x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
    x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))
    x = F.dropout(x, 0.5, self.training)
    x = F.dropout(self.SPG_A3_1b(x), 0.5, self.training)
    f = self.SPG_A3_2b(x)
    h = F.dropout(f, 0.5, self.training)
    out = {'features': f, 'logits': self.SPG_A4(h).mean(dim=(2, 3))}
    if hasattr(self, 'SPG_A4_2'):
      out['logits2'] = self.SPG_A4_2(h).mean(dim=(2, 3))
    return out


class InceptionD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, 1)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_1(x)
    for m in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = m(b7)
    return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 320, 1)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, 1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
    return torch.cat([self.branch1x1(x), b3, bd, bp], 1)


class TorchInceptionStandard(nn.Module):
  """torchvision Inception3 (transform_input=False, no AuxLogits) + ``fc2``: wsol/inception.py."""

  def __init__(self, num_classes=10, fc2=True, dropout=0.5):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
    self.maxpool1 = nn.MaxPool2d(3, 2)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
    self.maxpool2 = nn.MaxPool2d(3, 2)
    self.Mixed_5b = InceptionA(192, 32)
    self.Mixed_5c = InceptionA(256, 64)
    self.Mixed_5d = InceptionA(288, 64)
    self.Mixed_6a = InceptionB(288, stride=2, padding=0, pool_padding=0)
    self.Mixed_6b = InceptionC(768, 128)
    self.Mixed_6c = InceptionC(768, 160)
    self.Mixed_6d = InceptionC(768, 160)
    self.Mixed_6e = InceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280)
    self.Mixed_7c = InceptionE(2048)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.dropout = nn.Dropout(p=dropout)
    self.fc = nn.Linear(2048, num_classes)
    if fc2:
      self.fc2 = nn.Linear(2048, num_classes)

  def forward(self, x):
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(self.maxpool1(x)))
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(self.maxpool2(x))))
    x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))
    f = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
    p = torch.flatten(self.dropout(self.avgpool(f)), 1)
    out = {'features': f, 'logits': self.fc(p)}
    if hasattr(self, 'fc2'):
      out['logits2'] = self.fc2(p)
    return out


def _mlp(d_in, hidden, num_classes, dropout):
  return nn.Sequential(
    nn.Linear(d_in, hidden),
    nn.ReLU(True),
    nn.Dropout(p=dropout),
    nn.Linear(hidden, hidden),
    nn.ReLU(True),
    nn.Dropout(p=dropout),
    nn.Linear(hidden, num_classes),
  )


class TorchVGGStandard(nn.Module):
  """wsol/vgg.py's VggCam: torchvision VGG16 features without the last pool,
  AdaptiveAvgPool2d(pool), flatten, MLP ``classifier`` (+ ``classifier_2``)."""

  def __init__(self, cfg, hidden=4096, pool=7, num_classes=10, fc2=True, dropout=0.5):
    super().__init__()
    self.features, c = _vgg_features(cfg)
    self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
    self.classifier = _mlp(c * pool * pool, hidden, num_classes, dropout)
    if fc2:
      self.classifier_2 = _mlp(c * pool * pool, hidden, num_classes, dropout)

  def forward(self, x):
    f = self.features(x)
    p = torch.flatten(self.avgpool(f), 1)
    out = {'features': f, 'logits': self.classifier(p)}
    if hasattr(self, 'classifier_2'):
      out['logits2'] = self.classifier_2(p)
    return out


def build_torch_model(
  arch: str,
  num_classes: int = 10,
  *,
  family: str = 'cam',
  large_feature_map: bool = False,
  fc2: bool = True,
) -> nn.Module:
  """Torch twin of ``dualsig_jax.models.build_model(arch, ..., family=...)`` (eval mode)."""
  lfm = large_feature_map
  if family == 'standard' and arch in ('vgg16', 'vgg_tiny', 'inception_v3'):
    if arch == 'vgg16':
      m = TorchVGGStandard(vgg_cfg(VGG16_CFG, lfm), 4096, 7, num_classes, fc2)
    elif arch == 'vgg_tiny':
      m = TorchVGGStandard(vgg_cfg(VGG_TINY_CFG, lfm), 64, 3, num_classes, fc2)
    else:
      m = TorchInceptionStandard(num_classes, fc2)
    return m.eval()
  if family not in ('cam', 'standard'):
    raise ValueError(f'unknown family {family!r}')
  # The standard ResNets are the CAM ones.
  if arch == 'vgg16':
    m = TorchVGGCam(vgg_cfg(VGG16_CFG, lfm), 1024, num_classes, fc2)
  elif arch == 'vgg_tiny':
    m = TorchVGGCam(vgg_cfg(VGG_TINY_CFG, lfm), 128, num_classes, fc2)
  elif arch == 'resnet50':
    m = TorchResNetCam(num_classes=num_classes, large_feature_map=lfm, fc2=fc2)
  elif arch == 'resnet_tiny':
    m = TorchResNetCam((1, 1, 1, 1), (8, 16, 32, 32), 16, num_classes, lfm, fc2)
  elif arch in ('resnet18', 'resnet34'):
    blocks = (2, 2, 2, 2) if arch == 'resnet18' else (3, 4, 6, 3)
    m = TorchResNetCam(blocks, num_classes=num_classes, large_feature_map=lfm, fc2=fc2,
                       block=BasicBlock)  # fmt: skip
  elif arch == 'inception_v3':
    m = TorchInceptionCam(num_classes, lfm, fc2)
  else:
    raise ValueError(f'unknown arch {arch!r}')
  return m.eval()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Give every BatchNorm non-trivial affine params and running stats (so the parity
  test really checks the BN mapping) and small random biases; returns ``model``."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      n = m.num_features
      m.weight.copy_(0.5 + torch.rand(n, generator=g))
      m.bias.copy_(0.1 * torch.randn(n, generator=g))
      m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
      m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
      m.bias.copy_(0.01 * torch.randn(m.bias.shape, generator=g))
  return model
