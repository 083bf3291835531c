"""Writes wsolevaluation train metadata (image_ids.txt, class_labels.txt) for an ImageFolder.

The ILSVRC train metadata is too large to ship; generate it from the train folder:

  python -m dualsig_jax.data.make_metadata --image_folder /data/ILSVRC/train \
      --out /data/metadata --dataset_name ILSVRC --split train

then train with ``--config.input.metadata_root=/data/metadata`` (splits that folder lacks, here
the test split, are read from the shipped copy). It never writes into the shipped metadata, and
replaces an existing split only with ``--overwrite``.

``image_folder`` holds one sub-folder per class; classes are indexed in sorted folder-name
order (for ImageNet that is the standard wnid order used by the shipped val/test labels), or
in the order of ``--class_list`` (one folder name per line). Ids are written relative to
``--relative_to`` (default: the parent of ``image_folder``, so ``train/n01440764/x.JPEG`` as
in wsolevaluation); point ``input.data_root`` there.
"""

from __future__ import annotations

import argparse
import os

from dualsig_jax.data import paths

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


def scan_image_folder(
  image_folder: str, class_list: list[str] | None = None, relative_to: str | None = None
) -> list[tuple[str, int]]:
  """Returns sorted (image id, label) pairs of ``image_folder/<class>/<image>``."""
  if not os.path.isdir(image_folder):
    raise FileNotFoundError(f'image folder {image_folder!r} does not exist')
  relative_to = relative_to or os.path.dirname(os.path.abspath(image_folder.rstrip('/')))
  found = sorted(e.name for e in os.scandir(image_folder) if e.is_dir())
  classes = class_list if class_list is not None else found
  if not classes:
    raise ValueError(f'{image_folder!r} has no class sub-folders')
  missing = sorted(set(classes) - set(found))
  if missing:
    raise ValueError(f'classes in the class list without a folder: {missing[:10]}')
  extra = sorted(set(found) - set(classes))
  if extra:
    raise ValueError(f'folders not in the class list: {extra[:10]}')
  pairs = []
  for label, name in enumerate(classes):
    folder = os.path.join(image_folder, name)
    for root, _, files in os.walk(folder):
      for f in files:
        if f.lower().endswith(IMAGE_EXTENSIONS):
          rel = os.path.relpath(os.path.join(root, f), relative_to).replace(os.sep, '/')
          if ',' in rel:
            raise ValueError(f'image path with a comma cannot be written to metadata: {rel}')
          pairs.append((rel, label))
  if not pairs:
    raise ValueError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {image_folder!r}')
  return sorted(pairs)


def check_out(out: str, dataset_name: str, split: str, *, overwrite: bool = False) -> str:
  """The split folder ``out/dataset_name/split`` to write, after refusing the shipped metadata
  folder (ValueError) and, without ``overwrite``, an existing split (FileExistsError)."""
  real = os.path.realpath(out)
  shipped = os.path.realpath(paths.SHIPPED_METADATA)
  if real == shipped or real.startswith(shipped + os.sep):
    raise ValueError(
      f'--out {out!r} is the metadata shipped with dualsig_jax ({shipped}); write to your '
      'own folder (e.g. --out /data/metadata) and pass '
      '--config.input.metadata_root=/data/metadata (the splits it lacks are read from the '
      'shipped copy)'
    )
  d = os.path.join(out, dataset_name, split)
  existing = [
    f for f in ('image_ids.txt', 'class_labels.txt') if os.path.exists(os.path.join(d, f))
  ]
  if existing and not overwrite:
    raise FileExistsError(
      f'{d} already holds split {split!r} of {dataset_name} ({", ".join(existing)}); pass '
      '--overwrite to replace it'
    )
  return d


def write_metadata(
  pairs, out: str, dataset_name: str, split: str, *, overwrite: bool = False
) -> str:
  """Writes ``out/dataset_name/split/{image_ids,class_labels}.txt``; returns the folder.

  Refuses (see :func:`check_out`) the shipped metadata folder, and an existing split unless
  ``overwrite``.
  """
  d = check_out(out, dataset_name, split, overwrite=overwrite)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, 'image_ids.txt'), 'w') as f:
    f.writelines(f'{p}\n' for p, _ in pairs)
  with open(os.path.join(d, 'class_labels.txt'), 'w') as f:
    f.writelines(f'{p},{c}\n' for p, c in pairs)
  return d


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--image_folder', required=True)
  parser.add_argument('--out', required=True, help='metadata root')
  parser.add_argument('--dataset_name', required=True)
  parser.add_argument('--split', default='train')
  parser.add_argument('--relative_to', default=None)
  parser.add_argument('--class_list', default=None)
  parser.add_argument('--overwrite', action='store_true', help='replace an existing split')
  args = parser.parse_args(argv)
  try:  # Before the scan, which takes minutes on ImageNet.
    check_out(args.out, args.dataset_name, args.split, overwrite=args.overwrite)
  except (ValueError, FileExistsError) as e:
    raise SystemExit(f'make_metadata: {e}') from None
  classes = None
  if args.class_list:
    with open(args.class_list) as f:
      classes = [line.strip() for line in f if line.strip()]
  pairs = scan_image_folder(args.image_folder, classes, args.relative_to)
  d = write_metadata(pairs, args.out, args.dataset_name, args.split, overwrite=args.overwrite)
  print(f'wrote {len(pairs)} images of {len({c for _, c in pairs})} classes to {d}')


if __name__ == '__main__':
  main()
