"""The one exception the data pipeline raises for bad input."""

from llama_jax.errors import UserError


class DataError(UserError, ValueError):
  """Bad data input (corpus, files, tokenizer, sizes), found before training starts.

  The message is one line naming the problem and the fix; every entry point prints it as
  `error: ...` without a traceback (llama_jax.errors). A ValueError too, for callers that
  caught the ValueErrors of earlier versions.
  """
