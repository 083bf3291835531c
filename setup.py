"""How the WSOL box kernel's build is reported; everything else is in pyproject.toml.

pyproject.toml declares the kernel (``ext-modules``: dualsig_jax/wsol/_levelsets.c, a plain C
library loaded with ctypes by dualsig_jax/wsol/native.py). This command adds two rules to
setuptools' ``build_ext``:

- no C compiler on this machine (or ``DUALSIG_JAX_BUILD_KERNEL=0``): the kernel is skipped and
  the install goes on; the evaluator then warns at run time and uses its exact per-level OpenCV
  fallback (slower, same results);
- a compiler that fails on the kernel fails the install, with the compiler's message and the
  two ways out;
- a built kernel gets its sha256 recorded next to it (``<library>.sha256``): the package loads
  only those bytes in its own process (a damaged library could kill it), and checks any other
  library in a child process first (dualsig_jax/wsol/native.py).
"""

import hashlib
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

_SKIP_HINT = (
  'the WSOL box evaluator will use its exact per-level OpenCV fallback, about 8x slower (over '
  '20x on speckled maps); '
  'install a C compiler (e.g. apt-get install gcc) and reinstall to build it'
)


class BuildKernel(build_ext):
  """``build_ext`` that skips the kernel without a compiler and explains a failed build."""

  def build_extensions(self):
    reason = None
    if os.environ.get('DUALSIG_JAX_BUILD_KERNEL', '1') == '0':
      reason = 'DUALSIG_JAX_BUILD_KERNEL=0'
    elif self.compiler.compiler_type != 'unix':  # the kernel uses GCC / Clang builtins
      reason = f'compiler {self.compiler.compiler_type!r} is not supported (GCC or Clang is)'
    elif not shutil.which(self.compiler.compiler_so[0]):
      reason = f'no C compiler found ({self.compiler.compiler_so[0]!r} is not on PATH)'
    if reason:
      # stderr: pip shows it with -v (setuptools' own log level may hide announce()).
      print(
        f'dualsig_jax: not building the WSOL box kernel ({reason}); {_SKIP_HINT}', file=sys.stderr
      )
      self.extensions = []
      return
    try:
      super().build_extensions()
    except Exception as e:
      why = str(e).rstrip('.')
      raise type(e)(
        f'dualsig_jax: building the WSOL box kernel (dualsig_jax/wsol/_levelsets.c) failed: {why}. '
        'Fix the C compiler, or install without the kernel with DUALSIG_JAX_BUILD_KERNEL=0 '
        '(the box evaluator then uses its exact per-level OpenCV fallback, 8-25x slower).'
      ) from e

  def run(self):
    super().run()
    # Record the digest of every library built (self.extensions is [] when skipped), in the
    # build folder (wheels) and, for pip install -e / --inplace, next to the copy in the source.
    for ext in self.extensions:
      for inplace in dict.fromkeys((False, bool(self.inplace))):
        saved, self.inplace = self.inplace, inplace
        path = self.get_ext_fullpath(ext.name)
        self.inplace = saved
        if os.path.isfile(path):
          with open(path, 'rb') as f:
            digest = hashlib.sha256(f.read()).hexdigest()
          with open(path + '.sha256', 'w') as f:
            f.write(f'{digest}  {os.path.basename(path)}\n')


setup(cmdclass={'build_ext': BuildKernel})
