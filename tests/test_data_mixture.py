"""Mixtures (config.data.mixture): rows per source per batch, the mixed loader and bad input.
(eval_loss/<source> from training and evaluate's per-source output: test_data_resume.py.)

Two tiny corpora of the user's files (byte tokenizer): a/*.txt of 'ka lo mi' words and
b/*.jsonl of digits, so a row's tokens tell which source it came from.
"""

import json
from fractions import Fraction

import numpy as np
import pytest

from configs import base
from llama_jax import config as config_lib
from llama_jax import data
from llama_jax.data import mixture

SEQ, BATCH = 23, 8


def write_two_sources(d):
  """d/a/*.txt: 5 files of 'ka lo mi' words; d/b/n.jsonl: 60 lines of numbers."""
  rng = np.random.default_rng(0)
  (d / "a").mkdir()
  (d / "b").mkdir()
  for i in range(5):
    (d / "a" / f"{i}.txt").write_text(" ".join(rng.choice(["ka", "lo", "mi"], 400)))
  with open(d / "b" / "n.jsonl", "w") as f:
    for i in range(60):
      f.write(json.dumps({"text": " ".join(map(str, rng.integers(0, 99, 40)))}) + "\n")
  return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_two_sources(tmp_path_factory.mktemp("mix"))


def make_config(corpus, data_dir, spec, **data_kw):
  c = base.get_config("tiny")
  c.model.vocab_size = 259
  c.data.update(dict(name="text_files", files=f"{corpus}/a/*.txt", data_dir=str(data_dir),
                     tokenizer="byte", seq_len=SEQ, batch_size=BATCH, seed=0, mixture=spec,
                     **data_kw))
  return c


@pytest.fixture(scope="module")
def spec(corpus):
  return f"files:{corpus}/a/*.txt=3,files:{corpus}/b/*.jsonl=1; 6: files:{corpus}/b/*.jsonl=1"


@pytest.fixture(scope="module")
def mixed(corpus, spec, tmp_path_factory):
  c = make_config(corpus, tmp_path_factory.mktemp("dd"), spec, packing=True)
  return c, data.make_loaders(c)


# ------------------------------------------------------------------------------ row counts

def test_rows_per_source_are_a_closed_form_of_seed_and_step():
  m = mixture.parse("a=0.3,b=0.7; 100: a=1,b=3,c=0.5", 16, seed=0)
  assert m.sources == ("a", "b", "c")
  assert m.phases[0].weights == (Fraction(3, 10), Fraction(7, 10), 0)
  assert m.phases[1].weights == (Fraction(2, 9), Fraction(2, 3), Fraction(1, 9))
  n = np.array([m.rows_before(s) for s in range(201)])
  counts = np.diff(n, axis=0)
  assert (counts >= 0).all() and (counts.sum(1) == 16).all()
  # Within one row of the exact share at every step, in both phases.
  target0 = np.arange(101)[:, None] * 16 * np.array([0.3, 0.7, 0])
  assert np.abs(n[:101] - target0).max() < 1
  target1 = n[100] + np.arange(101)[:, None] * 16 * np.array([2 / 9, 2 / 3, 1 / 9])
  assert np.abs(n[100:] - target1).max() < 1
  assert set(counts[:100, 0]) == {4, 5} and (counts[:100, 2] == 0).all()  # floor/ceil of 4.8
  for s in (0, 57, 150):  # batch_rows is the difference of the closed form
    np.testing.assert_array_equal(m.batch_rows(s)[0], counts[s])
    np.testing.assert_array_equal(m.batch_rows(s)[1], n[s])
  other = mixture.parse("a=0.3,b=0.7; 100: a=1,b=3,c=0.5", 16, seed=1)
  assert not np.array_equal(np.diff([other.rows_before(s) for s in range(100)], axis=0),
                            counts[:99])  # the seed moves which steps round up
  assert mixture.parse("", 16) is None


@pytest.mark.parametrize("bad, match", [
    ("a=-1,b=1", "a has a negative weight -1"),
    ("a=0,b=0", "are all zero"),
    ("a=1,b", "'b' is not SOURCE=WEIGHT"),
    ("a=1,b=x", "'b=x' is not SOURCE=WEIGHT"),
    ("a=1; b=1", "has no starting step"),
    ("a=1; 5: b=1; 5: a=1", "starts at step 5, not after step 5"),
    ("a=1,b=0.05", "b gets 0.04762 of the batch, less than one row"),
    ("synthetic=1", "cannot be mixed"),
])
def test_bad_mixture_is_one_config_line(corpus, tmp_path, bad, match):
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    config_lib.validate(make_config(corpus, tmp_path, bad))
  assert "\n" not in str(e.value) and str(e.value).startswith("data.mixture=")


def test_unknown_source_and_empty_glob_stop_before_training(corpus, tmp_path):
  for spec, match in ((f"files:{corpus}/a/*.txt=1,no_such_corpus_xyz=1",
                       "source 'no_such_corpus_xyz'.*not python_stdlib"),
                      (f"files:{corpus}/a/*.txt=1,files:{corpus}/none/*.md=1",
                       "none/\\*.md' matched no files")):
    with pytest.raises(data.DataError, match=match) as e:
      data.make_loaders(make_config(corpus, tmp_path, spec))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ the loader

def test_each_row_is_a_window_of_its_source(mixed):
  c, (tok, train, ev) = mixed
  assert isinstance(train, data.MixtureLoader) and sorted(ev.sources) == sorted(
      train.mixture.sources)
  digits = set(tok.encode("0123456789 "))
  for step in (0, 3, 5, 6, 9):
    b = train.batch(step)
    assert set(b) == {"inputs", "targets", "segment_ids", "positions"}
    counts, _ = train.mixture.batch_rows(step)
    src, win = train.window_ids(step)
    np.testing.assert_array_equal(np.bincount(src, minlength=2), counts)
    for r, (k, w) in enumerate(zip(src, win)):
      np.testing.assert_array_equal(b["inputs"][r], train.files[k].tokens[w * SEQ:w * SEQ + SEQ])
      is_digits = set(b["inputs"][r].tolist()) <= digits | {tok.bos_id, tok.eos_id}
      assert is_digits == (k == 1)
    if step >= 6:
      assert (src == 1).all()  # the second phase: b only
    else:
      assert set(counts) == {6, 2}  # 3:1 of 8 rows
  # A fresh loader, another process split and a resumed iterator: the same rows.
  _, again, _ = data.make_loaders(c)
  halves = [data.make_loaders(c, process_index=i, process_count=2)[1] for i in (0, 1)]
  it = again.iterate(4)
  for step in (4, 5, 6):
    want = train.batch(step)
    got_step, got = next(it)
    assert got_step == step
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
      np.testing.assert_array_equal(
          np.concatenate([h.batch(step)[k] for h in halves]), want[k])
  it.close()
