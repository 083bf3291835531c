"""TensorBoard event files of a run: training curves, evaluation metrics, per-epoch CAM overlays.

Written with TensorBoard's own event writer (`tensorboard.summary.writer`) and protocol buffers,
which need no TensorFlow: the `tensorboard` package is also what a user runs to look at the
files, and its reader is what the tests read them back with, so one dependency serves all
three (tensorboardX would be a second package for the same file format).

Layout: `<workdir>/tensorboard/<stage>/` for each training stage (step = the stage's step) and
`<workdir>/tensorboard/eval/` (step = the evaluated dual checkpoint's step), so TensorBoard
shows one run per stage. Only process 0 writes. A resumed stage first drops the events after
the step it resumed from (they were logged by the interrupted run and are logged again), so a
resumed run continues the same curves without duplicate steps; `metrics.jsonl` is truncated the
same way (`resume.truncate_metrics`).
"""

from __future__ import annotations

import glob
import io
import logging
import os
import time

import jax
import numpy as np

FOLDER = 'tensorboard'
# Record fields that are not curves (metrics.jsonl's bookkeeping).
_NOT_SCALARS = ('stage', 'step', 'event')

log = logging.getLogger('dualsig_jax')


def enabled(config) -> bool:
  """Whether this process writes TensorBoard files for `config` (process 0, option on)."""
  return bool(config.logging.tensorboard) and jax.process_index() == 0


def truncate_events(logdir: str, last_step: int) -> int:
  """Drops every summary event with step > `last_step` from the event files of `logdir`.

  Each file is rewritten next to itself and renamed over it, so a crash leaves the old file.
  Returns the number of events dropped.
  """
  from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer.record_writer import RecordWriter

  dropped = 0
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    # Raw records, copied byte for byte: the parsing loader would hand back scalars already
    # migrated to tensors, and writing those back would change what the file holds.
    records = list(RawEventFileLoader(path).Load())
    keep = []
    for raw in records:
      e = event_pb2.Event.FromString(raw)
      if not (e.HasField('summary') and e.step > last_step):
        keep.append(raw)
    if len(keep) == len(records):
      continue
    dropped += len(records) - len(keep)
    tmp = f'{path}.truncating'
    with open(tmp, 'wb') as f:
      writer = RecordWriter(f)
      for raw in keep:
        writer.write(raw)
    os.replace(tmp, path)
  return dropped


def _png(image: np.ndarray) -> bytes:
  """PNG bytes of a float `[H, W, 3]` image in [0, 1]."""
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buf, 'PNG')
  return buf.getvalue()


class Writer:
  """Scalars and images into one TensorBoard run folder (call on process 0 only)."""

  def __init__(self, logdir: str, *, resumed_from: int | None = None):
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    os.makedirs(logdir, exist_ok=True)
    if resumed_from is not None:
      truncate_events(logdir, resumed_from)
    self.logdir = logdir
    self._writer = EventFileWriter(logdir, flush_secs=30)

  def _add(self, step: int, values: list) -> None:
    from tensorboard.compat.proto import event_pb2, summary_pb2

    summary = summary_pb2.Summary(value=values)
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """One point per tag at `step` (tags are the dict's keys; non-finite values are kept)."""
    from tensorboard.compat.proto import summary_pb2

    self._add(
      step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
    )

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """A float32 `[H, W, 3]` image in [0, 1] at `step`, stored as PNG."""
    from tensorboard.compat.proto import summary_pb2

    h, w = image.shape[:2]
    img = summary_pb2.Summary.Image(
      height=h, width=w, colorspace=3, encoded_image_string=_png(image)
    )
    self._add(step, [summary_pb2.Summary.Value(tag=tag, image=img)])

  def record(self, record: dict) -> None:
    """The numbers of a metrics.jsonl record (losses, lr per group, speed...) at its step."""
    values = {
      k: v
      for k, v in record.items()
      if k not in _NOT_SCALARS and isinstance(v, int | float) and not isinstance(v, bool)
    }
    if values and 'step' in record:
      self.scalars(record['step'], values)

  def close(self) -> None:
    self._writer.close()


def flat_metrics(results: dict) -> dict[str, float]:
  """Evaluation results (`evaluate.evaluate`'s dict) as TensorBoard tags: the classification
  accuracies (`classification/softmax_top1`) and every number per method and head
  (`cam/sigmoid/top1_loc`, `cam/sigmoid/maxboxacc/50`, ...)."""
  out = {f'classification/{k}': v for k, v in results.get('classification', {}).items()}

  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(f'{prefix}/{k}', v)
    elif isinstance(node, int | float) and not isinstance(node, bool):
      out[prefix] = float(node)

  for method, heads in results.get('methods', {}).items():
    walk(method, heads)
  return out


def write_eval(config, workdir: str, results: dict, step: int | None, folder: str = 'eval') -> None:
  """Evaluation metrics into `<workdir>/tensorboard/<folder>` at `step` (process 0, option on);
  an evaluation of the same step again replaces the earlier points. `folder` is `eval` for the
  run's own evaluation settings and `eval-<tag>` for others (report.OutputNames), so another
  split or method never replaces the run's own curves."""
  if not enabled(config):
    return
  step = int(step or 0)
  w = Writer(os.path.join(workdir, FOLDER, folder), resumed_from=step - 1)
  w.scalars(step, flat_metrics(results))
  w.close()


def _fixed_images(config) -> dict | None:
  """The first `logging.tensorboard_images` valid images of the eval split, with labels and GT
  boxes (the same images at every epoch of every stage); None (with a warning) when the split
  cannot be read, since the pictures are not worth stopping a run for."""
  from dualsig_jax import data

  n = int(config.logging.tensorboard_images)
  if n <= 0:
    return None
  try:
    loader = data.make_eval_loader(config.input, config.input.eval_split, batch_size=n)
    batch = next(iter(loader))
  except (OSError, ValueError, KeyError, StopIteration) as e:
    log.warning(
      'TensorBoard CAM overlays off: cannot read split %r (%s)', config.input.eval_split, e
    )
    return None
  keep = np.asarray(batch['valid'], bool)
  return {
    'image': np.asarray(batch['image'])[keep],
    'label': np.asarray(batch['label'], np.int32)[keep],
    'boxes': [
      b[: int(k)]
      for b, k in zip(np.asarray(batch['boxes'])[keep], np.asarray(batch['num_boxes'])[keep])
    ],
  }


def _overlay_strip(images, maps, boxes, title: str) -> np.ndarray:
  """One row of CAM overlays with their GT boxes (green), titled; float32 `[H, W, 3]`."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Rectangle

  from dualsig_jax import cam

  n = len(images)
  fig = Figure(figsize=(2.2 * n, 2.6), dpi=80)
  canvas = FigureCanvasAgg(fig)
  axes = fig.subplots(1, n, squeeze=False)[0]
  for ax, image, m, bxs in zip(axes, images, maps, boxes):
    ax.imshow(cam.overlay(image, m))
    for x0, y0, x1, y1 in bxs:
      ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec='lime', lw=1.5))
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  canvas.draw()
  return np.asarray(canvas.buffer_rgba(), np.float32)[..., :3] / 255.0


class StageSummary:
  """What one training stage writes to TensorBoard: each metrics.jsonl record as scalars, and
  at each epoch's end the CAM of the ground-truth class from both heads over fixed validation
  images (`cams/softmax`, `cams/sigmoid`). Build on process 0 only (see `enabled`)."""

  def __init__(self, config, workdir: str, stage: str, model, resumed_from: int | None):
    from dualsig_jax import models

    self.writer = Writer(os.path.join(workdir, FOLDER, stage), resumed_from=resumed_from)
    self.stage = stage
    self.fixed = _fixed_images(config)
    # Plain CAM reads a linear / 1x1-conv head; an MLP head (standard VGG16) gets Grad-CAM.
    self.method = 'cam' if getattr(model, 'head_kind', None) in ('linear', 'conv') else 'gradcam'
    self.fns = models.cam_fns(model)

  def record(self, record: dict) -> None:
    self.writer.record(record)

  def epoch_end(self, step: int, epoch: int, variables) -> None:
    """Both heads' CAM overlays at `step`. `variables`: the stage's (replicated) variables."""
    if self.fixed is None:
      return
    from dualsig_jax import cam

    # This process's copy of the replicated state: the maps run on one local device only.
    local = jax.tree.map(lambda x: x.addressable_data(0), variables)
    maps, _ = cam.compute_cams_multi(
      self.fns['apply_fn'],
      local,
      self.fixed['image'],
      methods=(self.method,),
      targets=self.fixed['label'],
      head_fn=self.fns['head_fn'],
      head_weights_fn=self.fns['head_weights_fn'],
    )
    for head in ('softmax', 'sigmoid'):
      title = (
        f'{self.stage} stage, epoch {epoch}, step {step}: {self.method} of the {head} head, '
        'GT class (green: ground-truth box)'
      )
      strip = _overlay_strip(
        self.fixed['image'], np.asarray(maps[(self.method, head)]), self.fixed['boxes'], title
      )
      self.writer.image(step, f'cams/{head}', strip)

  def close(self) -> None:
    self.writer.close()
