"""Checks, before any heavy import, that a run has everything it reads; one message for all.

A user's first `python train.py --config configs/imagenet.py` on a machine without data should
not fail on one missing thing per run, each after JAX has started. `problems()` lists every
missing input with the exact remedy; the entry points print them together and exit.
Imports: os, the config and the workdir layout only (no JAX, grain or TFDS).
"""

from __future__ import annotations

import os

import ml_collections

from dualsig_jax import workdir as workdir_lib  # light: os, fcntl and json only
from dualsig_jax.data import paths  # light: os and importlib only

SYNTH_SPLITS = ('train', 'val', 'test')  # == data.synthetic.SPLITS (checked by a test)


def _convert_hint(config) -> str:
  m = config.model
  family = '' if m.family == 'cam' else f' --family {m.family}'
  lfm = ' --large_feature_map' if m.large_feature_map else ''
  return (
    f'convert a PyTorch {m.arch} checkpoint with `python -m dualsig_jax.convert --arch {m.arch}'
    f'{family}{lfm} --num_classes {m.num_classes} --torch_checkpoint CKPT.pth --output OUT_DIR` '
    f'and name it with '
    f'--config.dual.init_checkpoint=OUT_DIR'
  )


def problems(
  config: ml_collections.ConfigDict,
  workdir: str | None,
  *,
  for_eval: bool = False,
  checkpoint: str | None = None,
) -> list[str]:
  """Every input the run needs and cannot find, each with its remedy ([] when all is there).

  `checkpoint`: eval.py's `--checkpoint` folder, evaluated instead of the workdir's dual stage.
  """
  out: list[str] = []
  i = config.input
  synthetic = i.dataset_name == 'SYNTH'
  generate = synthetic and i.synthetic.generate
  if i.source == 'folder' and not generate:
    if not i.data_root:
      out.append(
        f'input.data_root is not set: pass --config.input.data_root=/path/to/{i.dataset_name} '
        '(the folder the metadata image paths are relative to)'
      )
    elif not os.path.isdir(i.data_root):
      out.append(f'input.data_root={i.data_root!r} does not exist (or is not a folder)')
    splits = [i.eval_split] if for_eval else [i.train_split, i.eval_split]
    for split in dict.fromkeys(splits):
      d = paths.split_metadata_dir(i, split)
      if not os.path.isfile(os.path.join(d, 'image_ids.txt')):
        if i.dataset_name == 'ILSVRC' and split == i.train_split:
          out.append(
            f'ILSVRC train metadata is not shipped and {d} has none: make it with '
            '`python -m dualsig_jax.data.make_metadata --image_folder DATA_ROOT/train '
            '--out MY_METADATA --dataset_name ILSVRC --split train` and pass '
            '--config.input.metadata_root=MY_METADATA (the shipped test split is still used)'
          )
        else:
          out.append(
            f'no metadata for split {split!r} of {i.dataset_name}: {d}/image_ids.txt is missing '
            '(set input.metadata_root, or make it with python -m dualsig_jax.data.make_metadata)'
          )
  elif generate and i.source == 'folder':
    # The generated set's splits (data/synthetic.SPLITS; that module is heavy to import here).
    for name in ('train_split', 'eval_split'):
      if name == 'train_split' and for_eval:
        continue
      if i[name] not in SYNTH_SPLITS:
        out.append(
          f'input.{name}={i[name]!r} is not a split of the generated SYNTH set; valid: '
          f'{", ".join(SYNTH_SPLITS)} (e.g. --config.input.{name}=test)'
        )
  if i.source == 'tfds' and not i.tfds.name:
    out.append("input.source='tfds' needs --config.input.tfds.name (e.g. caltech_birds2011)")

  stages = tuple(config.stages)
  if 'dual' in stages and 'vanilla' not in stages:
    src = config.dual.init_checkpoint
    own = workdir and os.path.isdir(workdir_lib.checkpoint_dir(workdir, 'vanilla'))
    resumed = workdir and os.path.isdir(workdir_lib.checkpoint_dir(workdir, 'dual'))
    if not src and not own and not resumed and not for_eval:
      out.append(f'the dual stage needs the vanilla classifier: {_convert_hint(config)}')
    elif src and not os.path.isdir(src) and not resumed and not for_eval:
      out.append(f'dual.init_checkpoint={src!r} does not exist; {_convert_hint(config)}')
  if 'vanilla' in stages and config.vanilla.init_checkpoint and not for_eval:
    if not os.path.isdir(config.vanilla.init_checkpoint):
      out.append(f'vanilla.init_checkpoint={config.vanilla.init_checkpoint!r} does not exist')
  if for_eval and checkpoint:
    if not os.path.isdir(checkpoint):
      out.append(
        f'--checkpoint {checkpoint} does not exist: name a folder written by '
        '`python -m dualsig_jax.convert` or a stage checkpoint folder (<workdir>/dual/checkpoints)'
      )
  elif for_eval and workdir:
    if not os.path.isdir(workdir_lib.checkpoint_dir(workdir, 'dual')):
      out.append(
        f'{workdir} has no dual-stage checkpoint ({workdir}/dual/checkpoints): train first '
        f'with python train.py --config ... --workdir {workdir}'
      )
  return out


def report(found: list[str], what: str = 'this run') -> str:
  """The one message listing everything missing."""
  lines = [f'{what} cannot start; provide the following ({len(found)}):']
  lines += [f'  {n}. {p}' for n, p in enumerate(found, 1)]
  return '\n'.join(lines)
