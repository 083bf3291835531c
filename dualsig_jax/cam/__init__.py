"""Class activation maps for Flax models, jitted and batched.

Two entry points: ``compute_cams`` / ``compute_cams_multi`` (CAM, Grad-CAM, Grad-CAM++, XGrad-CAM
and LayerCAM of this project's models, or of any model given as features + head), and
``explain`` / ``maps_fn`` (any Linen or NNX model as it is, at any layer, with every
class-discriminative method of pytorch-grad-cam 1.5.7). Beside them: guided backprop, the
fidelity and ROAD metrics, and plotting helpers.

``compute_cams``' maps come from either head (``branch='softmax'`` or ``'sigmoid'``); all maps
are resized on device with matrices that reproduce ``cv2.resize`` and normalized exactly as the
reference (wsolevaluation + pytorch-grad-cam) does; see ``compute.postprocess_maps``.

A model is seen through ``apply_fn(variables, images) -> {'features', '<branch>_logits'...}``,
``head_fn(variables, features) -> logits dict`` (gradient methods) and
``head_weights_fn(variables, branch) -> (w [C, K], b [K])`` (``cam``). For this package's models,
``dualsig_jax.models.cam_fns(model)`` returns the three. For your own model, two recipes:

Recipe 1 -- split the model into a feature extractor and a head::

    import flax.linen as nn, jax, jax.numpy as jnp
    from dualsig_jax.cam import compute_cams

    class Net(nn.Module):
        num_classes: int = 10

        def setup(self):
            self.conv1 = nn.Conv(16, (3, 3))
            self.conv2 = nn.Conv(32, (3, 3), strides=2)
            self.fc = nn.Dense(self.num_classes)

        def features(self, x):                      # [B, H, W, 3] -> [B, h, w, C]
            return nn.relu(self.conv2(nn.relu(self.conv1(x))))

        def head(self, f):                          # GAP + Dense
            return {'softmax_logits': self.fc(f.mean(axis=(1, 2)))}

        def __call__(self, x):
            f = self.features(x)
            return {'features': f, **self.head(f)}

    net = Net()
    variables = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    apply_fn = net.apply                                        # define these once:
    head_fn = lambda v, f: net.apply(v, f, method=Net.head)     # jit caches on their identity
    head_weights_fn = lambda v, branch: (v['params']['fc']['kernel'], v['params']['fc']['bias'])
    maps, targets = compute_cams(apply_fn, variables, images, method='gradcam', branch='softmax',
                                 head_fn=head_fn, head_weights_fn=head_weights_fn)

Recipe 2 -- a model that ``sow``s its features (``self.sow('intermediates', 'features', f)``
before its GAP + Dense head named ``fc``)::

    from dualsig_jax.cam import compute_cams_multi, linear_head_fns

    def apply_fn(v, x):
        logits, state = model.apply(v, x, mutable=['intermediates'])
        return {'features': state['intermediates']['features'][0], 'softmax_logits': logits}

    head_fn, head_weights_fn = linear_head_fns({'softmax': ('fc',)})
    maps, targets = compute_cams_multi(apply_fn, variables, images,
                                       methods=('cam', 'gradcam++'), branches=('softmax',),
                                       head_fn=head_fn, head_weights_fn=head_weights_fn)
    maps[('gradcam++', 'softmax')]   # [B, H, W] float32 in [0, 1]

Method names: ``cam``, ``gradcam``, ``gradcam++``, ``xgradcam``, ``layercam``.

Any model as it is (no ``features``/``head``/``sow``), Linen or NNX (config-object fields and
``nnx.scan`` included), at any layer or list of layers, with every class-discriminative method
of pytorch-grad-cam 1.5.7 (``EXPLAIN_METHODS``)::

    from dualsig_jax import cam
    maps, targets = cam.explain(model, variables, images, target_layer='layer4',
                                methods=('gradcam', 'scorecam'))

``targets`` is a class per image, ``'all'`` / ``('topk', k)``, or a JAX function of the output
(``cam.targets``: classifier, softmax, binary, raw scores, semantic segmentation).
``cam.maps_fn`` gives the same maps as a pure function to differentiate inside one's own
``jax.jit`` (docs/explain_targets.md).
"""

from dualsig_jax import lazy
from dualsig_jax.cam import targets
from dualsig_jax.cam.compute import (
  BRANCHES,
  compute_cams,
  compute_cams_multi,
  feature_gradients,
  linear_head_fns,
  postprocess_maps,
)
from dualsig_jax.cam.explain import EXPLAIN_METHODS, explain
from dualsig_jax.cam.fidelity import (
  FidelityAccumulator,
  average_drop,
  confidence_change,
  increase_in_confidence,
  insertion_deletion,
)
from dualsig_jax.cam.guided import guided_backprop, guided_gradcam
from dualsig_jax.cam.methods import (
  GRADIENT_METHODS,
  METHODS,
  cam,
  grad_cam,
  grad_cam_plus_plus,
  layer_cam,
  normalize_scoremap,
  xgrad_cam,
)
from dualsig_jax.cam.pure import maps_fn
from dualsig_jax.cam.resize import resize_maps
from dualsig_jax.cam.road_metrics import cam_mult_image_confidence_change, road, road_combined

# The documented surface (README "Using the CAM functions"); helpers such as the per-method
# weight functions stay in their submodules (dualsig_jax.cam.methods, .compute, .resize).
__all__ = [
  'BRANCHES',
  'EXPLAIN_METHODS',
  'FidelityAccumulator',
  'GRADIENT_METHODS',
  'METHODS',
  'average_drop',
  'cam',
  'cam_mult_image_confidence_change',
  'compute_cams',
  'compute_cams_multi',
  'confidence_change',
  'explain',
  'feature_gradients',
  'grad_cam',
  'grad_cam_plus_plus',
  'guided_backprop',
  'guided_gradcam',
  'increase_in_confidence',
  'insertion_deletion',
  'layer_cam',
  'linear_head_fns',
  'maps_fn',
  'normalize_scoremap',
  'postprocess_maps',
  'resize_maps',
  'road',
  'road_combined',
  'targets',
  'xgrad_cam',
]

_PLOT_NAMES = ('overlay', 'save_cam_grid', 'largest_contour_box', 'to_display')
__all__ += list(_PLOT_NAMES)


# Plot helpers come from dualsig_jax.cam.plots, imported on first use: matplotlib is slow to
# import and most callers (training, eval workers) never draw.
__getattr__ = lazy.exports(__name__, {n: 'plots' for n in _PLOT_NAMES})
