"""dual_branch: a user's plain Flax CNN becomes a dual-branch model that the project's dual-stage
train_step trains (only fc2 moves) and the CAM family explains, for MLP, linear and 1x1-conv heads.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dualsig_jax import cam, defaults
from dualsig_jax.models.dual_branch import (
  cam_fns,
  dual_branch,
  from_single_head,
  infer_head_kind,
  init_sigmoid_head,
)
from dualsig_jax.train import optim
from dualsig_jax.train.state import create_state, train_step

K = 3
SIZE = 16
GRAD_METHODS = ('gradcam', 'gradcam++', 'xgradcam', 'layercam')


# ----- the user's models (nothing here knows about dualsig_jax) -----------------------------


class Features(nn.Module):
  """conv -> BN -> ReLU -> stride-2 conv -> BN -> ReLU: [B, 16, 16, 3] -> [B, 8, 8, 16]."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    for width, stride in ((8, 1), (16, 2)):
      x = nn.Conv(width, (3, 3), strides=stride)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return x


class MLPHead(nn.Module):
  """Dense -> ReLU -> dropout -> Dense on pooled features [B, C]."""

  num_classes: int

  @nn.compact
  def __call__(self, z, train: bool = False):
    z = nn.relu(nn.Dense(32)(z))
    z = nn.Dropout(0.3, deterministic=not train)(z)
    return nn.Dense(self.num_classes)(z)


class MLPNet(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    f = Features(name='features')(x, train)
    return MLPHead(self.num_classes, name='head')(f.mean(axis=(1, 2)), train)


class FlatNet(nn.Module):
  """Layers at the top level and a ``features`` method (recipe-1 style); linear or 1x1-conv head."""

  num_classes: int
  conv_head: bool = False

  def setup(self):
    self.conv1 = nn.Conv(8, (3, 3))
    self.bn1 = nn.BatchNorm(momentum=0.9)
    self.conv2 = nn.Conv(16, (3, 3), strides=2)
    self.fc = nn.Conv(self.num_classes, (1, 1)) if self.conv_head else nn.Dense(self.num_classes)

  def features(self, x, train: bool = False):
    x = nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    return nn.relu(self.conv2(x))

  def __call__(self, x, train: bool = False):
    f = self.features(x, train)
    if self.conv_head:
      return self.fc(f).mean(axis=(1, 2))
    return self.fc(f.mean(axis=(1, 2)))


def _data(n, seed):
  """Class k = a bright square in one of K places, on noise: learnable in a few steps."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, K, size=n).astype(np.int32)
  images = rng.normal(0.0, 0.5, size=(n, SIZE, SIZE, 3)).astype(np.float32)
  for i, k in enumerate(labels):
    images[i, 2 + 4 * k : 6 + 4 * k, 2 + 4 * k : 6 + 4 * k] += 2.0
  return {'image': images, 'label': labels}


def _train_user(net, steps=6, seed=0):
  """A short softmax-classifier training of the user's own model (its own loop)."""
  x0 = jnp.zeros((1, SIZE, SIZE, 3))
  variables = net.init(jax.random.key(seed), x0, train=False)
  tx = optax.sgd(0.1, momentum=0.9)

  @jax.jit
  def step(params, stats, opt, batch, key):
    def loss(p):
      logits, upd = net.apply(
        {'params': p, 'batch_stats': stats},
        batch['image'],
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': key},
      )
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
      return ce, upd['batch_stats']

    (_, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), stats, opt

  params, stats = variables['params'], variables['batch_stats']
  opt = tx.init(params)
  for i in range(steps):
    params, stats, opt = step(params, stats, opt, _data(32, 100 + i), jax.random.key(i))
  return {'params': params, 'batch_stats': stats}


# ----- the project's dual stage on the wrapped model ----------------------------------------


def _dual_tx(params):
  cfg = defaults.base_config().dual
  cfg.lr = 0.05
  tx, labels, _ = optim.make_optimizer(
    params, arch=None, stage='dual', optim_cfg=cfg, steps_per_epoch=10
  )
  for path, lab in jax.tree_util.tree_flatten_with_path(labels)[0]:
    assert lab == ('feature' if path[0].key == 'fc2' else 'frozen'), (path, lab)
  return tx


def _dual_train(model, variables, steps=4, *, train_mode):
  tx = _dual_tx(variables['params'])
  state = create_state(jax.tree.map(jnp.array, variables), tx, seed=0)
  step = jax.jit(
    functools.partial(
      train_step,
      model=model,
      tx=tx,
      stage='dual',
      # True: the reference's dual stage (batch statistics, dropout, running stats dropped);
      # False: dual.backbone_mode='inference'.
      train_mode=train_mode,
      keep_batch_stats=False,
      pos_weight=K - 1.0,
      gamma=1.0,
      temp=1.0,
    )
  )
  for i in range(steps):
    state, metrics = step(state, _data(16, 200 + i))
  assert np.isfinite(float(metrics['bce']))
  return jax.device_get(state.variables())


def _equal(a, b):
  return all(
    np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(*map(jax.tree.leaves, (a, b)))
  )


def _check_only_fc2_moved(before, after):
  assert jax.tree.structure(before) == jax.tree.structure(after)
  for name in before['params']:
    same = _equal(before['params'][name], after['params'][name])
    assert same == (name != 'fc2'), f'{name}: unchanged={same}'
  assert _equal(before['batch_stats'], after['batch_stats'])


def _manual_cam(features, w, targets, truncate):
  """sum_c w_c F_c (ReLU(w) for the sigmoid head), min-max normalised."""
  cw = np.asarray(w)[:, np.asarray(targets)].T
  if truncate:
    cw = np.maximum(cw, 0.0)
  raw = np.einsum('bhwc,bc->bhw', np.asarray(features, np.float64), cw)
  raw = raw - raw.min(axis=(1, 2), keepdims=True)
  return raw / raw.max(axis=(1, 2), keepdims=True)


# ----- tests ---------------------------------------------------------------------------------


def test_head_kind_inference_and_bad_arguments():
  assert infer_head_kind(nn.Dense(K)) == 'linear'
  assert infer_head_kind(nn.Conv(K, (1, 1))) == 'conv'
  assert infer_head_kind(MLPHead(K)) == 'mlp'
  with pytest.raises(ValueError, match='1x1'):
    infer_head_kind(nn.Conv(K, (3, 3)))
  with pytest.raises(ValueError, match='head_kind'):
    dual_branch(Features(), nn.Dense(K), head_kind='attention')
  with pytest.raises(ValueError, match='no method'):
    dual_branch(Features(), nn.Dense(K), features_method='feats')
  model = dual_branch(Features(), lambda: MLPHead(K))
  assert model.head_kind == 'mlp'
  v = MLPNet(K).init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  with pytest.raises(ValueError, match='head_key'):
    from_single_head(model, v, head_key='classifier', features_key='features')
  # The whole model as "features": the head's params end up in the backbone too -> caught.
  with pytest.raises(ValueError, match='do not fit'):
    from_single_head(model, v, head_key='head', features_key=None, input_shape=(1, SIZE, SIZE, 3))


def test_mlp_head_dual_stage_and_gradient_cams():
  net = MLPNet(K)
  user = _train_user(net)
  model = dual_branch(Features(), MLPHead(K))
  variables = from_single_head(
    model, user, head_key='head', features_key='features', input_shape=(1, SIZE, SIZE, 3)
  )
  assert set(variables['params']) == {'backbone', 'fc', 'fc2'}
  fc2_kernels = [a for p, a in jax.tree_util.tree_flatten_with_path(variables['params']['fc2'])[0]]
  assert all(0.003 < float(jnp.std(a)) < 0.03 for a in fc2_kernels if a.ndim == 2)

  x = jnp.asarray(_data(8, 7)['image'])
  out = model.apply(variables, x)
  assert out['features'].shape == (8, 8, 8, 16) and out['features'].dtype == jnp.float32
  assert out['softmax_logits'].shape == out['sigmoid_logits'].shape == (8, K)
  user_logits = net.apply(user, x)
  np.testing.assert_allclose(out['softmax_logits'], user_logits, rtol=1e-5, atol=1e-6)

  # The model's own stop-gradient (independent of the optimizer's mask), with train=True:
  # BatchNorm on batch statistics, dropout on.
  def loss(p):
    o, _ = model.apply(
      {'params': p, 'batch_stats': variables['batch_stats']},
      x,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(1)},
    )
    return o['softmax_logits'].sum() + (o['sigmoid_logits'] ** 2).sum(), o['features']

  grads, f_train = jax.grad(loss, has_aux=True)(variables['params'])
  for name in ('backbone', 'fc'):
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads[name])), name
  assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads['fc2']))
  assert not np.allclose(f_train, out['features']), 'train=True did not reach BatchNorm'

  trained = _dual_train(model, variables, train_mode=True)
  _check_only_fc2_moved(variables, trained)
  after = model.apply(trained, x)
  np.testing.assert_array_equal(after['softmax_logits'], out['softmax_logits'])
  assert not np.allclose(after['sigmoid_logits'], out['sigmoid_logits'])

  fns = cam_fns(model)
  maps, targets = cam.compute_cams_multi(
    fns['apply_fn'], trained, x, methods=GRAD_METHODS, head_fn=fns['head_fn']
  )
  np.testing.assert_array_equal(targets, np.argmax(user_logits, axis=-1))
  for (m, b), mp in maps.items():
    mp = np.asarray(mp)
    assert mp.shape == (8, SIZE, SIZE) and mp.dtype == np.float32, (m, b)
    assert np.isfinite(mp).all() and mp.min() >= 0.0 and mp.max() <= 1.0, (m, b)
    assert (mp.max(axis=(1, 2)) > 0.99).mean() > 0.5, (m, b)  # not collapsed to zeros
  assert not np.allclose(maps[('gradcam', 'softmax')], maps[('gradcam', 'sigmoid')])

  # The softmax branch's Grad-CAM equals the user's own model seen through recipe 1.
  def user_apply(v, images):
    f = Features().apply(
      {'params': v['params']['features'], 'batch_stats': v['batch_stats']['features']}, images
    )
    return {'features': f, 'softmax_logits': net.apply(v, images)}

  def user_head(v, f):
    return {'softmax_logits': MLPHead(K).apply({'params': v['params']['head']}, f.mean((1, 2)))}

  ref, _ = cam.compute_cams(
    user_apply, user, x, method='gradcam', branch='softmax', head_fn=user_head
  )
  np.testing.assert_allclose(maps[('gradcam', 'softmax')], ref, atol=1e-5)

  with pytest.raises(ValueError, match='plain CAM needs a linear head'):
    cam.compute_cams(
      fns['apply_fn'], trained, x, method='cam', **{'head_weights_fn': fns['head_weights_fn']}
    )


@pytest.mark.parametrize('conv_head', [False, True], ids=['linear', 'conv1x1'])
def test_linear_and_conv_heads_plain_cam(conv_head):
  net = FlatNet(K, conv_head=conv_head)
  user = _train_user(net, steps=3)
  head = nn.Conv(K, (1, 1)) if conv_head else nn.Dense(K)
  model = dual_branch(net, head, features_method='features')
  assert model.head_kind == ('conv' if conv_head else 'linear')
  variables = from_single_head(model, user, head_key='fc', input_shape=(1, SIZE, SIZE, 3))
  assert set(variables['params']['backbone']) == {'conv1', 'bn1', 'conv2'}
  k2 = np.asarray(variables['params']['fc2']['kernel'])
  if conv_head:  # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert k2.shape == (1, 1, 16, K) and np.abs(k2).max() <= np.sqrt(6.0 / (16 + K))
  else:
    assert k2.shape == (16, K) and 0.003 < k2.std() < 0.03
  assert not np.any(np.asarray(variables['params']['fc2']['bias']))

  x = jnp.asarray(_data(8, 9)['image'])
  np.testing.assert_allclose(
    model.apply(variables, x)['softmax_logits'], net.apply(user, x), rtol=1e-5, atol=1e-6
  )
  trained = _dual_train(model, variables, steps=2, train_mode=False)
  _check_only_fc2_moved(variables, trained)

  fns = cam_fns(model)
  feats = fns['apply_fn'](trained, x)['features']
  maps, targets = cam.compute_cams_multi(
    fns['apply_fn'],
    trained,
    x,
    methods=('cam', 'gradcam'),
    output_size=feats.shape[1:3],
    head_fn=fns['head_fn'],
    head_weights_fn=fns['head_weights_fn'],
  )
  for branch, name, truncate in (('softmax', 'fc', False), ('sigmoid', 'fc2', True)):
    w = np.asarray(trained['params'][name]['kernel']).reshape(16, K)
    want = _manual_cam(feats, w, targets, truncate)
    np.testing.assert_allclose(maps[('cam', branch)], want, atol=1e-5)
    assert maps[('gradcam', branch)].shape == (8, 8, 8)


class MaxPoolHead(nn.Module):
  """A head that pools the map itself (global max, then Dense); switch named ``deterministic``."""

  num_classes: int

  @nn.compact
  def __call__(self, f, deterministic: bool = True):
    z = nn.Dropout(0.5, deterministic=deterministic)(f.max(axis=(1, 2)))
    return nn.Dense(self.num_classes)(z)


def test_map_head_clone_init_and_inverted_train_switch():
  model = dual_branch(Features(), lambda: MaxPoolHead(K), head_kind='map')
  v = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  v = init_sigmoid_head(v, mode='clone')
  x = jnp.asarray(_data(4, 3)['image'])
  out = model.apply(v, x)
  np.testing.assert_array_equal(out['sigmoid_logits'], out['softmax_logits'])
  # train=True reaches the head as deterministic=False: dropout changes the logits.
  noisy, _ = model.apply(
    v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(2)}
  )
  assert not np.allclose(noisy['softmax_logits'], out['softmax_logits'])
  fns = cam_fns(model)
  maps, _ = cam.compute_cams_multi(
    fns['apply_fn'],
    v,
    x,
    methods=('gradcam',),
    head_fn=fns['head_fn'],
    truncate_negative_weights=False,
  )
  assert maps[('gradcam', 'softmax')].shape == (4, SIZE, SIZE)
  np.testing.assert_array_equal(maps[('gradcam', 'softmax')], maps[('gradcam', 'sigmoid')])
  with pytest.raises(ValueError, match="head_kind is 'map'"):
    fns['head_weights_fn'](v, 'sigmoid')
