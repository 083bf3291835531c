"""The dual stage trains as the PyTorch reference trains it, not only infers the same.

`_reference_dual_stage` is a torch mirror of the reference's loop, written from
REFERENCE_CODE.md: freeze everything but the sigmoid head (BatchNorm `.eval()` then
`track_running_stats = False`, `affine = False`), then `model.train()` (so BatchNorm normalises
with the batch statistics and never updates its running ones, dropout is on); SGD Nesterov with
the name-based parameter groups; `adjust_learning_rate(epoch + 1)` at the start of each epoch
(x0.1 when the 1-based epoch is a multiple of the frequency); class-balanced
`BCEWithLogitsLoss(pos_weight=C-1)` plus the (gradient-free) softmax CE.

The JAX side is the library's own pieces as the training loop wires them: stage settings from
the config, `optim.make_optimizer`, `state.train_step`. Both get the same weights and batches
(no augmentation); the sigmoid head must agree to 1e-5 relative after several steps across an
lr decay.
"""

import functools

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax
import jax.numpy as jnp
from torch_models import build_torch_model, randomize_

from dualsig_jax import convert, defaults, models
from dualsig_jax.train import optim, stage
from dualsig_jax.train.state import create_state, train_step

K = 5  # classes
BATCH = 8
SPE = 2  # steps per epoch
EPOCHS = 3
FREQ = 2  # reference rule: epochs 2 and 3 at lr / 10 (StepLR would decay only epoch 3)


def _config(arch, family='cam', dropout_rate=0.0, **dual):
  c = defaults.base_config()
  c.model.arch = arch
  c.model.family = family
  c.model.num_classes = K
  c.model.dropout_rate = dropout_rate  # dropout masks cannot match across frameworks
  c.input.crop_size = 32
  c.input.resize_size = 32
  c.input.batch_size = BATCH
  c.dual.update(
    dict(lr=0.05, lr_decay_frequency=FREQ, num_epochs=EPOCHS, weight_decay=5e-4, **dual)
  )
  c.lock()
  return c


def _batches(seed, size=32, n=SPE * EPOCHS, batch=BATCH):
  rng = np.random.default_rng(seed)
  return [
    {
      'image': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
      'label': rng.integers(0, K, size=(batch,)).astype(np.int32),
    }
    for _ in range(n)
  ]


def _reference_dual_stage(
  model, batches, *, lr, ratio, wd, head_prefix, feature_patterns, patterns_mean_feature
):
  """Torch mirror of the reference's dual stage; returns the trained model."""
  for name, p in model.named_parameters():
    p.requires_grad = name.startswith(head_prefix)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.eval()
      m.track_running_stats = False
      m.affine = False
  model.train()  # main.py:266: undoes the .eval() above

  feature, classifier = [], []
  for name, p in model.named_parameters():
    matched = any(pat in name for pat in feature_patterns)
    is_feature = matched if patterns_mean_feature else not matched
    (feature if is_feature else classifier).append(p)
  opt = torch.optim.SGD(
    [{'params': feature, 'lr': lr}, {'params': classifier, 'lr': lr * ratio}],
    lr=lr,
    momentum=0.9,
    weight_decay=wd,
    nesterov=True,
  )
  bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.full((K,), K - 1.0))
  it = iter(batches)
  for epoch in range(EPOCHS):
    e = epoch + 1  # adjust_learning_rate(epoch + 1)
    if e != 0 and e % FREQ == 0:
      for g in opt.param_groups:
        g['lr'] *= 0.1
    for _ in range(SPE):
      b = next(it)
      x = torch.from_numpy(b['image']).permute(0, 3, 1, 2).contiguous()
      y = torch.from_numpy(b['label']).long()
      out = model(x)
      onehot = torch.nn.functional.one_hot(y, K).float()
      loss = bce(out['logits2'], onehot) + torch.nn.functional.cross_entropy(out['logits'], y)
      opt.zero_grad()
      loss.backward()
      opt.step()
  return model


def _jax_dual_stage(config, variables, batches):
  """The library's dual stage on the given batches; returns the final TrainState."""
  s = stage.stage_settings(config, 'dual')
  model = stage.build_stage_model(config, 'dual')
  tx, _, _ = optim.make_optimizer(
    variables['params'],
    arch=config.model.arch,
    family=config.model.family,
    stage='dual',
    optim_cfg=s.section,
    steps_per_epoch=SPE,
    unfreeze=s.unfreeze,
  )
  state = create_state(variables, tx, config.seed)
  # The loop's own binding: pos_weight C - 1, the stage's BatchNorm mode.
  assert stage.step_kwargs(config, 'dual')['pos_weight'] == K - 1.0
  step = jax.jit(
    functools.partial(train_step, model=model, tx=tx, **stage.step_kwargs(config, 'dual'))
  )
  for b in batches:
    state, _ = step(state, {k: jnp.asarray(v) for k, v in b.items()})
  return state


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _fresh_torch_head(module):
  """The reference's fresh init of a Linear sigmoid head: normal(0, 0.01), bias 0."""
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.Linear):
        torch.nn.init.normal_(m.weight, 0, 0.01)
        torch.nn.init.zeros_(m.bias)


def test_resnet_cam_dual_stage_matches_the_reference_loop():
  """ResNet-CAM (narrow widths), BatchNorm on batch statistics, lr decay inside the run."""
  torch.manual_seed(0)
  tm = randomize_(build_torch_model('resnet_tiny', K), seed=3)
  _fresh_torch_head(tm.fc2)
  sd = {k: v.clone() for k, v in tm.state_dict().items()}
  variables = convert.torch_to_flax(sd, 'resnet_tiny', num_classes=K)
  start = jax.tree.map(np.array, variables)
  batches = _batches(0)

  config = _config('resnet_tiny')
  state = _jax_dual_stage(config, variables, batches)
  # ResNet grouping: 'layer4.' / 'fc.' are the classifier group; fc2 is lr x 1 (quirk).
  ref = _reference_dual_stage(
    tm,
    batches,
    lr=0.05,
    ratio=10.0,
    wd=5e-4,
    head_prefix='fc2.',
    feature_patterns=('layer4.', 'fc.'),
    patterns_mean_feature=False,
  )
  w = ref.fc2.weight.detach().numpy().T
  b = ref.fc2.bias.detach().numpy()
  assert _rel(state.params['fc2']['kernel'], w) < 1e-5
  assert _rel(state.params['fc2']['bias'], b) < 1e-5
  # The head moved well beyond the tolerance (the check is not vacuous).
  assert _rel(start['params']['fc2']['kernel'], w) > 1e-2
  # Frozen: everything but fc2 bit-identical, running statistics never updated.
  for coll in ('params', 'batch_stats'):
    got = jax.tree_util.tree_leaves_with_path(jax.device_get(getattr(state, coll)))
    want = dict(jax.tree_util.tree_leaves_with_path(start[coll]))
    for path, v in got:
      if coll == 'params' and path[0].key == 'fc2':
        continue
      np.testing.assert_array_equal(v, want[path], err_msg=jax.tree_util.keystr(path))


def test_inference_mode_backbone_differs_from_batch_statistics():
  """The option backbone_mode='inference' (running statistics) is a different experiment."""
  tm = randomize_(build_torch_model('resnet_tiny', K), seed=3)
  _fresh_torch_head(tm.fc2)
  variables = convert.torch_to_flax(tm.state_dict(), 'resnet_tiny', num_classes=K)
  batches = _batches(0, n=2)
  a = _jax_dual_stage(_config('resnet_tiny'), variables, batches)
  b = _jax_dual_stage(_config('resnet_tiny', backbone_mode='inference'), variables, batches)
  assert _rel(a.params['fc2']['kernel'], b.params['fc2']['kernel']) > 1e-4


def test_standard_vgg_mlp_head_dual_stage_matches_the_reference_loop():
  """The standard VGG (wsol/vgg.py) whose sigmoid branch is a whole MLP (classifier_2), at
  narrow widths (vgg_tiny standard: hidden 64, 3x3 adaptive pool); dropout off on both sides."""
  from torch_models import TorchVGGStandard

  from dualsig_jax.models.vgg import VGG_TINY_CFG, vgg_cfg

  torch.manual_seed(1)
  tm = TorchVGGStandard(vgg_cfg(VGG_TINY_CFG, False), 64, 3, K, True, dropout=0.0)
  randomize_(tm, seed=4)
  _fresh_torch_head(tm.classifier_2)
  variables = convert.torch_to_flax(tm.state_dict(), 'vgg_tiny', family='standard', num_classes=K)
  start = jax.tree.map(np.array, variables)
  batches = _batches(1)

  config = _config('vgg_tiny', family='standard')
  state = _jax_dual_stage(config, variables, batches)
  # VGG grouping: 'features.' is the feature group, everything else (classifier_2) lr x 10.
  ref = _reference_dual_stage(
    tm,
    batches,
    lr=0.05,
    ratio=10.0,
    wd=5e-4,
    head_prefix='classifier_2.',
    feature_patterns=('features.',),
    patterns_mean_feature=True,
  )
  back = convert.flax_to_torch(jax.device_get(state.variables()), 'vgg_tiny', family='standard')
  n_checked = 0
  for key, want in ref.state_dict().items():
    if not key.startswith('classifier_2.'):
      continue
    got = np.asarray(back[key])
    assert _rel(got, want.numpy()) < 1e-5, key
    n_checked += 1
  assert n_checked == 6  # three Linears, weight and bias
  moved = convert.flax_to_torch(start, 'vgg_tiny', family='standard')
  assert (
    _rel(np.asarray(moved['classifier_2.6.weight']), ref.classifier_2[6].weight.detach().numpy())
    > 1e-2
  )
  # The softmax MLP and the features are untouched.
  for key in ('classifier.0.weight', 'features.0.weight'):
    np.testing.assert_array_equal(np.asarray(back[key]), np.asarray(moved[key]))


def _no_dropout(model):
  for m in model.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = 0.0
  return model


def test_inception_cam_dual_stage_matches_the_reference_loop_without_dropout(monkeypatch):
  """InceptionV3-CAM at 96 px: 1x1-conv sigmoid head SPG_A4_2 (xavier_uniform start), BatchNorm
  on batch statistics, lr decay inside the run; dropout off on both sides."""
  # The mirror, like wsolevaluation's InceptionCam, calls F.dropout(x, 0.5, self.training).
  monkeypatch.setattr(torch.nn.functional, 'dropout', lambda x, *a, **k: x)
  torch.manual_seed(2)
  tm = _no_dropout(randomize_(build_torch_model('inception_v3', K), seed=5))
  with torch.no_grad():
    torch.nn.init.xavier_uniform_(tm.SPG_A4_2.weight)
    torch.nn.init.zeros_(tm.SPG_A4_2.bias)
  variables = convert.torch_to_flax(tm.state_dict(), 'inception_v3', num_classes=K)
  start = np.array(variables['params']['fc2']['kernel'])
  batches = _batches(2, size=96, batch=4)
  state = _jax_dual_stage(_config('inception_v3'), variables, batches)
  ref = _reference_dual_stage(
    tm,
    batches,
    lr=0.05,
    ratio=10.0,
    wd=5e-4,
    head_prefix='SPG_A4_2.',
    feature_patterns=('Mixed', 'Conv2d_1', 'Conv2d_2', 'Conv2d_3', 'Conv2d_4'),
    patterns_mean_feature=True,
  )
  want = ref.SPG_A4_2.weight.detach().numpy()  # [K, C, 1, 1]
  got = np.transpose(np.asarray(state.params['fc2']['kernel']), (3, 2, 0, 1))
  assert _rel(got, want) < 1e-5
  assert _rel(state.params['fc2']['bias'], ref.SPG_A4_2.bias.detach().numpy()) < 1e-5
  assert _rel(np.transpose(start, (3, 2, 0, 1)), want) > 1e-2


def test_dropout_is_active_in_the_dual_stage_by_default():
  """The reference's model.train() leaves Inception's dropouts on during the dual stage: with
  the default config the sigmoid logits of one batch depend on the dropout rng."""
  config = _config('inception_v3', dropout_rate=0.5)
  assert config.model.dropout_rate == defaults.base_config().model.dropout_rate == 0.5
  s = stage.stage_settings(config, 'dual')
  assert s.train_mode and not s.keep_batch_stats
  model = stage.build_stage_model(config, 'dual')
  variables = models.init_variables(model, 0, 96)
  x = jnp.asarray(_batches(3, size=96, n=1, batch=2)[0]['image'])

  @jax.jit
  def sigmoid_logits(key):
    out, _ = model.apply(
      variables, x, train=s.train_mode, mutable=['batch_stats'], rngs={'dropout': key}
    )
    return out['sigmoid_logits']

  def logits(seed):
    return np.asarray(sigmoid_logits(jax.random.PRNGKey(seed)))

  assert not np.allclose(logits(0), logits(1))
  np.testing.assert_array_equal(logits(0), logits(0))
