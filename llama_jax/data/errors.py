"""The one exception the data pipeline raises for bad input."""


class DataError(ValueError):
  """Bad data input (corpus, files, tokenizer, sizes), found before training starts.

  The message is one line naming the problem and the fix; run_train prints it without a
  traceback.
  """
