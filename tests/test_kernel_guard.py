"""A damaged WSOL box kernel never kills the process (issue 23 item 10): the library is checked
against the digest setup.py recorded when it built it, and a library without that record is
first loaded and checked in a child process with a time limit, the verdict cached by digest.
Garbled code, dynamic section, dynamic symbol table, relocations or init pointers, and libraries
that trap, crash, loop or exit, each give the exact fallback with one warning, in a process that
goes on."""

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dualsig_jax.wsol import levels, native

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = native.library_path()
pytestmark = pytest.mark.skipif(LIB is None, reason='the WSOL box kernel was not built')
NAME = os.path.basename(LIB or '')


def _sections(path) -> dict[str, tuple[int, int]]:
  """{section name: (file offset, size)} of a little-endian ELF64 file."""
  data = open(path, 'rb').read()
  (shoff,) = struct.unpack_from('<Q', data, 40)
  shentsize, shnum, shstrndx = struct.unpack_from('<HHH', data, 58)
  heads = [struct.unpack_from('<IIQQQQ', data, shoff + i * shentsize) for i in range(shnum)]
  names_at = heads[shstrndx][4]
  out = {}
  for name, kind, _, _, offset, size in heads:
    if kind == 8:  # NOBITS (.bss): nothing in the file
      continue
    end = data.index(b'\0', names_at + name)
    out[data[names_at + name : end].decode()] = (offset, size)
  return out


def _library(folder, content: bytes, digest_of: bytes | None = None) -> str:
  """Writes ``content`` as the kernel library in ``folder`` (+ a recorded digest of
  ``digest_of`` when given); returns the folder."""
  import hashlib

  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, NAME), 'wb') as f:
    f.write(content)
  if digest_of is not None:
    with open(os.path.join(folder, NAME + '.sha256'), 'w') as f:
      f.write(hashlib.sha256(digest_of).hexdigest() + '  ' + NAME + '\n')
  return str(folder)


# Loads each folder's library as the kernel in one process and checks that the box IoUs are the
# exact fallback's; prints one JSON line per folder (status, warnings).
_PROBE = """
import json, sys, warnings
import numpy as np
from dualsig_jax.wsol import image_box_ious, native
native._CHILD_TIMEOUT = float(sys.argv[1])
m = np.zeros((20, 20), np.float32); m[5:15, 5:15] = 1.0; m[8:12, 8:12] = 0.3
thr = np.arange(0, 1, 0.05)
want = image_box_ious(m, [[5, 5, 15, 15]], thr, native=False)
for folder in sys.argv[2:]:
  native._FOLDER, native._STATE = folder, None
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    got = image_box_ious(m, [[5, 5, 15, 15]], thr)
  assert all(np.array_equal(got[k], want[k]) for k in want), folder
  print(json.dumps({'folder': folder, 'status': native.status(),
                    'warnings': [str(x.message) for x in w]}), flush=True)
print('survived')
"""


def _probe(folders, tmp_path, timeout_s=60.0, cache=None):
  env = {**os.environ, 'XDG_CACHE_HOME': str(cache or tmp_path / 'cache')}
  env.pop('DUALSIG_JAX_NATIVE', None)
  proc = subprocess.run(
    [sys.executable, '-c', _PROBE, str(timeout_s), *map(str, folders)],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
    cwd=REPO,
  )
  assert proc.returncode == 0, f'the process died ({proc.returncode}): {proc.stderr[-2000:]}'
  lines = proc.stdout.splitlines()
  assert lines[-1] == 'survived', proc.stdout
  return {r['folder']: r for r in map(json.loads, lines[:-1])}


def _garbled() -> dict[str, bytes]:
  data = open(LIB, 'rb').read()
  sections = _sections(LIB)
  rng = np.random.default_rng(0)
  out = {}
  for section in ('.text', '.dynamic', '.dynsym', '.dynstr', '.gnu.hash', '.rela.dyn'):
    offset, size = sections[section]
    for fill in ('random', 'ff'):
      body = rng.bytes(size) if fill == 'random' else b'\xff' * size
      out[f'{section}-{fill}'] = data[:offset] + body + data[offset + size :]
  offset, size = sections['.init_array']
  out['.init_array-pointer'] = data[:offset] + struct.pack('<Q', 0xDEAD0000) + data[offset + 8 :]
  return out


def test_garbled_library_with_its_build_digest_is_never_loaded(tmp_path):
  """The installed case: the library's bytes changed after the build recorded their digest."""
  original = open(LIB, 'rb').read()
  folders = {
    name: _library(tmp_path / name, content, digest_of=original)
    for name, content in _garbled().items()
  }
  results = _probe(folders.values(), tmp_path)
  for name, folder in folders.items():
    r = results[folder]
    assert r['status'].startswith('fallback: ') and 'sha256 differs' in r['status'], (name, r)
    assert len(r['warnings']) == 1 and 'slower' in r['warnings'][0], (name, r)
  assert not (tmp_path / 'cache').exists()  # no child process was needed


def test_garbled_library_without_a_digest_is_checked_in_a_child(tmp_path):
  """No recorded digest: the child process takes the blow; the parent never loads a library
  that killed it. (Harmless garbles may pass the child's check: then results are still exact.)"""
  folders = {name: _library(tmp_path / name, content) for name, content in _garbled().items()}
  results = _probe(folders.values(), tmp_path)
  killed = 0
  for name, folder in folders.items():
    r = results[folder]
    if r['status'].startswith('native: '):
      assert r['warnings'] == [], (name, r)
      continue
    assert len(r['warnings']) == 1 and 'slower' in r['warnings'][0], (name, r)
    killed += 'killed its check process' in r['status']
  # These would have killed this process: garbled code and dynamic sections do.
  assert killed >= 3, results
  assert len(os.listdir(tmp_path / 'cache' / 'dualsig_jax')) == len(folders)  # verdicts cached


_HOSTILE_C = {
  'trap_on_call': 'int wsol_level_ious(){ __builtin_trap(); return 0; }',
  'segv_on_call': 'int wsol_level_ious(){ *(volatile int *)0 = 1; return 0; }',
  'fpe_on_call': 'static volatile int z = 0;\nint wsol_level_ious(){ return 7 / z; }',
  'loop_on_call': 'int wsol_level_ious(){ for (;;) {} return 0; }',
  'trap_on_load': '__attribute__((constructor)) static void c(void){ __builtin_trap(); }\n'
  'int wsol_level_ious(){ return 0; }',
  'loop_on_load': '__attribute__((constructor)) static void c(void){ for (;;) {} }\n'
  'int wsol_level_ious(){ return 0; }',
  'exit_on_load': '#include <unistd.h>\n'
  '__attribute__((constructor)) static void c(void){ _exit(0); }\n'
  'int wsol_level_ious(){ return 0; }',
  'wrong_answers': 'int wsol_level_ious(){ return 0; }',  # leaves its outputs unset
  'no_symbol': 'int something_else(void){ return 0; }',
}


def test_libraries_that_trap_crash_loop_or_exit_give_the_fallback(tmp_path):
  gcc = shutil.which('gcc') or shutil.which('cc')
  if gcc is None:
    pytest.skip('no C compiler to build the hostile libraries')
  folders = {}
  for name, code in _HOSTILE_C.items():
    (tmp_path / f'{name}.c').write_text(code + '\n')
    so = tmp_path / f'{name}.so'
    subprocess.run([gcc, '-shared', '-fPIC', '-O0', '-o', so, tmp_path / f'{name}.c'], check=True)
    folders[name] = _library(tmp_path / name, so.read_bytes())
  results = _probe(folders.values(), tmp_path, timeout_s=5.0)
  why = {name: results[folder]['status'] for name, folder in folders.items()}
  for name, folder in folders.items():
    r = results[folder]
    assert r['status'].startswith('fallback: '), (name, r)
    assert len(r['warnings']) == 1 and len(r['warnings'][0].splitlines()) == 1, (name, r)
  assert 'SIGILL' in why['trap_on_call'] and 'SIGILL' in why['trap_on_load'], why
  assert 'SIGSEGV' in why['segv_on_call'] and 'SIGFPE' in why['fpe_on_call'], why
  assert 'did not finish within 5 s' in why['loop_on_call'], why
  assert 'did not finish within 5 s' in why['loop_on_load'], why
  assert 'before the check ran' in why['exit_on_load'], why
  assert 'self-check' in why['wrong_answers'] and 'does not load' in why['no_symbol'], why


def test_the_verdict_is_cached_by_digest(tmp_path):
  """The real library without a recorded digest: one child check, then the cached verdict; a
  cached failure is obeyed (and named, with how to check again); an unwritable cache only
  costs a check per process."""
  folder = _library(tmp_path / 'real', open(LIB, 'rb').read())
  first = _probe([folder], tmp_path)[folder]
  assert first['status'] == f'native: {folder}/{NAME}' and first['warnings'] == [], first
  (cache,) = (tmp_path / 'cache' / 'dualsig_jax').iterdir()
  record = json.loads(cache.read_text())
  assert record['verdict'] == 'ok' and cache.name == f'wsol-kernel-{record["sha256"]}.json'
  record['verdict'] = 'it killed its check process (SIGSEGV)'
  cache.write_text(json.dumps(record))
  second = _probe([folder], tmp_path)[folder]
  assert 'SIGSEGV' in second['status'] and str(cache) in second['warnings'][0], second
  blocked = tmp_path / 'a_file'
  blocked.write_text('not a folder')
  third = _probe([folder], tmp_path, cache=blocked)[folder]
  assert third['status'].startswith('native: '), third


def test_import_with_a_matching_digest_starts_no_process(tmp_path):
  """The normal case stays fast: the installed library with its build digest is loaded without
  a child process (subprocess is blocked in this interpreter)."""
  if not os.path.isfile(LIB + native.DIGEST_SUFFIX):
    pytest.skip('this install has no recorded digest (built before setup.py recorded one)')
  code = """
  import subprocess
  def refuse(*a, **k):
    raise AssertionError('a child process was started')
  subprocess.run = subprocess.Popen = refuse
  import dualsig_jax.wsol as wsol
  print(wsol.KERNEL)
  """
  env = {**os.environ, 'XDG_CACHE_HOME': str(tmp_path / 'cache')}
  env.pop('DUALSIG_JAX_NATIVE', None)
  proc = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, env=env
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == f'native: {LIB}'
  assert not (tmp_path / 'cache').exists()


def test_self_check_answers_are_the_exact_fallbacks():
  """native's expected answers on its check map are what the exact fallback (OpenCV, the
  reference's computation) gives, and the installed kernel gives them too."""
  q, lv, gt, want = native._check_map()
  exact = levels.exact_level_ious(q, lv, gt)
  for e, w in zip(exact, want[:3]):
    np.testing.assert_array_equal(e, w)
  assert native.check_library(LIB)
