"""CUB-200-2011 with the wsolevaluation metadata shipped in metadata/CUB.

    python train.py --config configs/cub.py:vgg16 --workdir runs/cub_vgg \
        --config.input.data_root=/data/CUB --config.optim.init_checkpoint=...

Dual stage, reference settings: 50 epochs, decay every 15, lr 5e-5 .. 1e-4 (1e-4 here).
"""

from dualsig_jax import defaults


def get_config(arg=None):
  c = defaults.dataset_config('configs/cub.py', arg, dataset_name='CUB', num_classes=200)
  c.input.tfds.name = 'caltech_birds2011'
  c.vanilla.update(dict(num_epochs=50, lr=1e-3, lr_decay_frequency=15))
  c.optim.update(dict(num_epochs=50, lr=1e-4, lr_decay_frequency=15))
  c.eval.methods = ('cam', 'gradcam', 'gradcam++', 'xgradcam', 'layercam')
  c.checkpoint.every_steps = 1000
  c.lock()
  return c
