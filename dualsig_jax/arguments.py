"""What every command line of the project shares: every argument is a flag, and a parse error is
one line.

A word without its dashes (``config.vanilla.lr=0.1``) is a user's flag written wrong, never
something to drop: absl hands it back as a positional argument, which ``train.py`` and ``eval.py``
would ignore, so the run would train with the old value. :func:`refuse_positionals` makes it an
error naming the word and the flag it was probably meant to be. :class:`OneLineParser` is
``argparse.ArgumentParser`` whose errors (unknown or malformed arguments, a bad value) are one
line and exit status 2, as the project's other user errors.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ['OneLineParser', 'positional_error', 'refuse_positionals']


def positional_error(words: list[str]) -> str | None:
  """The one-line error for arguments that are not flags (``words``: what a parser left over,
  program name excluded), or None when there are none."""
  if not words:
    return None
  word = words[0]
  more = f' (and {len(words) - 1} more)' if len(words) > 1 else ''
  if word.startswith('-'):  # a flag after a bare '--', which ends the flags
    hint = "; a bare '--' ends the flags: remove it"
  elif '=' in word or word.startswith('config.'):  # a flag that lost its dashes
    hint = f'; did you mean --{word}?'
  elif word.lower() in ('true', 'false', 'yes', 'no', '0', '1'):  # `--skip_eval false`
    hint = '; a boolean flag takes its value after = (--name=false), or write --noname'
  else:
    hint = ''
  return (
    f'error: unexpected argument {word!r}{more}: every argument is a flag written '
    f'--name=value{hint}'
  )


def refuse_positionals(rest: list[str]) -> None:
  """Exits 2 with one line when ``rest`` (absl's leftover ``argv``: program name first) holds
  anything but the program name."""
  msg = positional_error(list(rest[1:]))
  if msg:
    print(msg, file=sys.stderr)
    sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose errors are one line (``prog: error: ... (see --help)``)
  and exit status 2; leftover words are named by :func:`positional_error`."""

  def error(self, message: str):
    if message.startswith('unrecognized arguments: '):
      words = message[len('unrecognized arguments: ') :].split()
      unknown = [w for w in words if w.startswith('-')]
      if not unknown:  # words without dashes: the common mistake, said as train.py says it
        self.exit(2, f'{self.prog}: {positional_error(words)}\n')
    self.exit(2, f'{self.prog}: error: {message} (see --help)\n')
