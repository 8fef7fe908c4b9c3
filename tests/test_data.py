"""Data pipeline: corpora, tokenizers, token cache, step-indexed loaders and bad input.

Every test works in a tmp data_dir on tiny corpora: a few generated files (text_files) and a
30-file slice of the real standard-library corpus (built through the public build_corpus).
"""

import json
import os
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import base
from llama_jax import data
from llama_jax.data import corpora

SPM_VOCAB = 384   # 259 byte/special pieces + characters + merges
SEQ, BATCH = 31, 6
NON_ASCII = "café naïve — 中文字符 🙂🚀 ünïcødé"


def _words(rng, n):
  syll = ["ka", "lo", "mi", "tu", "re", "sa", "no", "vi", "ze", "pha", "qu", "ist", "ent"]
  return " ".join("".join(rng.choice(syll, rng.integers(1, 4))) for _ in range(n))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  """9 text documents + a 40-line jsonl, ~40 KB, with non-ASCII text and Python code."""
  d = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  for i in range(6):
    (d / f"doc{i}.txt").write_text(
        "\n".join(_words(rng, 60) + (f" {NON_ASCII}" if i % 2 else "") for _ in range(12)))
  (d / "notes.md").write_text(f"# Notes\n\n* {NON_ASCII}\n* {_words(rng, 200)}\n")
  (d / "code.py").write_text("def f(x):\n    return x * 2  # 12345\n\n\nclass A:\n    pass\n" * 20)
  (d / "bad_utf8.txt").write_bytes(b"caf\xe9 latin-1 byte\n" + _words(rng, 300).encode())
  with open(d / "lines.jsonl", "w") as f:
    for i in range(40):
      f.write(json.dumps({"text": f"{i} {_words(rng, 40)} {NON_ASCII if i % 3 else ''}",
                          "id": i}) + "\n")
  return d


def make_config(data_dir, **overrides):
  c = base.get_config("tiny")
  c.model.vocab_size = SPM_VOCAB
  c.data.update(dict(name="text_files", data_dir=str(data_dir), tokenizer="spm", seq_len=SEQ,
                     batch_size=BATCH, seed=0))
  for k, v in overrides.items():
    if k == "vocab_size":
      c.model.vocab_size = v
    else:
      c.data[k] = v
  return c


@pytest.fixture(scope="module")
def files_cfg(corpus_dir, tmp_path_factory):
  """text_files config with a trained spm tokenizer; caches built once for the module."""
  c = make_config(tmp_path_factory.mktemp("data"), files=f"{corpus_dir}/*.txt,{corpus_dir}/*.md,"
                  f"{corpus_dir}/*.py,{corpus_dir}/*.jsonl")
  data.make_loaders(c)
  return c


@pytest.fixture(scope="module")
def byte_cfg(files_cfg):
  c = make_config(files_cfg.data.data_dir, files=files_cfg.data.files, tokenizer="byte",
                  vocab_size=259)
  data.make_loaders(c)
  return c


# ------------------------------------------------------------------------------ determinism

def test_same_seed_same_batch_from_fresh_loaders(files_cfg):
  _, a, ea = data.make_loaders(files_cfg)
  _, b, eb = data.make_loaders(files_cfg)
  for step in (0, 7, 123):
    for k, v in a.batch(step).items():
      np.testing.assert_array_equal(v, b.batch(step)[k])
  np.testing.assert_array_equal(ea.batch(2)["inputs"], eb.batch(2)["inputs"])
  c = files_cfg.copy_and_resolve_references()
  c.data.seed = 1
  _, other, _ = data.make_loaders(c)
  assert not np.array_equal(other.batch(0)["inputs"], a.batch(0)["inputs"])


def test_batch_layout(files_cfg):
  tok, train, _ = data.make_loaders(files_cfg)
  b = train.batch(3)
  assert set(b) == {"inputs", "targets"}
  assert b["inputs"].shape == b["targets"].shape == (BATCH, SEQ)
  assert b["inputs"].dtype == np.int32
  np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])  # shifted by one
  ids = train.window_ids(3)
  for r, w in enumerate(ids):  # row r is window w of the token stream
    np.testing.assert_array_equal(b["inputs"][r], train.tokens[w * SEQ:w * SEQ + SEQ])
  assert 0 <= b["inputs"].min() and b["targets"].max() < tok.vocab_size
  assert train.tokens_per_batch == BATCH * SEQ


def test_processes_get_disjoint_rows_that_make_the_global_batch(files_cfg):
  _, full, _ = data.make_loaders(files_cfg, process_index=0, process_count=1)
  parts = [data.make_loaders(files_cfg, process_index=i, process_count=2)[1] for i in (0, 1)]
  np.testing.assert_array_equal(parts[0].row_ids, np.arange(BATCH // 2))
  np.testing.assert_array_equal(parts[1].row_ids, np.arange(BATCH // 2, BATCH))
  for step in (0, 5):
    ids = [p.window_ids(step) for p in parts]
    assert not set(ids[0]) & set(ids[1])
    np.testing.assert_array_equal(np.concatenate(ids), full.window_ids(step))
    np.testing.assert_array_equal(
        np.concatenate([p.batch(step)["inputs"] for p in parts]), full.batch(step)["inputs"])
  with pytest.raises(data.DataError, match="divisible by the 4 processes"):
    data.make_loaders(files_cfg, process_index=0, process_count=4)


def test_iterate_from_k_equals_running_up_to_k(files_cfg):
  _, train, _ = data.make_loaders(files_cfg)
  it = train.iterate(0)
  run = [next(it) for _ in range(8)]
  it.close()
  resumed = train.iterate(5)
  for want_step, want in run[5:]:
    step, got = next(resumed)
    assert step == want_step
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    np.testing.assert_array_equal(got["inputs"], train.batch(step)["inputs"])
  resumed.close()


def test_epoch_boundary(byte_cfg):
  """Each epoch visits every window once, in a fresh permutation; batches span the seam."""
  _, train, _ = data.make_loaders(byte_cfg)
  n, B = train.n_windows, train.batch_size
  assert n % B, "want an epoch that ends inside a batch"
  steps = 2 * n // B + 2
  flat = np.concatenate([train.window_ids(s) for s in range(steps)])
  e0, e1 = flat[:n], flat[n:2 * n]
  np.testing.assert_array_equal(np.sort(e0), np.arange(n))
  np.testing.assert_array_equal(np.sort(e1), np.arange(n))
  assert not np.array_equal(e0, e1)
  seam = n // B  # the step whose batch crosses from epoch 0 into epoch 1
  assert train.epoch(seam) == 0 and train.epoch(seam + 1) == 1
  np.testing.assert_array_equal(
      train.window_ids(seam), np.concatenate([e0[seam * B:], e1[:(seam + 1) * B - n]]))


def test_eval_batches_are_a_fixed_function_of_i(files_cfg):
  _, _, ev = data.make_loaders(files_cfg)
  n = ev.n_windows
  for i in (0, 1, 9):
    np.testing.assert_array_equal(ev.window_ids(i), (i * BATCH + np.arange(BATCH)) % n)
  np.testing.assert_array_equal(ev.batch(1)["inputs"], ev.batch(1)["inputs"])
  assert ev.num_batches == max(1, n // BATCH)


def test_sharded_global_arrays(files_cfg):
  """With a batch sharding the loader returns global jax.Arrays equal to the numpy batch."""
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  _, train, _ = data.make_loaders(files_cfg, batch_sharding=sharding)
  _, plain, _ = data.make_loaders(files_cfg)
  b = train.batch(4)
  assert isinstance(b["inputs"], jax.Array) and b["inputs"].shape == (BATCH, SEQ)
  assert b["inputs"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(b["targets"]), plain.batch(4)["targets"])
  step, it_b = next(train.iterate(4))
  np.testing.assert_array_equal(np.asarray(it_b["inputs"]), plain.batch(4)["inputs"])
  odd = NamedSharding(Mesh(np.array(jax.devices()[:4]), ("data",)), P("data"))
  with pytest.raises(data.DataError, match="batch_size=6"):
    data.make_loaders(files_cfg, batch_sharding=odd)


def test_packing_segments_and_positions(byte_cfg):
  bos = 1
  inputs = np.array([[5, 6, bos, 7, 8, 2, bos, 9], [bos, 3, 3, 3, 2, bos, 4, 4]])
  seg, pos = data.segments(inputs.copy(), bos)
  np.testing.assert_array_equal(seg, [[1, 1, 2, 2, 2, 2, 3, 3], [1, 1, 1, 1, 1, 2, 2, 2]])
  np.testing.assert_array_equal(pos, [[0, 1, 0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2]])

  c = byte_cfg.copy_and_resolve_references()
  c.data.packing = True
  tok, train, _ = data.make_loaders(c)
  found_boundary = False
  for step in range(12):
    b = train.batch(step)
    assert set(b) == {"inputs", "targets", "segment_ids", "positions"}
    starts = b["positions"] == 0
    np.testing.assert_array_equal(starts[:, 1:], b["inputs"][:, 1:] == tok.bos_id)
    assert (b["segment_ids"][:, 0] == 1).all()
    found_boundary |= bool((b["segment_ids"] > 1).any())
  assert found_boundary


# ------------------------------------------------------------------------------ tokenizers

def test_spm_round_trip_and_options(files_cfg):
  tok = data.make_tokenizer(files_cfg)
  assert isinstance(tok, data.SpmTokenizer)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (SPM_VOCAB, 1, 2)
  assert tok.id_to_piece(0) == "<unk>" and tok.id_to_piece(3) == "<0x00>"
  corpus = data.open_corpus(files_cfg.data)
  docs = next(corpus.texts("train"))[:8]
  for text in docs + [NON_ASCII, "  two  spaces\n\tand a tab\r\n", "x = 1234567\n"]:
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode("1234") == [tok.encode(d)[0] for d in "1234"]  # split_digits
  # trained once: a second call loads the cached model
  assert data.make_tokenizer(files_cfg).key == tok.key


def test_byte_tokenizer_round_trip():
  tok = data.ByteTokenizer()
  assert tok.vocab_size == 259 and (tok.bos_id, tok.eos_id) == (1, 2)
  for text in [NON_ASCII, "", "a\0b\n", "def f():\n    return 1\n"]:
    ids = tok.encode(text)
    assert all(3 <= i < 259 for i in ids)
    assert tok.decode(ids) == text
  stream = tok.encode_documents(["ab", "é"], np.uint16)
  np.testing.assert_array_equal(stream, [1, 100, 101, 2, 1, 3 + 0xC3, 3 + 0xA9, 2])


def test_tokenizer_save_and_load_by_path(files_cfg, byte_cfg, tmp_path):
  tok = data.make_tokenizer(files_cfg)
  path = tok.save(str(tmp_path / "wd"))
  assert path.endswith("tokenizer.model")
  for ref in (path, str(tmp_path / "wd")):
    assert data.load_tokenizer(make_config(tmp_path, tokenizer=ref).data, SPM_VOCAB).key == tok.key
  bpath = data.make_tokenizer(byte_cfg).save(str(tmp_path / "wd_byte"))
  assert data.load_tokenizer(make_config(tmp_path, tokenizer=bpath).data, 259).vocab_size == 259


# ------------------------------------------------------------------------------ token cache

def test_token_cache_sidecar_and_reuse(files_cfg, corpus_dir):
  _, train, ev = data.make_loaders(files_cfg)
  sidecar = train.file.path.rsplit(".", 2)[0] + ".json"
  with open(sidecar) as f:
    meta = json.load(f)
  assert meta["n_tokens"] == train.n_tokens == len(train.tokens)
  assert meta["dtype"] == "uint16" and train.tokens.dtype == np.uint16
  assert train.n_bytes > 0
  assert train.bytes_per_token == pytest.approx(meta["n_bytes"] / meta["n_tokens"])
  assert ev.n_tokens > 0 and ev.n_docs >= 1
  # documents are BOS ... EOS; every doc counted
  assert train.tokens[0] == 1 and train.tokens[-1] == 2
  assert int((train.tokens == 1).sum()) == meta["n_docs"]
  mtime = os.path.getmtime(train.file.path)
  data.make_loaders(files_cfg)
  assert os.path.getmtime(train.file.path) == mtime  # not rebuilt


def test_changed_files_build_a_new_corpus(tmp_path):
  d = tmp_path / "c"
  d.mkdir()
  for i in range(4):
    (d / f"{i}.txt").write_text(f"file {i} " * 200)
  c = make_config(tmp_path / "dd", files=f"{d}/*.txt", tokenizer="byte", vocab_size=259)
  key1 = data.open_corpus(c.data).key
  (d / "0.txt").write_text("changed " * 300)
  os.utime(d / "0.txt", ns=(1, 1))
  key2 = data.open_corpus(c.data).key
  assert key1 != key2
  assert sorted(os.listdir(tmp_path / "dd" / "text_files")) == sorted(
      k.split("-", 1)[1] for k in (key1, key2))


def test_invalid_utf8_is_replaced(byte_cfg, corpus_dir):
  corpus = data.open_corpus(byte_cfg.data)
  texts = [t for s in ("train", "validation") for chunk in corpus.texts(s) for t in chunk]
  assert any(t.startswith("caf\ufffd latin-1") for t in texts)
  assert any(NON_ASCII in t for t in texts)
  assert sum(1 for t in texts if t.split(" ", 1)[0].isdigit()) == 40  # jsonl: a doc per line


# ------------------------------------------------------------------------------ bad input

def _err(cfg, match, **kw):
  with pytest.raises(data.DataError, match=match) as e:
    data.make_loaders(cfg, **kw)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_bad_inputs(tmp_path, files_cfg):
  dd = tmp_path / "dd"
  msg = _err(make_config(dd, files=f"{tmp_path}/nothing/*.txt"), "matched no files")
  assert "nothing/*.txt" in msg
  _err(make_config(dd, files=""), "needs files")

  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "a.txt").write_text("")
  (empty / "b.txt").write_text("")
  _err(make_config(dd, files=f"{empty}/*.txt"), "only empty files")

  binary = tmp_path / "bin"
  binary.mkdir()
  (binary / "ok.txt").write_text("hello " * 100)
  (binary / "blob.bin").write_bytes(bytes(range(256)) * 10)
  msg = _err(make_config(dd, files=f"{binary}/*"), "not a text file")
  assert "blob.bin" in msg

  short = tmp_path / "short"
  short.mkdir()
  (short / "a.txt").write_text("tiny")
  (short / "b.txt").write_text("text")
  _err(make_config(dd, files=f"{short}/*.txt", tokenizer="byte", vocab_size=259),
       "fewer than one batch")

  one = tmp_path / "one"
  one.mkdir()
  (one / "a.txt").write_text("a single document " * 100)
  _err(make_config(dd, files=f"{one}/*.txt", tokenizer="byte", vocab_size=259),
       "validation split .0 documents")

  bad_jsonl = tmp_path / "j"
  bad_jsonl.mkdir()
  (bad_jsonl / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
  _err(make_config(dd, files=f"{bad_jsonl}/*.jsonl", tokenizer="byte", vocab_size=259),
       r"x.jsonl:2 has none of the known field sets")

  msg = _err(make_config(files_cfg.data.data_dir, files=files_cfg.data.files, tokenizer="byte",
                         vocab_size=512), "259 ids but model.vocab_size=512")
  assert "vocab_size=259" in msg
  _err(make_config(dd, tokenizer=str(tmp_path / "missing.model"), files=files_cfg.data.files),
       "does not exist")
  _err(make_config(dd, files=files_cfg.data.files, vocab_size=100_000), "cannot train")
  # A sequence longer than the model's positions is a config mistake: llama_jax.config.validate
  # refuses it before any data is read (make_loaders trusts the sizes it checked).
  from llama_jax.config import ConfigError, validate
  with pytest.raises(ConfigError, match="max_seq_len"):
    validate(make_config(dd, files=files_cfg.data.files, seq_len=1000))


def test_tfds_catalog_not_prepared(tmp_path):
  msg = _err(make_config(tmp_path, name="lm1b"), "not prepared")
  assert f"tfds build lm1b --data_dir={tmp_path}" in msg
  _err(make_config(tmp_path, name="no_such_dataset_xyz"), "no_such_dataset_xyz")


class TinyCatalogDs(tfds.core.GeneratorBasedBuilder):
  """Stands in for a prepared catalog dataset (lm1b...): a 'content' feature, train/test."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = tfds.core.utils.classproperty(classmethod(corpora._code_path))

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"content": tfds.features.Text(), "label": np.int32}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(60), "test": self._generate_examples(4)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      yield i, {"content": _words(rng, 30), "label": i}


def test_prepared_tfds_dataset(tmp_path):
  TinyCatalogDs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  c = make_config(tmp_path, name="tiny_catalog_ds", tokenizer="byte", vocab_size=259)
  tok, train, ev = data.make_loaders(c)
  corpus = data.open_corpus(c.data)
  assert corpus.feature == "content" and corpus.validation_split == "test"
  assert (train.n_docs, ev.n_docs) == (60, 4)
  assert tok.decode(train.batch(0)["inputs"][0]).strip()


# ------------------------------------------------------------------------------ corpora

def test_stdlib_file_selection():
  files = data.stdlib_files()
  assert len(files) > 300
  for must in ("os.py", "json/decoder.py", "asyncio/tasks.py", "collections/__init__.py"):
    assert must in files
  for f in files:
    parts = f.split("/")
    assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), f
    assert not parts[-1].startswith("_sysconfigdata_"), f
  assert "pydoc_data/topics.py" not in files and "encodings/cp1252.py" not in files
  assert "token.py" not in files  # generated
  val = corpora.validation_keys(files)
  assert 0.005 < len(val) / len(files) < 0.04
  assert val == corpora.validation_keys(list(reversed(files)))  # stable


def _stdlib_slice(n=30):
  """n evenly spaced files of the real default corpus: a small corpus of the same kind."""
  files = data.stdlib_files()
  return files[::len(files) // n][:n]


def test_python_stdlib_builder(tmp_path):
  """The real default corpus's builder on a 30-file slice: tfds build, tfds.data_source read,
  the token cache and a loader over it."""
  c = make_config(tmp_path, name="python_stdlib", tokenizer="byte", vocab_size=259)
  files = _stdlib_slice()
  corpus = data.build_corpus(data.PythonStdlib, data.stdlib_config(files), c.data)
  assert corpus.key.startswith(f"python_stdlib-py{sys.version_info.major}.")
  assert 25 <= corpus.num_docs("train") + corpus.num_docs("validation") <= 30  # no empty files
  assert corpus.num_docs("validation") >= 1
  config_name = corpus.key.split("-", 1)[1]
  ds = tfds.data_source(f"python_stdlib/{config_name}", data_dir=str(tmp_path), download=False)
  rec = ds["train"][0]
  assert rec["key"].decode().endswith(".py") and len(rec["text"]) > 0
  meta = tfds.builder(f"python_stdlib/{config_name}", data_dir=str(tmp_path)).info.metadata
  assert meta["n_files"] == 30 and len(meta["content_hash"]) == 64
  assert sorted(meta["files"]) == sorted(files)
  assert "tensorflow" not in sys.modules  # read and written without TensorFlow
  tok = data.make_tokenizer(c)
  tokens = data.token_file(corpus, "train", tok, data.cache_root(c.data))
  assert "def " in tok.decode(tokens.tokens[:100_000])
  train = data.TokenLoader(tokens, seed=0, shuffle=True, bos_id=tok.bos_id, seq_len=SEQ,
                           batch_size=BATCH, process_index=0, process_count=1)
  assert train.batch(0)["inputs"].shape == (BATCH, SEQ)
  # The same files give the same corpus (config name from their content); others another.
  assert data.stdlib_config(list(reversed(files))).name == config_name
  assert data.stdlib_config(files[:-1]).name != config_name
  with pytest.raises(data.DataError, match="no_such_module.py"):
    data.stdlib_config(["os.py", "no_such_module.py"])


def test_synthetic(tmp_path):
  c = make_config(tmp_path, name="synthetic", vocab_size=512)
  tok, train, ev = data.make_loaders(c)
  assert tok.vocab_size == 512 and train.bytes_per_token is None
  b = train.batch(3)
  assert b["inputs"].shape == (BATCH, SEQ) and 0 <= b["inputs"].min() and b["inputs"].max() < 512
  np.testing.assert_array_equal(b["inputs"], data.make_loaders(c)[1].batch(3)["inputs"])
  assert not np.array_equal(b["inputs"], ev.batch(3)["inputs"])
  half = data.make_loaders(c, process_index=1, process_count=2)[1].batch(3)
  np.testing.assert_array_equal(half["targets"], b["targets"][BATCH // 2:])
  assert not os.path.exists(tmp_path / "llama_jax")  # nothing built


def test_shuffle_is_an_o1_memory_permutation_keyed_by_seed_and_epoch():
  import tracemalloc
  from llama_jax.data import loader
  n = 1009
  e0 = loader.shuffled(np.arange(n), n, seed=0)
  np.testing.assert_array_equal(np.sort(e0), np.arange(n))  # a permutation
  np.testing.assert_array_equal(np.sort(loader.shuffled(np.arange(n, 2 * n), n, 0)),
                                np.arange(n))  # epoch 1 too
  assert not np.array_equal(loader.shuffled(np.arange(n, 2 * n), n, 0), e0)  # another order
  assert not np.array_equal(loader.shuffled(np.arange(n), n, 1), e0)         # another seed
  np.testing.assert_array_equal(loader.shuffled(np.arange(5, 9), n, 0), e0[5:9])  # pure in j
  # 10^12 tokens at seq_len 2048: 4.9e8 windows; one 4096-row batch deep in epoch 3 allocates
  # kilobytes, where the old per-epoch index array took 1.8 GiB.
  big = 10**12 // 2048
  tracemalloc.start()
  ids = loader.shuffled(3 * big + np.arange(4096) * 7919, big, seed=0)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 1 << 20, peak
  assert len(set(ids.tolist())) == 4096 and 0 <= ids.min() and ids.max() < big
