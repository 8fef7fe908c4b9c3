"""The user's own files as documents, by extension: what a `data.files` / `files:GLOB` file is.

  .jsonl          one document per non-empty line: a JSON object with "text", or an SFT
                  record with "messages" or "prompt"/"completion" (sft.py)
  .parquet        one document per row of the text column (data.text_feature, 'text'), read
                  in record batches with pyarrow
  .array_record   one document per record, the record's bytes as UTF-8 (array_record's reader)
  anything else   one document per file: .txt, .md, .py, ... (UTF-8; NUL bytes mean binary)

A file that is not what its extension says (a .parquet that pyarrow cannot open, an
.array_record that array_record cannot, a text file with NUL bytes) is a DataError naming it,
found when the corpus is configured, before anything is built.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

from llama_jax.data import sft
from llama_jax.data.errors import DataError

TEXT_FEATURE = "text"
BATCH_ROWS = 1024  # documents read at a time from a Parquet or ArrayRecord file


def decode_text(data: bytes, path: str = "") -> str:
  """UTF-8 text of a file; NUL bytes mean binary (DataError), stray invalid bytes -> U+FFFD."""
  if b"\0" in data:
    raise DataError(f"{path} is not a text file (it contains NUL bytes); "
                    "remove it from data.files or narrow the glob")
  return data.decode("utf-8", errors="replace")


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _parquet(path: str, column: str):
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    f = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path} is not a Parquet file ({_first_line(e)}); fix or rename it, or "
                    "drop it from data.files") from None
  schema = f.schema_arrow
  if column not in schema.names:
    raise DataError(f"{path} has no {column!r} column (columns: {schema.names}); set "
                    "data.text_feature to its text column")
  kind = schema.field(column).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    raise DataError(f"{path}: column {column!r} holds {kind}, not text; set data.text_feature "
                    "to a string column")
  return f


def _array_record(path: str):
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(path)
  if not reader.ok():
    raise DataError(f"{path} is not an ArrayRecord file (array_record cannot read it); fix or "
                    "rename it, or drop it from data.files")
  return reader


def check(path: str, column: str = TEXT_FEATURE) -> None:
  """DataError if the file is not what its extension says (cheap: headers only)."""
  if path.endswith(".parquet"):
    _parquet(path, column)
  elif path.endswith(".array_record"):
    _array_record(path).close()
  else:
    with open(path, "rb") as f:
      decode_text(f.read(8000), path)  # git's binary test: a NUL in the first 8000 bytes


def _content_key(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def documents(path: str, key: str,
              column: str = TEXT_FEATURE) -> Iterator[tuple[str, str, str | None]]:
  """(split key, document key, text) of each non-empty document of a file; text None means
  'the whole file, read when needed'. Records split by their content hash, whole files by key."""
  if path.endswith(".jsonl"):
    yield from _jsonl(path, key)
  elif path.endswith(".parquet"):
    n = 0
    for batch in _parquet(path, column).iter_batches(batch_size=BATCH_ROWS, columns=[column]):
      for text in batch.column(0).to_pylist():
        n += 1
        if text:
          h = _content_key(text)
          yield h, f"{key}:{n}:{h}", text
  elif path.endswith(".array_record"):
    reader = _array_record(path)
    try:
      total = reader.num_records()
      for start in range(0, total, BATCH_ROWS):
        for i, raw in enumerate(reader.read(start, min(total, start + BATCH_ROWS)), start + 1):
          text = decode_text(raw, f"{path} record {i}")
          if text:
            h = _content_key(text)
            yield h, f"{key}:{i}:{h}", text
    finally:
      reader.close()
  elif os.path.getsize(path):
    yield key, key, None


def _jsonl(path: str, key: str) -> Iterator[tuple[str, str, str]]:
  """Per non-empty line of a .jsonl file; the split key is the line's content hash. A bad
  record (sft.document) is a DataError naming path:line."""
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      line = decode_text(raw, f"{path}:{n}")
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n} is not valid JSON ({e.msg}); "
                        "fix the line or drop the file from data.files") from None
      text = sft.document(obj, f"{path}:{n}")  # text, or an SFT record (messages, prompt)
      h = hashlib.sha256(raw).hexdigest()[:16]
      if text:
        yield h, f"{key}:{n}:{h}", text
