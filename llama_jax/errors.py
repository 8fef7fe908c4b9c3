"""The one error type for a user's mistakes, and the one wrapper every entry point runs under.

A UserError (a bad config value, an unknown key, data that is not there, a mesh that does not
fit the devices, a workdir without checkpoints) carries one line that names the problem and the
fix. Entry points (run_train, evaluate, generate, sweep, scaling) print it as `error: ...` and
exit with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A mistake the user can fix; the message is one line naming the problem and the fix."""


def report(error: UserError) -> None:
  """Prints a user error as the one line `error: ...` on stderr."""
  message = " ".join(str(error).split("\n"))
  print(f"error: {message}", file=sys.stderr, flush=True)


def cli(main: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps an entry point's main: a UserError prints one line and exits 2, anything else
  propagates with its traceback."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as e:
      report(e)
      sys.exit(EXIT_USER_ERROR)

  return wrapped
