"""CUB-200-2011 with the wsolevaluation metadata shipped in the package.

    python train.py --config configs/cub.py:vgg16 --workdir runs/cub_vgg \
        --config.input.data_root=/data/CUB --config.dual.init_checkpoint=runs/cub_vgg_vanilla
    python train.py --config configs/cub.py:vgg16,standard ...   # the gradient methods

Dual stage: 50 epochs, decay every 15, lr 5e-5 .. 1e-4 (1e-4 here) [paper, older reference
scripts]; weight decay 1e-4 (the reference's default) [ref]. Vanilla: the settings sheet [sheet].
"""

from dualsig_jax import defaults, vocab


def get_config(arg=None):
  c = defaults.dataset_config('configs/cub.py', arg, dataset_name='CUB', num_classes=200)
  c.input.tfds.name = 'caltech_birds2011'
  c.vanilla.update(dict(num_epochs=50, lr=1e-3, lr_decay_frequency=15))
  c.dual.update(dict(num_epochs=50, lr=1e-4, lr_decay_frequency=15))
  # Table 1 (fidelity): CAM on the cam family, the gradient methods on the standard one.
  if c.model.family == 'standard':
    c.eval.methods = vocab.GRADIENT_METHODS
  c.checkpoint.every_steps = 1000
  c.lock()
  return c
