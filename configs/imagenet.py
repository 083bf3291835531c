"""ImageNet-1K (ILSVRC) with the wsolevaluation metadata shipped in the package.

The reference's published command (VGG16; `,standard` for the gradient methods' model):

    python -m dualsig_jax.data.make_metadata --image_folder /data/ILSVRC/train \
        --out /data/metadata --dataset_name ILSVRC --split train
    python -m dualsig_jax.convert --arch vgg16 --family standard \
        --torch_checkpoint vgg16-397923af.pth --output runs/vgg16_torchvision
    python train.py --config configs/imagenet.py:vgg16,standard --workdir runs/in_vgg_gradcam \
        --config.input.data_root=/data/ILSVRC --config.input.metadata_root=/data/metadata \
        --config.dual.init_checkpoint=runs/vgg16_torchvision

Argument: `vgg16 | resnet50 | inception_v3`, optionally `,standard` (the reference's `wsol/`
models, which it uses for every gradient method; for ILSVRC its VGG16 starts from torchvision's
ImageNet VGG16 itself). The dual stage starts from a vanilla checkpoint converted with
`python -m dualsig_jax.convert`. ILSVRC train metadata is not shipped (it lists 1.28M local
files): make it with the first command; splits missing from `metadata_root` (the test split)
are read from the shipped copy.
"""

from dualsig_jax import defaults

# Sigmoid-branch lr per (backbone, family). VGG16: the reference README's published command,
# used for both --method cam and gradcam [ref]. Others: the older reference scripts quoted by
# the paper (ResNet50 CAM 1e-4, Grad-CAM 5e-3; InceptionV3 5e-4) [paper].
_LR = {
  ('vgg16', 'cam'): 3e-3,
  ('vgg16', 'standard'): 3e-3,
  ('resnet50', 'cam'): 1e-4,
  ('resnet50', 'standard'): 5e-3,
  ('inception_v3', 'cam'): 5e-4,
  ('inception_v3', 'standard'): 5e-4,
}
# Not in the paper: ResNet18 / ResNet34 take ResNet50's values [here].
_LR.update(
  {(a, f): _LR[('resnet50', f)] for a in ('resnet18', 'resnet34') for f in ('cam', 'standard')}
)


def get_config(arg=None):
  c = defaults.dataset_config(
    'configs/imagenet.py', arg, dataset_name='ILSVRC', num_classes=1000, default_arch='vgg16'
  )
  c.input.num_workers = 8  # see README "Input pipeline" for sizing it to the host
  c.input.tfds.name = 'imagenet2012'
  c.input.tfds.eval_split = 'validation'
  # Published command: 3 epochs, batch 32, decay every 3 (the third epoch at lr/10),
  # lr 0.003 (VGG16), weight decay 5e-4, large_feature_map False [ref].
  c.input.batch_size = 32
  c.model.large_feature_map = False
  c.vanilla.update(dict(num_epochs=10, lr=1e-3, lr_decay_frequency=3, weight_decay=1e-4))
  c.dual.update(
    dict(
      num_epochs=3,
      lr=_LR[(c.model.arch, c.model.family)],
      lr_decay_frequency=3,
      weight_decay=5e-4,
    )
  )
  c.checkpoint.every_steps = 2000
  c.lock()
  return c
