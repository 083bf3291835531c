"""Stanford Cars with the wsolevaluation-style metadata shipped in the package.

    python train.py --config configs/cars.py:resnet50 --workdir runs/cars_r50 \
        --config.input.data_root=/data/CARS --config.dual.init_checkpoint=...

Images are read from `data_root/cars_{split}/` as the reference does (train and test ids
overlap). Dual stage: 10 epochs [paper]; decay every 3 and lr 1e-4 [here]. The fidelity metrics
(Average Drop, Increase in Confidence) of the paper's Table 1 come from this dataset and CUB.
"""

from dualsig_jax import defaults, vocab


def get_config(arg=None):
  c = defaults.dataset_config('configs/cars.py', arg, dataset_name='CARS', num_classes=196)
  c.vanilla.update(dict(num_epochs=50, lr=1e-3, lr_decay_frequency=15))
  c.dual.update(dict(num_epochs=10, lr=1e-4, lr_decay_frequency=3))
  if c.model.family == 'standard':
    c.eval.methods = vocab.GRADIENT_METHODS
  c.checkpoint.every_steps = 1000
  c.lock()
  return c
