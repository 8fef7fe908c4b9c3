"""An offline summarisation set from the embedded corpus: standard-library functions paired
with the first line of their docstrings, as SFT chat records.

  python -m llama_jax.data.docstrings --out=DIR     # DIR/train.jsonl, DIR/validation.jsonl

Each function or method (ast) with a docstring and a body besides it gives one record:
  user:      "Summarise this function:\\n" + its source without the docstring (dedented)
  assistant: the docstring's first line
Files split train/validation as the python_stdlib corpus splits them (corpora.validation_keys
of the same file list), so no held-out function's file was seen in pretraining or here.
Guide: docs/fine_tuning.md (The docstring demo).
"""

from __future__ import annotations

import ast
import json
import os
import textwrap

from llama_jax.data import corpora

INSTRUCTION = "Summarise this function:\n"


def _pairs(text: str) -> list[tuple[str, str]]:
  """(source without its docstring, first docstring line) of each function in a module."""
  try:
    tree = ast.parse(text)
  except (SyntaxError, ValueError):  # a few stdlib files are templates or other Pythons'
    return []
  lines = text.splitlines()
  out = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    doc = ast.get_docstring(node)
    first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
    if not first or len(node.body) < 2:  # nothing to summarise, or nothing but the docstring
      continue
    d = node.body[0]
    keep = (lines[node.lineno - 1:d.lineno - 1] + lines[d.end_lineno:node.end_lineno])
    out.append((textwrap.dedent("\n".join(keep)).strip("\n"), first))
  return out


def record(source: str, summary: str) -> dict:
  return {"messages": [{"role": "user", "content": INSTRUCTION + source},
                       {"role": "assistant", "content": summary}]}


def build(out_dir: str) -> dict:
  """Writes out_dir/{train,validation}.jsonl; returns the counts per split."""
  root = corpora.stdlib_dir()
  files = corpora.stdlib_files(root)
  held_out = corpora.validation_keys(files)
  os.makedirs(out_dir, exist_ok=True)
  counts = {"train": [0, 0], "validation": [0, 0]}  # [files, pairs]
  handles = {s: open(os.path.join(out_dir, f"{s}.jsonl"), "w") for s in counts}
  try:
    for rel in files:
      split = "validation" if rel in held_out else "train"
      with open(os.path.join(root, rel), "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
      pairs = _pairs(text)
      counts[split][0] += 1
      for source, summary in pairs:
        handles[split].write(json.dumps(record(source, summary), ensure_ascii=False) + "\n")
      counts[split][1] += len(pairs)
  finally:
    for h in handles.values():
      h.close()
  return {s: {"files": f, "pairs": p} for s, (f, p) in counts.items()}


def main(argv):
  del argv
  print(json.dumps(build(_OUT.value)))


if __name__ == "__main__":  # the flag only here: experiments/docstring_sft.py has its own --out
  from absl import flags

  _OUT = flags.DEFINE_string("out", None, "Directory for train.jsonl and validation.jsonl.",
                             required=True)
  from llama_jax import errors
  errors.run(main)
