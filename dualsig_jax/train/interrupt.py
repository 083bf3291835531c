"""Clean stops on SIGTERM (preemption) and SIGINT (Ctrl-C).

Inside the step loop a signal only sets a flag (`deferred()`): the loop finishes its step,
saves a checkpoint with the data iterator's state, shuts the grain workers down and raises
`Interrupted`. Elsewhere (model building, evaluation) the handler raises `Interrupted` at once.
The flag stays set either way, so a raise swallowed by library code (an exception inside a
`__del__` or a finaliser is only printed) is raised again at the next `raise_if_requested()`:
a stopped run never goes on to its next stage.

`Interrupted` is a `SystemExit` whose code is 128 + the signal number (143 for SIGTERM, 130 for
SIGINT), the shell's convention: the process exits with it after every `finally` block and
atexit hook has run, without a traceback, and `except Exception` blocks do not catch it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

log = logging.getLogger('dualsig_jax')

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(SystemExit):
  """The run was stopped by a signal; exits with 128 + signum."""

  def __init__(self, signum: int, message: str = ''):
    super().__init__(128 + int(signum))
    self.signum = int(signum)
    self.message = message or f'stopped by {signal_name(signum)}'

  def __str__(self) -> str:
    return self.message


class _State:
  requested: int | None = None  # the first signal received while handlers were installed
  depth = 0  # nesting of handling()
  defer = 0  # nesting of deferred()
  previous: dict = {}


_state = _State()


def signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f'signal {signum}'


def _handler(signum, frame):
  del frame
  first = _state.requested is None
  if first:
    _state.requested = signum
  if _state.defer and first:
    log.warning(
      '%s received: finishing the current step, saving a checkpoint, then stopping '
      '(send it again to stop at once, without a checkpoint)',
      signal_name(signum),
    )
    return
  raise Interrupted(signum)


@contextlib.contextmanager
def handling():
  """Installs the SIGTERM / SIGINT handlers for the block (nested blocks share them; outside
  the main thread, where Python cannot install handlers, it does nothing)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  if _state.depth == 0:
    _state.requested = None
    _state.previous = {s: signal.signal(s, _handler) for s in SIGNALS}
  _state.depth += 1
  try:
    yield
  finally:
    _state.depth -= 1
    if _state.depth == 0:
      for s, h in _state.previous.items():
        signal.signal(s, h)
      _state.previous = {}


@contextlib.contextmanager
def deferred():
  """In this block a first signal only sets the flag (see `requested()`)."""
  _state.defer += 1
  try:
    yield
  finally:
    _state.defer -= 1


def requested() -> int | None:
  """The signal number received since the handlers were installed, or None."""
  return _state.requested


def raise_if_requested(message: str = '') -> None:
  """Raises Interrupted if a signal arrived (call it where a run may go on to new work)."""
  if _state.requested is not None:
    raise Interrupted(_state.requested, message)


def request(signum: int) -> None:
  """Sets the flag as if `signum` had arrived (another host of a multi-host job got it)."""
  if _state.requested is None:
    _state.requested = int(signum)
