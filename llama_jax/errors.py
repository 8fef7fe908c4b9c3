"""The one error type for a user's mistakes, and the one wrapper every entry point runs under.

A UserError (a bad config value, an unknown key, data that is not there, a mesh that does not
fit the devices, a workdir without checkpoints) carries one line that names the problem and the
fix. Entry points (run_train, evaluate, generate, sweep, scaling) print it as `error: ...` and
exit with status 2; any other exception is a bug and keeps its traceback.

The absl entry points start with `run(main)`: absl parses the flags before main runs, so its
flag errors (an unknown flag, a value of the wrong type, a required flag left out) are turned
into UserErrors there too, instead of absl's own `FATAL Flags parsing error` and exit 1.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Callable, NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A mistake the user can fix; the message is one line naming the problem and the fix."""


def report(error: UserError) -> None:
  """Prints a user error as the one line `error: ...` on stderr."""
  message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
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


# ---------------------------------------------------------------------------- absl


def _innermost_user_error(error: BaseException) -> UserError | None:
  """The first UserError raised in the chain that led to `error`, if any: absl and
  ml_collections re-raise a flag parser's exception as their own, and a config file's
  ConfigError reaches us wrapped twice."""
  found, seen = None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, UserError):
      found = error
    error = error.__cause__ or error.__context__
  return found


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (what app.run does by default), its errors as UserErrors."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    user = _innermost_user_error(e)
    if user is not None:
      raise user from None
    if "Error whilst parsing config file" in str(e):
      raise  # ml_collections' wrapping of a bug in a config file: keep its traceback
    raise UserError(f"{' '.join(str(e).split())}; see --help") from None


def run(main: Callable[[list[str]], Any],
        flags_parser: Callable[[list[str]], Any] = parse_flags) -> None:
  """absl's app.run(main) with flag parsing and main both under `cli`."""
  from absl import app
  app.run(cli(main), flags_parser=cli(flags_parser))


# ---------------------------------------------------------------------------- argparse


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are UserErrors (one line, exit 2 under `cli`) rather than
  argparse's usage block followed by its own error line."""

  def error(self, message: str) -> NoReturn:
    raise UserError(f"{message}; see {self.prog} --help")
