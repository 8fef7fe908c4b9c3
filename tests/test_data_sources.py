"""The user's files by extension (llama_jax/data/sources.py): Parquet rows (a text column),
ArrayRecord records, jsonl lines, txt/md files, mixed in one corpus; a file that is not what
its extension says is one line naming it.

The same 30 documents written in each format must give the same documents, so the formats
are checked against each other, and against the text itself.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python import array_record_module

from configs import base
from llama_jax import data

DOCS = [f"doc {i}: " + " ".join(["alpha", "béta", "γάμμα", "🙂"][j % 4] for j in range(i + 20))
        for i in range(30)]


def make_config(files, data_dir, **kw):
  c = base.get_config("tiny")
  c.model.vocab_size = 259
  c.data.update(dict(name="text_files", files=files, data_dir=str(data_dir), tokenizer="byte",
                     seq_len=17, batch_size=4, seed=0, **kw))
  return c


def _all_docs(c):
  corpus = data.open_corpus(c.data)
  return sorted(t for s in ("train", "validation") for chunk in corpus.texts(s) for t in chunk)


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
  d = tmp_path_factory.mktemp("fmt")
  for name in ("parquet", "ar", "jsonl", "txt"):
    (d / name).mkdir()
  # Parquet in two row groups, with an id column beside the text and one empty row.
  table = pa.table({"id": list(range(31)), "body": DOCS[:15] + [""] + DOCS[15:]})
  pq.write_table(table, d / "parquet" / "docs.parquet", row_group_size=16)
  w = array_record_module.ArrayRecordWriter(str(d / "ar" / "docs.array_record"), "group_size:4")
  for t in DOCS:
    w.write(t.encode("utf-8"))
  w.close()
  with open(d / "jsonl" / "docs.jsonl", "w") as f:
    for t in DOCS:
      f.write(json.dumps({"text": t}) + "\n")
  for i, t in enumerate(DOCS):
    (d / "txt" / f"{i:02d}.{'md' if i % 2 else 'txt'}").write_text(t)
  return d


def test_every_format_gives_the_same_documents(formats, tmp_path):
  want = sorted(DOCS)
  assert _all_docs(make_config(f"{formats}/parquet/*.parquet", tmp_path, text_feature="body")) == want
  assert _all_docs(make_config(f"{formats}/ar/*.array_record", tmp_path)) == want
  assert _all_docs(make_config(f"{formats}/jsonl/*.jsonl", tmp_path)) == want
  assert _all_docs(make_config(f"{formats}/txt/*.txt,{formats}/txt/*.md", tmp_path)) == want
  # Mixed in one corpus, and trained on through the loaders.
  c = make_config(f"{formats}/parquet/*.parquet,{formats}/ar/*", tmp_path, text_feature="body")
  assert _all_docs(c) == sorted(DOCS + DOCS)
  tok, train, _ = data.make_loaders(c)
  assert train.n_docs + data.make_loaders(c)[2].n_docs == 60
  assert "γάμμα" in tok.decode(train.tokens[:2000].tolist())


def test_a_file_that_is_not_what_its_extension_says(formats, tmp_path):
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "fake.parquet").write_text("just text, no footer")
  (bad / "fake.array_record").write_bytes(b"x" * 5000)
  (bad / "fake.txt").write_bytes(b"\0\1\2binary")
  for name, match in (("fake.parquet", "fake.parquet is not a Parquet file"),
                      ("fake.array_record", "fake.array_record is not an ArrayRecord file"),
                      ("fake.txt", "fake.txt is not a text file")):
    with pytest.raises(data.DataError, match=match) as e:
      data.make_loaders(make_config(str(bad / name), tmp_path))
    assert "\n" not in str(e.value)
  with pytest.raises(data.DataError, match="has no 'text' column .columns: \\['id', 'body'\\]"):
    data.make_loaders(make_config(f"{formats}/parquet/*.parquet", tmp_path))
  with pytest.raises(data.DataError, match="column 'id' holds int64, not text"):
    data.make_loaders(make_config(f"{formats}/parquet/*.parquet", tmp_path, text_feature="id"))
