"""train.py with every checkpoint save held open for SLOW_SAVE_S seconds, so a test can signal
it during a save: the data-position item of each save touches `<SLOW_SAVE_MARKERS>/<n>` and
then waits before writing (inside Orbax's save of that step, in its temporary folder)."""

import os
import runpy
import sys
import time

import grain.python as grain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_save = grain.PyGrainCheckpointHandler.save


def _slow_save(self, directory, *args, **kwargs):
  markers = os.environ['SLOW_SAVE_MARKERS']
  os.makedirs(markers, exist_ok=True)
  with open(os.path.join(markers, str(len(os.listdir(markers)))), 'w') as f:
    f.write(str(directory))
  time.sleep(float(os.environ.get('SLOW_SAVE_S', '5')))
  return _save(self, directory, *args, **kwargs)


grain.PyGrainCheckpointHandler.save = _slow_save
sys.argv = [os.path.join(ROOT, 'train.py'), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name='__main__')
