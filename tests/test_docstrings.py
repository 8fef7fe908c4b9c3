"""llama_jax/data/docstrings.py: the offline summarisation set (functions and the first line of
their docstrings) that the docstring SFT demo fine-tunes on."""

import json
import textwrap

from llama_jax.data import corpora, docstrings

MODULE = textwrap.dedent('''
    """A module docstring is not a function's."""

    def add(a, b):
      """Adds two numbers.

      More words that the summary leaves out.
      """
      return a + b

    def bare(x):
      return x

    def only_a_docstring():
      """Nothing to summarise."""

    class K:
      async def fetch(self, url):
        """Fetches one URL."""
        data = await get(url)
        return data
    ''')


def test_pairs_keep_functions_with_a_docstring_and_a_body():
  pairs = dict((summary, source) for source, summary in docstrings._pairs(MODULE))
  assert sorted(pairs) == ["Adds two numbers.", "Fetches one URL."]
  assert pairs["Adds two numbers."] == "def add(a, b):\n  return a + b"  # docstring gone
  assert pairs["Fetches one URL."].startswith("async def fetch(self, url):\n  data = await")
  assert docstrings._pairs("def broken(:\n") == []  # a template, not Python: skipped
  rec = docstrings.record("def f(): pass", "Does f.")
  assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
  assert rec["messages"][0]["content"] == docstrings.INSTRUCTION + "def f(): pass"


def test_build_splits_by_the_corpus_held_out_files(tmp_path):
  counts = docstrings.build(str(tmp_path))
  files = corpora.stdlib_files()
  held_out = corpora.validation_keys(files)
  assert counts["validation"]["files"] == len(held_out) > 0
  assert counts["train"]["files"] + counts["validation"]["files"] == len(files)
  for split in ("train", "validation"):
    with open(tmp_path / f"{split}.jsonl") as f:
      records = [json.loads(line) for line in f]
    assert len(records) == counts[split]["pairs"] > 0
    user, assistant = records[0]["messages"]
    assert user["content"].startswith(docstrings.INSTRUCTION) and assistant["content"]
    assert "\n" not in assistant["content"]  # a summary is one line
