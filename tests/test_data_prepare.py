"""Sharded preparation (llama_jax/data/prepare.py): shards and a manifest equal to the flat
token cache, each process tokenizing only its share, an unfinished shard redone alone, a
prepared corpus brought back by its manifest (and refused with another tokenizer), and the
shards read by range from a bucket in the GCS emulator.

A tiny corpus of the user's files with the byte tokenizer (no training), 40 jsonl documents.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from llama_jax import data, storage
from llama_jax.data import prepare
from tests import training_process
from tests.object_store import bucket, gcs  # noqa: F401  (fixtures)

SEQ, BATCH = 19, 6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("prep")
  rng = np.random.default_rng(1)
  with open(d / "docs.jsonl", "w") as f:
    for i in range(40):
      f.write(json.dumps({"text": f"{i} " + " ".join(rng.choice(["ab", "cd", "é"], 60))}) + "\n")
  return f"{d}/*.jsonl"


def make_config(files, data_dir, shards, tokenizer="byte"):
  c = base.get_config("tiny")
  c.model.vocab_size = 259
  c.data.update(dict(name="text_files", files=files, data_dir=str(data_dir), tokenizer=tokenizer,
                     seq_len=SEQ, batch_size=BATCH, seed=0, shards=shards, packing=True))
  return c


@pytest.fixture(scope="module")
def flat(files, tmp_path_factory):
  c = make_config(files, tmp_path_factory.mktemp("dd"), 0)
  return c, data.make_loaders(c)


def _same_batches(a, b, steps=(0, 3, 11)):
  for step in steps:
    x, y = a.batch(step), b.batch(step)
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _folder(c):
  corpus = data.open_corpus(c.data)
  return prepare.folder(corpus, data.make_tokenizer(c), data.cache_root(c.data), c.data.shards)


def test_shards_and_manifest_equal_the_flat_cache(files, flat, tmp_path):
  cf, (_, ftrain, feval) = flat
  c = make_config(files, cf.data.data_dir, 3)
  _, train, ev = data.make_loaders(c)
  _same_batches(ftrain, train)
  _same_batches(feval, ev, steps=(0, 1))
  manifest = json.loads(open(os.path.join(_folder(c), "manifest.json")).read())
  tok = data.make_tokenizer(c)
  assert manifest["tokenizer"] == dict(key=tok.key, type="ByteTokenizer", vocab_size=259,
                                       bos_id=1, eos_id=2)
  for split, loader in (("train", ftrain), ("validation", feval)):
    s = manifest["splits"][split]
    assert (s["docs"], s["tokens"], s["bytes"]) == (loader.n_docs, loader.n_tokens, loader.n_bytes)
    assert len(s["shards"]) == 3 and sum(x["tokens"] for x in s["shards"]) == s["tokens"]
    assert sum(x["docs"] for x in s["shards"]) == s["docs"]
  # A window that crosses a shard boundary reads from both shards.
  cut = manifest["splits"]["train"]["shards"][0]["tokens"]
  np.testing.assert_array_equal(train.tokens[cut - 5:cut + 5], ftrain.tokens[cut - 5:cut + 5])


def test_each_process_prepares_its_share_and_an_unfinished_shard_is_redone(files, flat, tmp_path):
  c = make_config(files, tmp_path / "dd", 4)
  corpus = data.open_corpus(c.data)
  tok = data.make_tokenizer(c)
  root = data.cache_root(c.data)
  out = prepare.folder(corpus, tok, root, 4)
  # Process 1 of 2 alone: shards 1 and 3 of each split, then it waits for process 0.
  with pytest.raises(data.DataError, match="waited 0 s for"):
    prepare.prepare(corpus, tok, root, 4, process_index=1, process_count=2, timeout=0)
  done = sorted(n for n in os.listdir(out) if n.endswith(".json"))
  assert done == [f"{s}-0000{i}-of-00004.json" for s in ("train", "validation") for i in (1, 3)]
  prepare.prepare(corpus, tok, root, 4, process_index=0, process_count=2)  # writes the manifest
  assert prepare.prepare(corpus, tok, root, 4, 1, 2)["splits"]["train"]["tokens"] > 0

  # A shard killed mid-write: tokens cut short, no sidecar; the manifest not yet written.
  shard = os.path.join(out, "train-00002-of-00004.uint16.bin")
  size = os.path.getsize(shard)
  with open(shard, "r+b") as f:
    f.truncate(size // 3)
  os.remove(os.path.join(out, "train-00002-of-00004.json"))
  os.remove(os.path.join(out, "manifest.json"))
  others = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)
            if n.endswith(".bin") and n != os.path.basename(shard)}
  _, train, _ = data.make_loaders(c)
  assert os.path.getsize(shard) == size
  assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in others} == others  # not redone
  _same_batches(flat[1][1], train)


def test_prepared_corpus_by_manifest_and_another_tokenizer_refused(files, flat):
  cf, (_, ftrain, _) = flat
  c = make_config(files, cf.data.data_dir, 2)
  data.make_loaders(c)
  folder = _folder(c)
  brought = make_config("", "/nonexistent", 0, tokenizer="spm")
  brought.data.name = f"prepared:{folder}"
  tok, train, ev = data.make_loaders(brought)  # the tokenizer saved beside the manifest
  assert isinstance(tok, data.ByteTokenizer) and ev.n_docs >= 1
  _same_batches(ftrain, train)

  # The same corpus, made with an spm tokenizer, read with the byte one: refused, one line.
  spm = make_config(files, cf.data.data_dir, 2, tokenizer="spm")
  spm.model.vocab_size = 280  # what 40 short documents can train
  data.make_loaders(spm)
  other = make_config("", "/nonexistent", 0, tokenizer="byte")
  other.data.name = f"prepared:{_folder(spm)}"
  with pytest.raises(data.DataError, match="was made with tokenizer SpmTokenizer") as e:
    data.make_loaders(other)
  assert "\n" not in str(e.value)


def test_shards_in_a_bucket_are_read_by_range(files, flat, bucket, tmp_path):
  c = make_config(files, f"{bucket}/data", 2)
  _, train, ev = data.make_loaders(c)
  assert isinstance(train.tokens, prepare.ShardedTokens) and train.tokens.remote
  _same_batches(flat[1][1], train)
  _same_batches(flat[1][2], ev, steps=(0,))
  out = _folder(c)
  assert storage.exists(storage.join(out, "manifest.json"))
  assert storage.exists(storage.join(out, "train-00001-of-00002.uint16.bin"))
  cache_dir = tmp_path / "llama_jax_cache" / "objects"
  copies = [f for _, _, fs in os.walk(cache_dir) for f in fs if f.endswith(".bin")]
  assert not copies, copies  # no local copy of a shard


@pytest.mark.slow
def test_two_processes_prepare_their_shares_in_a_bucket(files, flat, bucket, tmp_path):
  """Two real worker processes, each with its own local cache, one bucket data dir; worker 1
  starts first and waits for worker 0's shards and manifest (seen across processes)."""
  c = make_config(files, f"{bucket}/data", 4)
  cmd = [sys.executable, "-m", "llama_jax.data", "--config=configs/base.py:tiny",
         "--config.data.name=text_files", f"--config.data.files={files}",
         "--config.data.tokenizer=byte", "--config.model.vocab_size=259",
         f"--config.data.data_dir={bucket}/data", "--config.data.shards=4",
         f"--config.data.seq_len={SEQ}", "--num_processes=2"]
  procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                                     LLAMA_JAX_CACHE=str(tmp_path / f"cache{i}")))
           for i in (1, 0)]
  # Both processes read at once and bounded: when process 0 died (reading a corpus shard
  # that process 1 was uploading again), this waited 300 s on process 1, which waited for
  # process 0's manifest for ever. Now process 1 gives up after LLAMA_JAX_WAIT_S (60 s) and
  # the test fails with both processes' last output.
  outs = training_process.finish(*procs, timeout=150)
  lines = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outs]
  assert lines[0]["train"] == lines[1]["train"] and lines[0]["manifest"] == lines[1]["manifest"]
  out = _folder(c)
  for split in ("train", "validation"):
    for i in range(4):
      meta = json.loads(storage.read_text(storage.join(out, f"{split}-0000{i}-of-00004.json")))
      assert meta["by"] == i % 2  # shards p, p + 2 by process p
  _, train, _ = data.make_loaders(c)
  _same_batches(flat[1][1], train)


def test_in_a_shared_bucket_process_0_builds_and_the_others_wait(bucket, tmp_path, monkeypatch):
  """What the processes of a run share in a bucket (corpus, token cache, tokenizer) is built
  by process 0 alone while the others wait: several hosts that built and uploaded the same
  array_record shards raced, and a reader took a shard being replaced for corrupt and died,
  leaving its peer to wait for its manifest for ever (the preparation test's hang)."""
  from llama_jax import waiting
  from llama_jax.data import corpora
  root, marker = f"{bucket}/shared", f"{bucket}/shared/built"
  built = []

  def build():
    built.append(1)
    storage.write_text(marker, "x")

  def is_built():
    return storage.exists(marker)

  waiter = corpora.Builder(process_index=1, process_count=2)
  monkeypatch.setenv(waiting.TIMEOUT_ENV, "1")
  with pytest.raises(data.DataError, match=r"process 1: waited 1 s for the thing \(process 0 "
                     r"builds it\); check process 0's log"):
    corpora.build_once(root, is_built, build, what="the thing", builder=waiter)
  assert built == []  # a waiter never builds
  corpora.build_once(root, is_built, build, what="the thing",
                     builder=corpora.Builder(process_index=0, process_count=2))
  corpora.build_once(root, is_built, build, what="the thing", builder=waiter)  # sees it now
  assert built == [1]
  # Processes that share no bucket each build their own (under a local lock).
  local = corpora.Builder(process_index=1, process_count=2)
  corpora.build_once(str(tmp_path), lambda: bool(built[1:]), build, what="x", builder=local)
  assert built == [1, 1]
