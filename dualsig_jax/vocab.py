"""Every fixed vocabulary of the project, declared once (no heavy imports: configs read it).

Modules that own a concept import its names from here: the model table checks `ARCHS` and
`FAMILIES`, the CAM library `CAM_METHODS` and `BRANCHES`, the config schema all of them.
"""

# Archs of the backbone table (dualsig_jax.models.BACKBONES) and the two model families of the
# reference: `cam` = wsol_cam/ (GAP + linear head, used for plain CAM), `standard` = wsol/
# (torchvision layouts, VGG16 with its MLP classifier, used for every gradient method).
# resnet18 / resnet34 are not in the paper: torchvision's BasicBlock ResNets in the same layout.
ARCHS = ('vgg16', 'resnet50', 'inception_v3', 'vgg_tiny', 'resnet_tiny', 'resnet18', 'resnet34')
PAPER_ARCHS = ('vgg16', 'resnet50', 'inception_v3')
# Full-size backbones a real-dataset config takes as its argument (configs/cub.py:resnet18).
CONFIG_ARCHS = (*PAPER_ARCHS, 'resnet18', 'resnet34')
FAMILIES = ('cam', 'standard')

# Compute dtypes a config may name (parameters are always float32).
DTYPES = ('float32', 'bfloat16')

CAM_METHODS = ('cam', 'gradcam', 'gradcam++', 'xgradcam', 'layercam')
GRADIENT_METHODS = CAM_METHODS[1:]
# cam.explain's methods (pytorch-grad-cam 1.5.7's class-discriminative set on any target layer).
EXPLAIN_METHODS = (
  'gradcam',
  'hirescam',
  'gradcam++',
  'xgradcam',
  'layercam',
  'gradcamelementwise',
  'eigencam',
  'eigengradcam',
  'kpcacam',
  'scorecam',
  'ablationcam',
  'shapleycam',
  'finercam',
  'fem',
  'randomcam',
  'segeigencam',
)
# Heads of a dual-branch model: 'softmax' = fc (classifies), 'sigmoid' = fc2 (explains).
BRANCHES = ('softmax', 'sigmoid')

STAGES = ('vanilla', 'dual')
SOURCES = ('folder', 'tfds')

# eval.cam_curve_interval (wsol.BoxEvaluator / MaskEvaluator): the CAM thresholds are
# np.arange(0, 1, interval), as wsolevaluation; any positive interval works there, and 1 already
# leaves the single threshold t = 0. Low bound exclusive, high bound inclusive.
CAM_CURVE_INTERVAL_RANGE = (0.0, 1.0)

# ImageNet normalisation used by every backbone (torchvision / wsolevaluation).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The synthetic WSOL benchmark (SYNTH) that the main job generates.
SYNTHETIC = dict(num_classes=10, image_size=112, num_train=3000, num_val=300, num_test=600, seed=0)
