"""The PyTorch side of ``bench/bench_accelerator.py``: one training step and the CAM maps.

The models are the shared torch mirrors (``bench/torch_models.py``, also used by the parity
tests): torchvision / wsolevaluation parameter names plus the dual-branch ``fc2``, so
``dualsig_jax.convert.flax_to_torch`` output loads with ``load_state_dict(strict=True)`` and
both frameworks time the very same network with the very same weights. Tensors are NCHW.
Importing this module needs torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch_models
from torch import nn

ARCHS = ('resnet50', 'resnet_tiny', 'vgg16', 'vgg_tiny')


def build_torch_cam_model(
  arch: str, num_classes: int, *, large_feature_map: bool = False
) -> nn.Module:
  """The torch mirror of ``dualsig_jax.models.build_model(arch, num_classes)`` (CAM family).

  Its ``forward(x)`` returns ``{'features', 'logits', 'logits2'}``. Unknown ``arch`` ->
  ``ValueError`` listing :data:`ARCHS`.
  """
  if arch not in ARCHS:
    raise ValueError(f'unknown arch {arch!r}; valid: {", ".join(ARCHS)}')
  return torch_models.build_torch_model(arch, num_classes, large_feature_map=large_feature_map)


def _head(model: nn.Module, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """GAP then the softmax (``fc``) and sigmoid (``fc2``) heads: ``(logits, logits2)``."""
  pooled = features.mean(dim=(2, 3))
  return model.fc(pooled), model.fc2(pooled)


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
      out = model(images)
      logits, logits2 = out['logits'], out['logits2']
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
      features = model(images)['features']
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
    logits, logits2 = _head(model, f)
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
