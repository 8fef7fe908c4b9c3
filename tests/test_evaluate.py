"""llama_jax.evaluate: the loss/perplexity/bits-per-byte arithmetic on cases known exactly, and
the CLIs of evaluate and generate on a real (tiny) trained workdir."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from llama_jax.evaluate import evaluate
from llama_jax.loss import cross_entropy
from llama_jax.model.config import ModelConfig
from llama_jax.model.llama import abstract_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=88, vocab_size=263,
                  max_seq_len=32)


class FakeLoader:
  """Eval batches as the data module serves them: {'inputs', 'targets'[, segment_ids,
  positions]} int32 [B, T], num_batches for one pass, bytes_per_token from split stats."""

  def __init__(self, windows, batch_size, bytes_per_token=None, packing=False):
    self.windows, self.batch_size = windows, batch_size
    self.bytes_per_token = bytes_per_token
    self.num_batches = len(windows) // batch_size
    self.packing = packing
    self.requested = []

  def batch(self, i):
    self.requested.append(i)
    w = self.windows[i * self.batch_size:(i + 1) * self.batch_size]
    out = {"inputs": w[:, :-1], "targets": w[:, 1:]}
    if self.packing:  # two documents per row, positions restarting at the second
      t = w.shape[1] - 1
      seg = (np.arange(t) >= t // 2).astype(np.int32) + 1
      out["segment_ids"] = np.broadcast_to(seg, (len(w), t)).copy()
      out["positions"] = np.broadcast_to(
          np.where(seg == 1, np.arange(t), np.arange(t) - t // 2), (len(w), t)).astype(np.int32)
    return out


def _windows(n, t=17, seed=0):
  return np.random.RandomState(seed).randint(3, CFG.vocab_size, (n, t + 1)).astype(np.int32)


def _model(fill):
  """CFG's model with every parameter fill(shape), set through the abstract model (no init)."""
  graphdef, state = nnx.split(abstract_model(CFG))
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: fill(x.shape).astype(np.float32),
                                               nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def _zero_model():
  """All-zero parameters: the logits are all 0, so every token has probability 1/V."""
  return _model(np.zeros)


def test_uniform_model_known_values():
  """loss = ln V, perplexity = V, bits per byte = log2(V) / bytes_per_token."""
  loader = FakeLoader(_windows(6), batch_size=2, bytes_per_token=2.5)
  r = evaluate(_zero_model(), loader, 2)
  V = CFG.vocab_size
  assert r["loss"] == pytest.approx(math.log(V), rel=1e-6)
  assert r["perplexity"] == pytest.approx(V, rel=1e-5)
  assert r["bits_per_byte"] == pytest.approx(math.log2(V) / 2.5, rel=1e-6)
  assert (r["tokens"], r["batches"], r["bytes"], r["bytes_source"]) == (68, 2, 170.0, "split")
  assert loader.requested == [0, 1]


class ByteTok:
  """id 3 + b is byte b; 1/2 (BOS/EOS) and ids >= 259 decode to nothing."""

  def decode(self, ids):
    return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


def test_bits_per_byte_by_decoding():
  """Without split statistics the evaluated targets are decoded and their UTF-8 bytes counted:
  here one byte per id in [3, 259), none for BOS/EOS and ids >= 259."""
  w = np.random.RandomState(1).randint(32, 120, (4, 11)).astype(np.int32) + 3  # ASCII bytes
  w[0, 3], w[1, 5], w[2, 7] = 1, 2, 260  # BOS, EOS, an id with no text (in the targets)
  loader = FakeLoader(w, batch_size=2)
  r = evaluate(_zero_model(), loader, 5, tokenizer=ByteTok())
  assert r["batches"] == 2  # capped at one pass
  assert r["tokens"] == 40 and r["bytes"] == 37 and r["bytes_source"] == "decoded"
  assert r["bits_per_byte"] == pytest.approx(40 * math.log(CFG.vocab_size) / math.log(2) / 37)
  # No statistics and no tokenizer: undefined, not invented.
  assert evaluate(_zero_model(), FakeLoader(w, 2), 1)["bits_per_byte"] is None


@pytest.mark.parametrize("packing", [False, True])
def test_token_mean_over_batches(packing):
  """A random model: loss is the token mean over all evaluated batches, equal to the
  cross-entropy of the model's logits computed directly; perplexity = exp(loss)."""
  rng = np.random.RandomState(3)
  m = _model(lambda shape: 0.2 * rng.randn(*shape))
  loader = FakeLoader(_windows(9, seed=2), batch_size=3, bytes_per_token=3.0, packing=packing)
  r = evaluate(m, loader)  # None = one pass = 3 batches
  assert r["batches"] == 3
  batches = [loader.batch(i) for i in range(3)]
  forward = nnx.jit(lambda m, b: m(b["inputs"], positions=b.get("positions"),
                                   segment_ids=b.get("segment_ids")))
  logits = np.concatenate([np.asarray(forward(m, b)) for b in batches])
  want = float(cross_entropy(logits, np.concatenate([b["targets"] for b in batches]))[1])
  assert r["loss"] == pytest.approx(want, rel=1e-5)
  assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)
  assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2) / 3.0, rel=1e-12)


# ---------------------------------------------------------------------------- CLIs on a run

@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A 2-step byte-tokenizer run on a few local text files, through the real train loop."""
  from configs import base
  from llama_jax import train

  root = tmp_path_factory.mktemp("run")
  texts = root / "texts"
  texts.mkdir()
  rng = np.random.RandomState(0)
  words = ["alpha", "beta", "gamma", "delta", "héllo", "wörld"]
  for i in range(12):
    (texts / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 120)) + "\n")
  c = base.get_config("tiny")
  c.model.update(dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=88, vocab_size=259,
                      max_seq_len=32))
  c.data.update(dict(name="text_files", files=str(texts / "*.txt"), tokenizer="byte",
                     data_dir=str(root / "data"), seq_len=24, batch_size=8))
  c.train.update(dict(steps=2, log_every=2, eval_every=2, eval_steps=1, checkpoint_every=2,
                      sample_tokens=8))
  c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  workdir = str(root / "workdir")
  summary = train.train(c, workdir, log=lambda *a, **k: None)
  return workdir, summary


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=600)


@pytest.mark.slow
def test_cli_evaluate_and_generate_on_workdir(trained_workdir):
  workdir, summary = trained_workdir
  assert summary["sample"] is not None and summary["sample"].startswith("def ")

  r = _run("llama_jax.evaluate", f"--workdir={workdir}", "--max_batches=1")
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 1
  out = json.loads(lines[0])
  assert out["step"] == 2 and out["split"] == "validation" and out["bytes_source"] == "split"
  assert out["batches"] == 1 and out["tokens"] == 8 * 24
  assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
  # Byte tokenizer: one byte per text token, BOS/EOS tokens have none, so bytes/token < 1.
  assert out["bits_per_byte"] > out["loss"] / math.log(2)
  # The training loop's eval (eval_steps=1) saw the same batch: the same loss.
  assert summary["eval_loss"] == pytest.approx(out["loss"], rel=1e-4)

  g = _run("llama_jax.generate", f"--workdir={workdir}", "--prompt=héllo", "--prompt=be",
           "--max_new_tokens=6", "--temperature=0")
  assert g.returncode == 0, g.stderr[-3000:]
  assert g.stdout.startswith("--- [0]\nhéllo") and "--- [1]\nbe" in g.stdout

  bad = _run("llama_jax.evaluate", f"--workdir={workdir}/nothing")
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert bad.stderr.strip().splitlines() == [
      f"error: no checkpoint under {workdir}/nothing/checkpoints; train first with "
      f"run_train.py --workdir={workdir}/nothing"]
  bad = _run("llama_jax.evaluate", f"--workdir={workdir}", "--step=7")
  assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
      f"error: no checkpoint of step 7 in {workdir}/checkpoints; it holds steps [2]: pick one "
      "of them or leave the step out for the newest"], bad.stderr[-3000:]


def test_evaluate_scores_with_the_train_loops_batch_loss():
  """evaluate's per-batch NLL is training's batch_loss (mean CE) times the target tokens."""
  from llama_jax import evaluate as evaluate_lib
  from llama_jax.loss import batch_loss
  rng = np.random.RandomState(5)
  m = _model(lambda shape: 0.2 * rng.randn(*shape))
  batch = FakeLoader(_windows(2, seed=4), batch_size=2).batch(0)
  graphdef, params = nnx.split(m)
  nll, count = jax.device_get(evaluate_lib._batch_nll(graphdef, params, batch))
  assert count == batch["targets"].size == 2 * 17
  mean = float(nnx.jit(batch_loss)(m, batch)[1])
  assert float(nll) == pytest.approx(mean * count, rel=1e-6)
