"""The one exception a sweep raises for a user's mistake (see llama_jax.errors)."""

from llama_jax.errors import UserError


class SweepError(UserError, ValueError):
  """A mistake in an experiment file or the sweep's flags (a misspelt key, a value of the wrong
  type, an unknown --only name, a config file that is not there), found before anything runs.

  The message is one line naming the problem and the fix; the CLI prints it as `error: ...`.
  A ValueError too, so code that caught the ValueErrors of earlier versions still does.
  """
