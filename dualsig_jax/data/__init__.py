"""Data: wsolevaluation metadata, grain loaders (folder or TFDS), and the SYNTH benchmark.

Public API (see docs/design.md, "Data"):
  load_metadata, Metadata, MetadataError, check_labels               (metadata.py)
  resolve_metadata_root, shipped_metadata_root, split_metadata_dir  (paths.py)
  make_train_loader, make_eval_loader, steps_per_epoch, EvalLoader   (loaders.py)
  ensure_synthetic, generate                                         (synthetic.py)
  BadImageError                                                      (transforms.py)

Exports resolve lazily so that ``python -m dualsig_jax.data.synthetic`` worker processes do
not import grain/JAX.
"""

from dualsig_jax import lazy

_EXPORTS = {
  'load_metadata': 'metadata',
  'Metadata': 'metadata',
  'MetadataError': 'metadata',
  'check_labels': 'metadata',
  'resolve_metadata_root': 'paths',
  'shipped_metadata_root': 'paths',
  'split_metadata_dir': 'paths',
  'make_train_loader': 'loaders',
  'make_eval_loader': 'loaders',
  'steps_per_epoch': 'loaders',
  'EvalLoader': 'loaders',
  'ensure_synthetic': 'synthetic',
  'generate': 'synthetic',
  'BadImageError': 'transforms',
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy.exports(__name__, _EXPORTS)
