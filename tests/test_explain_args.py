"""One clear ValueError for every explain / compute_cams argument that used to give zero maps, a
silently truncated class or an internal JAX error (issue 23, item 9, and target_layer=None)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualsig_jax.cam import compute_cams, explain, linear_head_fns

K = 5


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    f = nn.relu(nn.Conv(4, (3, 3), name='conv')(x))
    return {'features': f, 'softmax_logits': nn.Dense(K, name='fc')(f.mean(axis=(1, 2)))}


@pytest.fixture(scope='module')
def setup():
  net = Net()
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  return net, net.init(jax.random.key(1), x), x


TARGETS = [
  ([7, 0], r'targets \[7\] out of range.*5 classes'),
  ([5, 0], r'targets \[5\] out of range'),
  ([-1, 0], r'targets \[-1\] out of range'),
  (np.array([0, -3], np.int64), r'targets \[-3\] out of range'),
  ([1.0, 2.0], 'integer class indices.*float'),
  (jnp.array([0.5, 1.7]), 'integer class indices'),
  ([True, False], 'integer class indices'),
  ([0, 1, 2], r'\[B\]=2'),
  ([[0], [1]], r'\[B\]=2'),
  ('al', 'not understood'),
  (('topk', 0), 'k of targets'),
  (('topk', 6), 'only 5 classes'),
  (('tpk', 2), 'not understood'),
  ({'a': 1}, 'targets must be'),
]


@pytest.mark.parametrize('targets,match', TARGETS)
def test_explain_bad_targets(setup, targets, match):
  net, v, x = setup
  with pytest.raises(ValueError, match=match):
    explain(net, v, x, 'conv', ('gradcam', 'scorecam'), targets)


OPTIONS = [
  ({'fem_k': float('nan')}, 'fem_k must be a finite number'),
  ({'fem_k': float('inf')}, 'fem_k must be a finite number'),
  ({'fem_k': 'two'}, 'fem_k'),
  ({'finer_alpha': float('nan')}, 'finer_alpha'),
  ({'finer_comparisons': (1, 9)}, r'finer_comparisons \[9\] beyond the 5 classes'),
  ({'finer_comparisons': (5,)}, 'beyond the 5 classes'),
  ({'finer_comparisons': (0, 1)}, 'must be >= 1'),
  ({'finer_comparisons': ()}, 'finer_comparisons must be positions'),
  ({'finer_comparisons': (1.5,)}, 'finer_comparisons must be positions'),
  ({'kpca_gamma': -1.0}, 'kpca_gamma must be a finite number > 0'),
  ({'kpca_gamma': float('nan')}, 'kpca_gamma'),
  ({'random_seed': -1}, 'random_seed'),
  ({'random_seed': 1.5}, 'random_seed'),
  ({'kpca_kernel': 'gauss'}, 'unknown kpca_kernel'),
]


@pytest.mark.parametrize('options,match', OPTIONS)
def test_explain_bad_options(setup, options, match):
  net, v, x = setup
  with pytest.raises(ValueError, match=match):
    explain(net, v, x, 'conv', ('finercam', 'fem', 'kpcacam'), options=options)


def test_explain_other_bad_arguments(setup):
  net, v, x = setup
  for kwargs, match in (
    ({'batch_size': 0}, 'batch_size must be an int >= 1'),
    ({'batch_size': 2.5}, 'batch_size'),
    ({'output_size': (0, 8)}, 'output_size must be'),
    ({'output_size': (8,)}, 'output_size must be'),
  ):
    with pytest.raises(ValueError, match=match):
      explain(net, v, x, 'conv', **kwargs)
  with pytest.raises(ValueError, match='empty batch'):
    explain(net, v, x[:0], 'conv')
  with pytest.raises(ValueError, match='empty batch'):
    explain(net, v, x[:0], 'conv', targets=jnp.zeros((0,), jnp.int32))
  with pytest.raises(ValueError, match='target_layer is required'):
    explain(net, v, x, None)
  with pytest.raises(ValueError, match='target_layer is an empty list'):
    explain(net, v, x, [])
  with pytest.raises(ValueError, match='target_layer must be a scope path'):
    explain(net, v, x, 3)
  with pytest.raises(ValueError, match='finercam compares class logits'):
    explain(net, v, x, 'conv', ('finercam',), targets=lambda out: out[:, 0])


def test_compute_cams_bad_targets(setup):
  net, v, x = setup
  head_fn, weights_fn = linear_head_fns({'softmax': ('fc',)})
  kw = dict(method='gradcam', branch='softmax', head_fn=head_fn, head_weights_fn=weights_fn)
  for targets, match in (
    ([-1, 0], r'\[-1\] out of range'),
    ([0.0, 1.0], 'integer class indices'),
    ([0, 1, 2], r'\[B\]=2'),
  ):
    with pytest.raises(ValueError, match=match):
      compute_cams(net.apply, v, x, targets=targets, **kw)
  with pytest.raises(ValueError, match='empty batch'):
    compute_cams(net.apply, v, x[:0], **kw)
  maps, t = compute_cams(net.apply, v, x, targets=[4, 0], **kw)  # valid ones still work
  assert maps.shape == (2, 8, 8) and t.tolist() == [4, 0]
  # Beyond the 5 classes: one_hot gave an all-zero gradient and take() a clamped CAM, silently.
  for method in ('gradcam', 'cam'):
    kw['method'] = method
    for targets in ([5, 0], np.array([0, 9], np.int64), jnp.asarray([5, 6])):
      with pytest.raises(ValueError, match=r'out of range: the model has 5 classes'):
        compute_cams(net.apply, v, x, targets=targets, **kw)
