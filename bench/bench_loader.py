"""Train-pipeline throughput: our grain loader vs a PyTorch DataLoader, same images/workers.

Both decode JPEG with PIL, resize to 256x256 (PIL bilinear, what torchvision's Resize does on
PIL images), random-crop 224, random h-flip, convert to float and normalize with ImageNet
mean/std, and batch. torchvision is not installed, so its transforms are restated with
PIL + torch below (same operations as Resize/RandomCrop/RandomHorizontalFlip/ToTensor/
Normalize). Images: SYNTH renders at ImageNet-like sizes (~340-480 px), generated once.

  python bench/bench_loader.py [--workers 2 --batch_size 32 --batches 40 --num_images 640]

``--mode headroom`` instead measures how many images/s one loader worker delivers (train and
eval transforms, ``num_workers`` 0/1/2 on 500x375 JPEGs) and what each stage costs on one core
(decode, reduced-size decode, resize, crop, normalise); see ``bench/loader_headroom.py``:

  python bench/bench_loader.py --mode headroom [--headroom_size 500x375 --num_images 640]
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np


def _grain_rate(root, args):
  from ml_collections import ConfigDict

  from dualsig_jax.data import loaders

  cfg = ConfigDict(
    dict(
      source='folder',
      dataset_name='SYNTH',
      data_root=root,
      metadata_root='',
      train_split='train',
      resize_size=256,
      crop_size=224,
      eval_size=224,
      num_workers=args.workers,
      skip_bad_images=False,
      synthetic=dict(
        num_classes=10,
        image_size=args.image_size,
        num_train=args.num_images,
        num_val=0,
        num_test=0,
        seed=0,
      ),
    )
  )
  loader = loaders.make_train_loader(
    cfg, seed=0, num_epochs=None, process_index=0, process_count=1, batch_size=args.batch_size
  )
  return _time(iter(loader), args, lambda b: b['image'].shape[0])


def _torch_rate(root, args):
  import torch
  from PIL import Image

  from dualsig_jax.data.metadata import load_metadata

  meta = load_metadata(os.path.join(root, 'metadata'), 'SYNTH', 'train')
  mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

  class Dataset(torch.utils.data.Dataset):
    def __len__(self):
      return len(meta.image_ids)

    def __getitem__(self, i):
      image_id = meta.image_ids[i]
      img = Image.open(os.path.join(root, image_id)).convert('RGB')
      img = img.resize((256, 256), Image.BILINEAR)  # Resize((256, 256))
      top, left = (int(torch.randint(0, 256 - 224 + 1, (1,))) for _ in range(2))
      img = img.crop((left, top, left + 224, top + 224))  # RandomCrop(224)
      if torch.rand(1) < 0.5:  # RandomHorizontalFlip
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
      x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous()
      x = x.float().div(255)  # ToTensor
      x = x.sub_(mean).div_(std)  # Normalize
      return x, meta.labels[image_id]

  loader = torch.utils.data.DataLoader(
    Dataset(),
    batch_size=args.batch_size,
    shuffle=True,
    num_workers=args.workers,
    drop_last=True,
    persistent_workers=args.workers > 0,
  )

  def forever():
    while True:
      yield from loader

  return _time(forever(), args, lambda b: b[0].shape[0])


def _time(it, args, size):
  for _ in range(args.warmup):  # Worker start-up and first batches are not measured.
    next(it)
  n, t0 = 0, time.perf_counter()
  for _ in range(args.batches):
    n += size(next(it))
  return n / (time.perf_counter() - t0)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mode', default='compare', choices=('compare', 'headroom'))
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--batches', type=int, default=40)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--num_images', type=int, default=640)
  parser.add_argument('--image_size', type=int, default=400)
  parser.add_argument(
    '--data_dir', default=os.path.join(tempfile.gettempdir(), 'dualsig_bench_loader')
  )
  headroom = parser.add_argument_group('--mode headroom')
  headroom.add_argument('--headroom_size', default='500x375', help='JPEG size WxH')
  headroom.add_argument(
    '--headroom_workers', default='0,1,2', type=lambda s: [int(v) for v in s.split(',') if v]
  )
  headroom.add_argument('--stage_images', type=int, default=64, help='images per stage timing')
  headroom.add_argument('--stage_repeats', type=int, default=5)
  headroom.add_argument('--resize_size', type=int, default=256)
  headroom.add_argument('--crop_size', type=int, default=224)
  headroom.add_argument('--eval_size', type=int, default=224)
  headroom.add_argument('--out', help='write the headroom results as JSON here')
  args = parser.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if args.mode == 'headroom':
    return _headroom(args)

  import grain
  import jax
  import PIL
  import torch
  from ml_collections import ConfigDict

  from dualsig_jax.data import synthetic

  synthetic.ensure_synthetic(
    ConfigDict(
      dict(
        data_root=args.data_dir,
        metadata_root='',
        synthetic=dict(
          num_classes=10,
          image_size=args.image_size,
          num_train=args.num_images,
          num_val=0,
          num_test=0,
          seed=0,
        ),
      )
    )
  )
  torch.set_num_threads(1)  # Workers do the work; keep the main process from competing.

  print(
    f'machine: {platform.platform()}, {platform.processor() or platform.machine()}, '
    f'{os.cpu_count()} CPUs'
  )
  print(
    f'versions: python {sys.version.split()[0]}, numpy {np.__version__}, '
    f'pillow {PIL.__version__}, grain {getattr(grain, "__version__", "?")}, '
    f'jax {jax.__version__}, torch {torch.__version__}'
  )
  print(
    f'setup: {args.num_images} JPEGs ~{args.image_size}px, resize 256 -> crop 224 -> '
    f'flip -> normalize, batch {args.batch_size}, {args.workers} workers, '
    f'{args.batches} timed batches after {args.warmup} warm-up'
  )
  # Alternate the two (A B B A ...) so load from other processes on a shared machine hits
  # both alike; report medians.
  ours, ref = [], []
  for r in range(args.repeats):
    for name in ('grain', 'torch') if r % 2 == 0 else ('torch', 'grain'):
      rate = (_grain_rate if name == 'grain' else _torch_rate)(args.data_dir, args)
      (ours if name == 'grain' else ref).append(rate)
      print(f'  run {r}: {name:5s} {rate:8.1f} images/s', flush=True)
  # Spread: other jobs share the cores, so show the range, and the per-pair ratios (each
  # grain run against the torch run next to it in time).
  pairs = [o / r for o, r in zip(ours, ref)]
  print(
    f'grain (dualsig_jax.data): {np.median(ours):8.1f} images/s (median of {len(ours)}, '
    f'range {min(ours):.1f}-{max(ours):.1f})'
  )
  print(
    f'torch DataLoader (PIL):   {np.median(ref):8.1f} images/s (median of {len(ref)}, '
    f'range {min(ref):.1f}-{max(ref):.1f})'
  )
  print(
    f'ratio grain/torch:        {np.median(ours) / np.median(ref):8.2f} '
    f'(per-repeat ratios {min(pairs):.2f}-{max(pairs):.2f})'
  )


def _headroom(args):
  import grain
  import PIL

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import loader_headroom

  print(
    f'machine: {platform.platform()}, {platform.processor() or platform.machine()}, '
    f'{os.cpu_count()} CPUs; python {sys.version.split()[0]}, numpy {np.__version__}, '
    f'pillow {PIL.__version__}, grain {getattr(grain, "__version__", "?")}'
  )
  print(
    f'setup: {args.num_images} JPEGs {args.headroom_size}; train: resize {args.resize_size} -> '
    f'crop {args.crop_size} -> flip -> normalise; eval: resize {args.eval_size} -> normalise; '
    f'batch {args.batch_size}; loader rates from one pass over all and one over a quarter '
    f'of the images, median of {args.repeats}'
  )
  result = loader_headroom.run(args)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == '__main__':
  main()
