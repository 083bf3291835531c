"""Input-pipeline headroom (``python bench/bench_loader.py --mode headroom``).

How many images/s one worker process of the project's grain loaders delivers at 224 px, for
the train transform (JPEG decode, resize 256, random crop 224, flip, normalise) and the eval
transform (decode, resize 224, normalise), and which stage bounds it:

1. Stage costs on one core, in this process, as CPU ms per image (median of repeats): decode
   (PIL = the loaders' ``load_rgb``; PIL with ``draft`` reduced-size decoding, which engages
   when the image is at least twice the target size; OpenCV; ``simplejpeg`` if installed),
   resize, crop + flip, normalise, and whole train / eval work per image with and without
   ``draft``.
2. The loaders themselves (``make_train_loader`` / ``make_eval_loader``) with ``num_workers``
   0, 1, 2 on the same files: wall images/s (start-up excluded, median of repeats) and, with
   psutil, CPU ms per image over the whole process tree (main process + workers), whose
   inverse is what one fully used core sustains however busy the machine is.

Images: SYNTH renders (textured objects on clutter) resized to ``--headroom_size`` (default
500x375, the most common ImageNet / CUB shape), with fine-grained noise added so that the
quality-95 JPEGs average ~110 KB like ILSVRC's (~140 GiB for 1.28 M train files): decode
time grows with the compressed size, and plain renders compress ~3x better than photos.
ILSVRC-style metadata (one box each); written once into a cache folder.
"""

from __future__ import annotations

import io
import os
import statistics
import time

import numpy as np

METADATA_NAME = 'ILSVRC'  # 1000 classes, boxes only: the eval loader reads no masks.
SPLITS = {'train': 'train', 'eval': 'val'}
QUARTER = '_quarter'  # the same split's first quarter, for start-up-free rates


def make_images(root: str, num_images: int, size: tuple[int, int]) -> str:
  """Writes ``num_images`` JPEGs of ``size`` (w, h) and metadata under ``root``; cached.

  Returns the folder used as both ``data_root`` and (``/metadata``) ``metadata_root``.
  """
  import cv2

  from dualsig_jax.data import synthetic

  w, h = size
  out = os.path.join(root, f'headroom_v3_{w}x{h}_{num_images}')
  marker = os.path.join(out, '.complete')
  if os.path.exists(marker):
    return out
  os.makedirs(os.path.join(out, 'images'), exist_ok=True)
  ids, labels, sizes, boxes = [], [], [], []
  for i in range(num_images):
    rng = np.random.default_rng([7, i])
    label = i % synthetic.MAX_CLASSES
    img, mask = synthetic.render(label, synthetic.MAX_CLASSES, max(w, h), rng)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    # Detail at 1-3 px scales (foliage, fur, fabric in photos): photo-like compressed sizes.
    img += rng.normal(0, 10, img.shape).astype(np.float32)
    img += cv2.GaussianBlur(rng.normal(0, 20, img.shape).astype(np.float32), (0, 0), 1.5)
    img = np.clip(img, 0, 255).astype(np.uint8)
    mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    image_id = f'images/{i:05d}.jpg'
    cv2.imwrite(os.path.join(out, image_id), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    ys, xs = np.nonzero(mask) if mask.any() else (np.array([0, h - 1]), np.array([0, w - 1]))
    ids.append(image_id)
    labels.append(f'{image_id},{label}')
    sizes.append(f'{image_id},{w},{h}')
    boxes.append(f'{image_id},{xs.min()},{ys.min()},{xs.max()},{ys.max()}')
  for split in ('train', 'val'):
    for suffix, n in (('', num_images), (QUARTER, num_images // 4)):
      d = os.path.join(out, 'metadata', METADATA_NAME, split + suffix)
      os.makedirs(d, exist_ok=True)
      for name, lines in (
        ('image_ids.txt', ids),
        ('class_labels.txt', labels),
        ('image_sizes.txt', sizes),
        ('localization.txt', boxes),
      ):
        with open(os.path.join(d, name), 'w') as f:
          f.write('\n'.join(lines[:n]) + '\n')
  open(marker, 'w').close()
  return out


def _median_ms(fn, items, repeats: int) -> float:
  """Median over ``repeats`` of the mean CPU ms per item of ``fn(item)`` over ``items``.

  Process CPU time, not wall time: every stage here runs on one thread, and CPU time barely
  moves when other jobs share the cores (wall time does).
  """
  runs = []
  for _ in range(repeats):
    t0 = time.process_time()
    for item in items:
      fn(item)
    runs.append((time.process_time() - t0) * 1e3 / len(items))
  return statistics.median(runs)


def stage_costs(folder: str, args) -> dict:
  """ms per image of each stage on one core (this process), plus draft mode's pixel error."""
  import cv2
  from PIL import Image

  from dualsig_jax.data import transforms as T

  paths = [os.path.join(folder, 'images', f) for f in sorted(os.listdir(folder + '/images'))]
  paths = paths[: args.stage_images]
  blobs = [open(p, 'rb').read() for p in paths]
  r, c, e = args.resize_size, args.crop_size, args.eval_size
  cv2.setNumThreads(1)  # one core, like one loader worker

  def pil_decode(blob, draft=None):
    img = Image.open(io.BytesIO(blob))
    if draft is not None:
      img.draft('RGB', draft)  # JPEG DCT scaling by 1/2, 1/4 or 1/8 while staying >= draft
    img.load()
    return img.convert('RGB') if img.mode != 'RGB' else img

  images = [pil_decode(b) for b in blobs]
  arrays = [np.asarray(im) for im in images]
  resized = [im.resize((r, r), Image.BILINEAR) for im in images]
  crops = [np.asarray(im.crop((0, 0, c, c))) for im in resized]
  rng = np.random.default_rng(0)
  rep = args.stage_repeats
  ms = {
    'decode PIL (load_rgb)': _median_ms(T.load_rgb, paths, rep),
    'decode PIL from memory': _median_ms(pil_decode, blobs, rep),
    f'decode PIL draft({r})': _median_ms(lambda b: pil_decode(b, (r, r)), blobs, rep),
    'decode OpenCV': _median_ms(
      lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), blobs, rep
    ),
    f'resize {r}x{r} (PIL bilinear, the reference)': _median_ms(
      lambda im: im.resize((r, r), Image.BILINEAR), images, rep
    ),
    f'resize {r}x{r} (OpenCV INTER_AREA, other pixels)': _median_ms(
      lambda a: cv2.resize(a, (r, r), interpolation=cv2.INTER_AREA), arrays, rep
    ),
    f'crop {c} + flip': _median_ms(
      lambda im: np.asarray(im.crop((8, 8, 8 + c, 8 + c)).transpose(Image.FLIP_LEFT_RIGHT)),
      resized,
      rep,
    ),
    'normalise (float32)': _median_ms(T.normalize, crops, rep),
    'train: train_crop (resize+crop+flip)': _median_ms(
      lambda im: T.train_crop(im, rng, r, c), images, rep
    ),
    f'eval: eval_transform (resize {e} + normalise)': _median_ms(
      lambda im: T.eval_transform(im, e), images, rep
    ),
    # Whole per-image work of a train worker, with the full and with the draft decode.
    'train total: decode + train_crop + normalise': _median_ms(
      lambda b: T.normalize(T.train_crop(pil_decode(b), rng, r, c)), blobs, rep
    ),
    'train total, draft decode': _median_ms(
      lambda b: T.normalize(T.train_crop(pil_decode(b, (r, r)), rng, r, c)), blobs, rep
    ),
    'eval total: decode + eval_transform': _median_ms(
      lambda b: T.eval_transform(pil_decode(b), e), blobs, rep
    ),
    'eval total, draft decode': _median_ms(
      lambda b: T.eval_transform(pil_decode(b, (e, e)), e), blobs, rep
    ),
  }
  try:
    import simplejpeg

    ms['decode simplejpeg'] = _median_ms(lambda b: simplejpeg.decode_jpeg(b, 'RGB'), blobs, rep)
    ms['decode simplejpeg fastdct+fastupsample'] = _median_ms(
      lambda b: simplejpeg.decode_jpeg(b, 'RGB', fastdct=True, fastupsample=True), blobs, rep
    )
  except ImportError:
    pass
  # Draft mode changes pixels where it engages (DCT-domain downscaling, then the resize);
  # measure how much, on the train crop (same crop window and flip for both).
  diffs, engaged = [], 0
  for blob in blobs:
    full = pil_decode(blob)
    small = pil_decode(blob, (r, r))
    engaged += small.size != full.size
    a = np.asarray(full.resize((r, r), Image.BILINEAR), np.float32)
    b = np.asarray(small.resize((r, r), Image.BILINEAR), np.float32)
    diffs.append(float(np.abs(a - b).mean()))
  kb = statistics.mean(len(b) for b in blobs) / 1024
  return dict(
    ms_per_image=ms,
    draft_engaged=f'{engaged}/{len(blobs)}',
    draft_mean_abs_diff=statistics.mean(diffs),
    mean_file_kb=kb,
  )


def loader_rates(folder: str, args) -> list[dict]:
  """Steady images/s of the project's train and eval loaders for each worker count.

  Each loader makes one finite pass (train: ``num_epochs=1``) over the full split and one over
  its first quarter, timed from ``iter()`` to the last batch; the rate is
  ``(images_full - images_quarter) / (t_full - t_quarter)``, so worker start-up cancels and
  no work done ahead of the consumer (grain's read-ahead buffers) is left out of the window.
  Median of ``--repeats`` (a difference of two noisy times: the best would be biased up).
  """
  from ml_collections import ConfigDict

  from dualsig_jax.data import loaders

  rows = []
  for workers in args.headroom_workers:
    cfg = ConfigDict(
      dict(
        source='folder',
        dataset_name=METADATA_NAME,
        data_root=folder,
        metadata_root=os.path.join(folder, 'metadata'),
        train_split='train',
        resize_size=args.resize_size,
        crop_size=args.crop_size,
        eval_size=args.eval_size,
        num_workers=workers,
        skip_bad_images=False,
      )
    )

    def make(mode, split, cfg=cfg):
      if mode == 'train':
        c = ConfigDict(cfg.to_dict())
        c.train_split = split
        return loaders.make_train_loader(
          c, seed=0, num_epochs=1, process_index=0, process_count=1, batch_size=args.batch_size
        )
      return loaders.make_eval_loader(cfg, split, batch_size=args.batch_size)

    for mode in ('train', 'eval'):
      rates, cpu_ms = [], []
      for _ in range(args.repeats):
        (n_full, t_full, c_full), (n_q, t_q, c_q) = (
          _timed_pass(make(mode, split)) for split in (SPLITS[mode], SPLITS[mode] + QUARTER)
        )
        # A tiny smoke-size split can time the quarter no faster than the whole on a busy
        # machine; then fall back to the full pass, start-up included.
        dt = t_full - t_q
        rates.append((n_full - n_q) / dt if dt > 0 and n_full > n_q else n_full / t_full)
        if c_full is not None and n_full > n_q:
          cpu_ms.append(1e3 * (c_full - c_q) / (n_full - n_q))
      rate = statistics.median(rates)
      row = dict(mode=mode, workers=workers, img_s=rate, img_s_per_worker=rate / max(workers, 1))
      row['all_repeats'] = rates
      # CPU ms per image over the whole process tree: what one fully used core sustains,
      # independent of how busy the shared machine is.
      row['cpu_ms_per_image'] = statistics.median(cpu_ms) if cpu_ms else None
      rows.append(row)
      cpu = f'{row["cpu_ms_per_image"]:.2f} CPU ms/image' if cpu_ms else 'no psutil'
      print(
        f'  {mode} loader, {workers} workers: {rate:.1f} img/s (median of '
        f'{", ".join(f"{r:.0f}" for r in rates)}), {cpu}; load average '
        f'{os.getloadavg()[0]:.1f}',
        flush=True,
      )
  return rows


def _cpu_seconds() -> float | None:
  """User + system CPU seconds of this process and its live children (None without psutil)."""
  try:
    import psutil
  except ImportError:
    return None
  me = psutil.Process()
  total = 0.0
  for proc in [me, *me.children(recursive=True)]:
    try:
      t = proc.cpu_times()
      total += t.user + t.system
    except psutil.Error:  # a child that just exited
      pass
  return total


def _timed_pass(loader) -> tuple[int, float, float | None]:
  """(valid images, wall seconds, CPU seconds) of one pass, from ``iter()`` to the last batch.

  CPU time is read after every batch, while the worker processes are alive to be counted
  (they exit with the iterator); the reading after the last batch is the one kept.
  """
  cpu0, t0 = _cpu_seconds(), time.perf_counter()
  n, wall, cpu = 0, 0.0, cpu0
  for batch in loader:
    n += int(np.sum(batch['valid'])) if 'valid' in batch else batch['image'].shape[0]
    wall, cpu = time.perf_counter() - t0, _cpu_seconds()
  return n, wall, None if cpu0 is None else cpu - cpu0


def run(args) -> dict:
  w, h = (int(v) for v in args.headroom_size.lower().split('x'))
  folder = make_images(args.data_dir, args.num_images, (w, h))
  costs = stage_costs(folder, args)
  print(
    f'stage costs, one core, {args.stage_images} JPEGs {w}x{h} '
    f'(mean {costs["mean_file_kb"]:.0f} KB), median of {args.stage_repeats}:'
  )
  for name, ms in costs['ms_per_image'].items():
    print(f'  {name:48s} {ms:7.3f} ms/image  ({1e3 / ms:7.0f} /s)')
  print(
    f'  draft engaged on {costs["draft_engaged"]} images; mean |pixel diff| after the resize '
    f'vs full decode: {costs["draft_mean_abs_diff"]:.2f} (0..255)'
  )
  rows = loader_rates(folder, args)
  print('| loader | workers | img/s | img/s per worker | CPU ms/image | img/s per busy core |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    c = r['cpu_ms_per_image']
    cpu = f'{c:.2f} | {1e3 / c:.0f}' if c else '- | -'
    print(
      f'| {r["mode"]} | {r["workers"]} | {r["img_s"]:.1f} | {r["img_s_per_worker"]:.1f} | {cpu} |'
    )
  return dict(image_size=[w, h], stage=costs, loaders=rows)
