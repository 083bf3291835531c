"""dualsig-jax: the dual-branch sigmoid architecture for accurate class activation maps
(Oh & Noh, BMVC 2025) in JAX/Flax.

Subpackages: `models` (backbones, the dual branch, checkpoints of both families), `cam` (jitted
CAM methods, `explain`, fidelity), `wsol` (localization metrics), `data`, `train` (both stages,
TensorBoard summaries). Modules: `convert` (PyTorch weights), `evaluate` (eval.py's library),
`experiment` (train.py's), `paper` (the published tables), `report` (results.md). Importing this
package imports nothing heavy.
"""

from importlib import metadata as _metadata

try:
  __version__ = _metadata.version('dualsig-jax')
except _metadata.PackageNotFoundError:  # a source tree that was never installed
  __version__ = '0+unknown'
