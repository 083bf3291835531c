"""OpenImages30K (wsolevaluation split) with the metadata shipped in the package.

    python train.py --config configs/openimages.py:resnet50 --workdir runs/oi_r50 \
        --config.input.data_root=/data/OpenImages --config.dual.init_checkpoint=...

Localization is scored with PxAP on the instance/ignore masks. Dual stage: 10 epochs, lr 3e-4 ..
5e-4 (3e-4 here) [paper, older reference scripts], decay every 3 [here].
"""

from dualsig_jax import defaults


def get_config(arg=None):
  c = defaults.dataset_config(
    'configs/openimages.py', arg, dataset_name='OpenImages', num_classes=100
  )
  c.vanilla.update(dict(num_epochs=10, lr=1e-3, lr_decay_frequency=3))
  c.dual.update(dict(num_epochs=10, lr=3e-4, lr_decay_frequency=3))
  c.checkpoint.every_steps = 1000
  c.lock()
  return c
