"""The embedded benchmark: both stages and the evaluation on the synthetic WSOL set.

    python train.py --config configs/synthetic.py --workdir runs/synthetic
    python train.py --config configs/synthetic.py:smoke --workdir runs/smoke   # ~1 minute

The dataset is generated into `input.data_root` on first use (python -m dualsig_jax.data.synthetic).
"""

from dualsig_jax import defaults


def get_config(arg=None):
  c = defaults.base_config()
  c.experiment = 'synthetic'
  c.stages = ('vanilla', 'dual')
  c.log_every_steps = 10
  c.model.arch = 'resnet_tiny'
  c.model.num_classes = 10
  # 14x14 CAMs at 112 px (layer3 stride 1), the resolution ratio of the paper's 224 px / 14x14;
  # with 7x7 maps the boxes are too coarse to compare heads (see README).
  c.model.large_feature_map = True

  c.input.dataset_name = 'SYNTH'
  c.input.data_root = 'data/synthetic'
  c.input.metadata_root = 'data/synthetic/metadata'
  c.input.eval_split = 'test'
  c.input.resize_size = 128
  c.input.crop_size = 112
  c.input.eval_size = 112
  c.input.batch_size = 64
  c.input.num_workers = 2
  c.input.synthetic.generate = True

  # Vanilla stage from scratch: a small CNN learns the 10 shapes in a few epochs.
  # Both learning rates were tuned at the global batch 64 (base_batch_size).
  c.vanilla.update(
    dict(
      num_epochs=8,
      lr=0.05,
      lr_classifier_ratio=1.0,
      lr_decay_frequency=6,
      weight_decay=1e-4,
      base_batch_size=64,
    )
  )
  # Dual stage as the reference runs it: fc2 only, fresh init, BatchNorm on batch statistics,
  # the third epoch at lr/10. ResNet grouping puts fc2 in the feature group (lr x 1) [ref].
  c.dual.update(
    dict(num_epochs=3, lr=0.01, lr_decay_frequency=3, weight_decay=1e-4, base_batch_size=64)
  )
  c.checkpoint.every_steps = 100
  c.eval.batch_size = 100
  c.eval.methods = ('cam', 'gradcam')

  if arg == 'smoke':
    c.experiment = 'synthetic_smoke'
    c.input.data_root = 'data/synthetic_smoke'
    c.input.metadata_root = 'data/synthetic_smoke/metadata'
    c.input.synthetic.update(dict(num_train=256, num_val=32, num_test=64, seed=1))
    c.input.batch_size = 32
    c.input.num_workers = 0
    # The smoke run keeps its lrs at its own batch (unscaled).
    c.vanilla.update(dict(num_epochs=2, max_steps=0, base_batch_size=32))
    c.dual.update(dict(num_epochs=1, base_batch_size=32))
    c.checkpoint.every_steps = 4
    c.log_every_steps = 2
    c.eval.batch_size = 32
    c.eval.cam_curve_interval = 0.01
    c.eval.num_plot_images = 4
  elif arg not in (None, ''):
    raise ValueError(f'configs/synthetic.py: unknown argument {arg!r}; valid: None, "smoke"')
  c.lock()
  return c
