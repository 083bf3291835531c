"""ImageNet-1K (ILSVRC) with the wsolevaluation metadata shipped in metadata/ILSVRC.

    python train.py --config configs/imagenet.py:resnet50 --workdir runs/in_r50 \
        --config.input.data_root=/data/ILSVRC --config.optim.init_checkpoint=runs/in_r50_vanilla/...

Runs the paper's `dual` stage from a vanilla checkpoint (a wsolevaluation-trained classifier
converted with `python -m dualsig_jax.convert`). Hyper-parameters: the reference scripts (paper, training settings):
the reference README's 3 epochs, decay every 3. The reference groups parameters by name, so the
sigmoid head trains at lr x 10 for VGG16/InceptionV3 and at lr x 1 for ResNet50 (reproduced).
ILSVRC train metadata is not shipped: make it with
`python -m dualsig_jax.data.make_metadata --image_folder /data/ILSVRC/train --out metadata
 --dataset_name ILSVRC --split train`.
"""

from dualsig_jax import defaults

# Sigmoid-branch lr per backbone (CAM runs of the reference scripts).
_LR = {'vgg16': 3e-3, 'resnet50': 1e-4, 'inception_v3': 5e-4}


def get_config(arg=None):
  c = defaults.dataset_config('configs/imagenet.py', arg, dataset_name='ILSVRC', num_classes=1000)
  c.input.num_workers = 8
  c.input.tfds.name = 'imagenet2012'
  c.input.tfds.eval_split = 'validation'
  c.vanilla.update(dict(num_epochs=10, lr=1e-3, lr_decay_frequency=3, weight_decay=1e-4))
  c.optim.update(dict(num_epochs=3, lr=_LR[c.model.arch], lr_decay_frequency=3, weight_decay=1e-4))
  c.checkpoint.every_steps = 2000
  c.lock()
  return c
