"""llama_jax.passkey: prompts of exact lengths with the key at its depth, the scorer against
oracles (one that reads the key from the prompt scores 1; one that gets a digit wrong, or
copies the key from the wrong place, scores 0), a random tiny Llama scoring 0, the table and
the heat-map PNG."""

import jax
import matplotlib.pyplot as plt
import numpy as np
import pytest
from flax import nnx

from llama_jax import passkey
from llama_jax.data import sft
from llama_jax.data.tokenizer import ByteTokenizer
from llama_jax.model.config import ModelConfig
from llama_jax.model.llama import Llama


def _oracle(tokenizer, wrong_digit=False):
  """Logits whose argmax is the prompt's next token, except on the answer: there the key as
  the needle states it (read from the prompt), with its last digit changed if wrong_digit."""
  marker = tokenizer.encode("The pass key is ")
  question = tokenizer.encode(passkey.QUESTION)

  def forward(tokens):
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    nxt = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    for r in range(b):
      row = tokens[r].tolist()
      at = next(i for i in range(t) if row[i:i + len(marker)] == marker) + len(marker)
      key = row[at:at + 5]
      if wrong_digit:
        key = key[:4] + [key[4] + 1 if key[4] < 3 + ord("9") else key[4] - 1]
      q = next(i for i in range(t - 1, -1, -1) if row[i:i + len(question)] == question)
      nxt[r, q + len(question) - 1:q + len(question) + 4] = key
    return np.eye(tokenizer.SIZE, dtype=np.float32)[nxt]
  return forward


def test_prompts_scorer_table_and_heat_map(tmp_path):
  tok = ByteTokenizer()
  positions = []
  for depth in (0.0, 0.5, 1.0):
    tokens, start = passkey.example(tok, 300, depth, "12345")
    assert tokens.shape == (300,) and tok.decode(tokens[start:]) == "12345"
    assert tok.decode(tokens[1:]).endswith(passkey.QUESTION + "12345")
    positions.append(tok.decode(tokens[1:]).index(passkey.needle("12345")))
  assert positions[0] == len(passkey.INTRO) and positions[0] < positions[1] < positions[2]
  assert positions[2] + len(passkey.needle("12345")) == 300 - 1 - len(passkey.QUESTION) - 5

  lengths, depths = (256, 300), (0.0, 0.5, 1.0)
  results = passkey.grid(_oracle(tok), tok, lengths, depths, samples=3)
  assert [r["accuracy"] for r in results] == [1.0] * 6
  assert {r["token_accuracy"] for r in results} == {1.0}
  wrong = passkey.grid(_oracle(tok, True), tok, lengths, depths, 3)
  assert {r["accuracy"] for r in wrong} == {0} and {r["token_accuracy"] for r in wrong} == {0.8}
  cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=259,
                    max_seq_len=512)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  assert passkey.accuracy(jax.jit(lambda t: model(t)), tok, 256, 0.5, samples=4) == 0.0

  md = passkey.table(results)
  assert md.splitlines()[0] == "| depth \\ length | 256 | 300 |"
  assert md.splitlines()[3] == "| 0.5 | 1.00 | 1.00 |"
  assert passkey.table(wrong, "token_accuracy").splitlines()[3] == "| 0.5 | 0.80 | 0.80 |"
  image = plt.imread(passkey.heatmap(results, str(tmp_path / "p.png")))
  assert image.ndim == 3 and image.shape[0] > 100
  docs = passkey.texts(4, (256, 300), seed=1)
  assert {len(d.encode()) + 1 for d in docs} <= {256, 300} and all("pass key is" in d for d in docs)


def test_records_count_the_key_alone_and_render_to_the_prompt_plus_the_key():
  """passkey.records: SFT prompt/completion records that render (llama_jax.data.sft) as a
  scorer's prompt of the drawn length, BOS to the key, then EOS; the loss on the key and EOS
  only; the same records from the same seed."""
  tok = ByteTokenizer()
  recs = passkey.records(6, (256, 300, 301), seed=3)
  assert recs == passkey.records(6, (256, 300, 301), seed=3)
  assert len({r["completion"] for r in recs}) == 6
  for rec in recs:
    ids, weights = sft.render(sft.record(sft.document(rec, "passkey")), tok)
    assert len(ids) - 1 in (256, 300, 301) and ids[-1] == tok.eos_id
    key = rec["completion"]
    assert len(key) == 5 and key.isdigit() and passkey.needle(key) in rec["prompt"]
    assert rec["prompt"].endswith(passkey.QUESTION)
    assert weights == [0] * (len(ids) - 6) + [1] * 6  # the key's 5 bytes and EOS
    assert rec["prompt"].startswith(passkey.INTRO)
  # row=: every record exactly one row, the key first in a completion padded with filler.
  rows = passkey.records(8, tuple(range(250, 320)), seed=3, row=320)
  starts = set()
  for rec in rows:
    ids, weights = sft.render(sft.record(sft.document(rec, "passkey")), tok)
    assert len(ids) == 320 and rec["completion"][5:7] == ". " and rec["completion"][:5].isdigit()
    assert passkey.needle(rec["completion"][:5]) in rec["prompt"]
    starts.add(weights.index(1))
  assert len(starts) > 4  # the answer sits at varying positions of equal rows
  docs = passkey.texts(8, tuple(range(250, 320)), seed=3, row=320)
  assert docs == [r["prompt"] + r["completion"] for r in rows]
  assert {len(tok.encode(d)) + 2 for d in docs} == {320}
  with pytest.raises(ValueError, match="cannot hold"):
    passkey.records(1, (400,), row=320)
