"""PyTorch versions of the CAM backbones that ``bench/bench_accelerator.py`` races against.

Same layers and parameter names as torchvision / wsolevaluation (plus the dual-branch ``fc2``
head), so ``dualsig_jax.convert.flax_to_torch`` output loads with ``load_state_dict(strict=True)``
and both frameworks time the very same network with the very same weights. Tensors are NCHW.

Each model has ``backbone(x [B,3,H,W]) -> features [B,C,h,w]``, ``head(features) -> (logits,
logits2)`` (GAP + ``fc`` / ``fc2``, each ``[B,K]``) and ``forward(x) -> (features, logits,
logits2)``; the split lets Grad-CAM differentiate the head alone, as ``dualsig_jax.cam`` does.

Only ``resnet50``, ``resnet_tiny``, ``vgg16`` and ``vgg_tiny`` are mirrored (what the benchmark
needs). :func:`train_step_fn` and :func:`cam_fn` build the benchmark's PyTorch calls. Importing
this module needs torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dualsig_jax.models.vgg import VGG16_CFG, VGG_TINY_CFG, vgg_cfg

ARCHS = ('resnet50', 'resnet_tiny', 'vgg16', 'vgg_tiny')


class _GapHeads(nn.Module):
  """Shared head: global average pool, then the softmax (``fc``) and sigmoid (``fc2``) heads."""

  def head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pooled = features.mean(dim=(2, 3))
    return self.fc(pooled), self.fc2(pooled)

  def forward(self, x: torch.Tensor):
    features = self.backbone(x)
    return (features, *self.head(features))


class VGGCamTorch(_GapHeads):
  """VGG-CAM: ``features`` (conv3x3 + ReLU, 2x2 max pools at 'M') -> ``conv6`` + ReLU."""

  def __init__(self, cfg, conv6_channels: int, num_classes: int):
    super().__init__()
    layers: list[nn.Module] = []
    channels = 3
    for item in cfg:
      if item == 'M':
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        continue
      # Conv then ReLU: two Sequential slots, so conv indices match torchvision's keys.
      layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      channels = item
    self.features = nn.Sequential(*layers)
    self.conv6 = nn.Conv2d(channels, conv6_channels, kernel_size=3, padding=1)
    self.fc = nn.Linear(conv6_channels, num_classes)
    self.fc2 = nn.Linear(conv6_channels, num_classes)

  def backbone(self, x):
    return torch.relu(self.conv6(self.features(x)))


class _Bottleneck(nn.Module):
  """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

  def __init__(self, in_channels: int, planes: int, stride: int):
    super().__init__()
    out_channels = 4 * planes
    self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out_channels)
    self.downsample = None
    if stride != 1 or in_channels != out_channels:
      self.downsample = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
      )

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return torch.relu(y + shortcut)


class ResNetCamTorch(_GapHeads):
  """ResNet-CAM with wsolevaluation's strides: layer4 keeps layer3's resolution (stride 1)."""

  def __init__(self, blocks, planes, stem: int, num_classes: int, large_feature_map: bool):
    super().__init__()
    self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(stem)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    strides = (1, 2, 1 if large_feature_map else 2, 1)
    channels = stem
    for index, (count, width, stride) in enumerate(zip(blocks, planes, strides)):
      layer = []
      for j in range(count):
        layer.append(_Bottleneck(channels, width, stride if j == 0 else 1))
        channels = 4 * width
      self.add_module(f'layer{index + 1}', nn.Sequential(*layer))
    self.fc = nn.Linear(channels, num_classes)
    self.fc2 = nn.Linear(channels, num_classes)

  def backbone(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def build_torch_cam_model(
  arch: str, num_classes: int, *, large_feature_map: bool = False
) -> nn.Module:
  """The torch mirror of ``dualsig_jax.models.build_model(arch, num_classes, ...)``.

  Returns a freshly initialised module (load weights with ``load_state_dict``). Unknown
  ``arch`` -> ``ValueError`` listing :data:`ARCHS`.
  """
  if arch == 'vgg16':
    return VGGCamTorch(vgg_cfg(VGG16_CFG, large_feature_map), 1024, num_classes)
  if arch == 'vgg_tiny':
    return VGGCamTorch(vgg_cfg(VGG_TINY_CFG, large_feature_map), 128, num_classes)
  if arch == 'resnet50':
    return ResNetCamTorch((3, 4, 6, 3), (64, 128, 256, 512), 64, num_classes, large_feature_map)
  if arch == 'resnet_tiny':
    return ResNetCamTorch((1, 1, 1, 1), (8, 16, 32, 32), 16, num_classes, large_feature_map)
  raise ValueError(f'unknown arch {arch!r}; valid: {", ".join(ARCHS)}')


def train_step_fn(
  model: nn.Module,
  images: torch.Tensor,
  labels: torch.Tensor,
  *,
  stage: str,
  num_classes: int,
  autocast: Callable,
) -> Callable[[], torch.Tensor]:
  """One eager SGD step per call, as the reference trains; returns ``call() -> loss``.

  ``stage='vanilla'``: everything but ``fc2`` trains on softmax CE, BatchNorm on batch
  statistics with running averages updated. ``'dual'``: only ``fc2`` trains on BCE-with-logits
  (one-hot targets, ``pos_weight = K - 1``) plus the logged, gradient-free CE; BatchNorm on
  batch statistics, running averages left unchanged. ``images`` ``[B,3,H,W]`` float32,
  ``labels`` ``[B]`` int64, on the model's device; ``autocast()`` wraps the forward pass.
  """
  if stage not in ('vanilla', 'dual'):
    raise ValueError(f'unknown stage {stage!r}; valid: vanilla, dual')
  model.train()
  for name, p in model.named_parameters():
    head = name.split('.')[0]
    p.requires_grad_(head == 'fc2' if stage == 'dual' else head != 'fc2')
  if stage == 'dual':
    # momentum 0 keeps the running averages as they are, at the same cost as updating them:
    # the JAX step's keep_batch_stats=False.
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.momentum = 0.0
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
  pos_weight = torch.full((num_classes,), num_classes - 1.0, device=images.device)
  bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
  onehot = F.one_hot(labels, num_classes).float()

  def call():
    with autocast():
      _, logits, logits2 = model(images)
    ce = F.cross_entropy(logits.float(), labels)
    loss = ce if stage == 'vanilla' else bce(logits2.float(), onehot) + ce.detach()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  return call


def _postprocess(raw: torch.Tensor, size, mode: str) -> torch.Tensor:
  """``[B, h, w]`` -> resized to ``size``, min-max normalised per map, ``[B, H, W]`` float32."""
  m = F.interpolate(raw[:, None].float(), size=size, mode=mode, align_corners=False)[:, 0]
  lo = m.amin(dim=(1, 2), keepdim=True)
  hi = m.amax(dim=(1, 2), keepdim=True)
  return (m - lo) / (hi - lo + 1e-7)


def cam_fn(
  model: nn.Module, images: torch.Tensor, *, method: str, autocast: Callable
) -> Callable[[], list[torch.Tensor]]:
  """Maps of both heads for the softmax head's top class; returns ``call() -> [softmax,
  sigmoid]`` maps ``[B, H, W]`` float32 in [0, 1] (H, W of ``images`` ``[B,3,H,W]``).

  ``'cam'``: one forward, channel weights = the head's row of the target class (clamped at 0
  for the sigmoid head), bicubic resize. ``'gradcam'``: the backbone without autograd, then
  autograd through the head alone w.r.t. the feature map; weights = mean gradient (clamped for
  the sigmoid head), ReLU, bilinear resize.
  """
  if method not in ('cam', 'gradcam'):
    raise ValueError(f'unknown method {method!r}; valid: cam, gradcam')
  model.eval()
  for p in model.parameters():
    p.requires_grad_(False)
  size = tuple(images.shape[2:])

  def call():
    with torch.no_grad(), autocast():
      features = model.backbone(images)
    maps = []
    if method == 'cam':
      with torch.no_grad():
        f = features.float()
        target = model.fc(f.mean(dim=(2, 3))).argmax(1)
        for layer, clamp in ((model.fc, False), (model.fc2, True)):
          w = layer.weight[target]
          w = w.clamp(min=0) if clamp else w
          maps.append(_postprocess(torch.einsum('bc,bchw->bhw', w, f), size, 'bicubic'))
      return maps
    f = features.float().requires_grad_(True)
    logits, logits2 = model.head(f)
    target = logits.argmax(1)[:, None]
    for out, clamp in ((logits, False), (logits2, True)):
      (g,) = torch.autograd.grad(out.gather(1, target).sum(), f, retain_graph=True)
      w = g.mean(dim=(2, 3))
      w = w.clamp(min=0) if clamp else w
      with torch.no_grad():
        raw = torch.relu(torch.einsum('bc,bchw->bhw', w, f))
        maps.append(_postprocess(raw, size, 'bilinear'))
    return maps

  return call
