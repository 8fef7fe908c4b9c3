"""llama_jax.generate: cached decoding against the full forward pass, greedy continuations
against transformers' LlamaForCausalLM.generate, sampling semantics, EOS, errors, the CLI."""

import dataclasses
import functools
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llama_jax.data.hf_tokenizer import HFDirTokenizer
from llama_jax.generate import decode as gen
from llama_jax.model.config import ModelConfig
from llama_jax.model.llama import abstract_model, init_cache

TOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Distinct sizes so a mixed-up axis changes a shape (head dim 10, 8 query / 2 kv heads).
GQA = ModelConfig(dim=80, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=88, vocab_size=263,
                  max_seq_len=48)
# Unscanned layers, tied embeddings and learned positions: the padding's position -1 must stay
# invisible there too (it indexes the position table).
LEARNED = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=80, vocab_size=61,
                      max_seq_len=40, position="learned", tie_embeddings=True, scan_layers=False)
# Llama 4's layers (docs/llama4.md): a dense RoPE layer attending within chunks of 8 (the
# decoded sequences reach 22 positions) with L2 qk-norm, then an MoE NoPE layer (sigmoid router,
# shared expert) attending over everything with the attention temperature.
LLAMA4 = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=56, vocab_size=97,
                     max_seq_len=48, moe_experts=3, moe_top_k=1, moe_ffn_dim=40,
                     moe_shared_experts=1, moe_every=2, moe_router="sigmoid", nope_every=2,
                     attention_chunk=8, qk_norm="l2", attn_temperature_tuning=True,
                     floor_scale=4, attn_scale=0.5)


@pytest.fixture(scope="module")
def model():
  return _random_model(GQA)


@functools.lru_cache(maxsize=None)
def _random_model(cfg, seed=0):
  """Random weights with O(1) spread (our init scales output projections by 1/(2L), which
  keeps logits near uniform and argmax ties likelier): linears ~ N(0, 1/fan_in), norm scales
  1 + N(0, 0.3^2), embeddings N(0, 0.5^2). Filled into the abstract model with numpy, which
  is much faster on CPU than running the initialisers."""
  graphdef, state = nnx.split(abstract_model(cfg))
  rng = np.random.RandomState(seed)

  def fill(path, x):
    name = path[-1].key
    if name == "router_bias":  # MoE balancing state, not a weight
      return np.zeros(x.shape, np.float32)
    if name == "scale":
      return (1 + 0.3 * rng.randn(*x.shape)).astype(np.float32)
    if name in ("embed", "pos_embed"):
      return (0.5 * rng.randn(*x.shape)).astype(np.float32)
    fan_in = cfg.ffn_dim if name == "w_down" else cfg.dim
    return (rng.randn(*x.shape) / math.sqrt(fan_in)).astype(np.float32)

  nnx.replace_by_pure_dict(state, jax.tree.map_with_path(fill, nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def _prompts(vocab, lengths, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, vocab, n).tolist() for n in lengths]


def _full_logits(model, tokens):
  """The uncached forward pass [T, V]; right-padded to max_seq_len (causal, so the padding
  changes nothing before it) so that one compilation serves every length."""
  padded = np.zeros((1, model.cfg.max_seq_len), np.int32)
  padded[0, :len(tokens)] = tokens
  return np.asarray(_forward(*nnx.split(model), padded))[0, :len(tokens)]


@jax.jit(static_argnums=0)
def _forward(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens)


@jax.jit(static_argnums=(0, 4))
def _prefill_logits(graphdef, params, tokens, positions, width):
  """The logits prefill samples the first new token from: the model's cached forward over the
  left-padded prompts into a fresh cache of P + width slots, at the last column."""
  model = nnx.merge(graphdef, params)
  cache = init_cache(model.cfg, tokens.shape[0], tokens.shape[1] + width)
  return model(tokens, positions=positions, cache=cache)[0][:, -1]


@jax.jit(static_argnums=0)
def _next_logits(graphdef, params, carry):
  """The logits decode_step samples its next token from: the model's one-token cached step on
  what the carry holds (the cache, each row's last token and position)."""
  logits, _ = nnx.merge(graphdef, params)(carry["token"][:, None],
                                          positions=carry["pos"][:, None], cache=carry["cache"])
  return logits[:, 0]


# ---------------------------------------------------------------------------- cache == forward

@pytest.mark.parametrize("cfg", [GQA, LEARNED, pytest.param(LLAMA4, marks=pytest.mark.slow)],
                         ids=["gqa_scan", "learned_tied_unscanned", "llama4"])
def test_cached_decoding_matches_full_forward(cfg):
  """Every step's logits (prefill and each one-token cached step) equal the uncached forward
  pass over prompt + the tokens generated so far, for left-padded prompts of three lengths.
  The steps are driven here through the public prefill / decode_step; a step's logits are the
  model's cached step on the carry decode_step receives. generate's two paths (the streamed
  Python loop and the while_loop) run the same step function: both give the same greedy
  tokens, the argmax of the uncached logits. For Llama 4 the control: the same weights
  without chunks give other logits past the first chunk."""
  m = _random_model(cfg)
  prompts = _prompts(cfg.vocab_size, (5, 13, 1))
  n, width = 9, 16  # width: the output buffer, >= n (generate rounds n up to 16 too)
  graphdef, params = gen.split_model(m)
  tokens, positions, lengths = gen.pad_prompts(prompts, n, cfg.max_seq_len, cfg.vocab_size)
  no_eos = np.full(4, -1, np.int32)
  sampling = (np.float32(1.0), np.int32(0), np.float32(1.0))  # unread when greedy
  common = dict(graphdef=graphdef, params=params, key=jax.random.PRNGKey(0), sampling=sampling,
                eos=no_eos, greedy=True)
  carry = gen.prefill(tokens=tokens, positions=positions, lengths=lengths, width=width, **common)
  logits = [_prefill_logits(graphdef, params, tokens, positions, width)]
  for _ in range(1, n):
    logits.append(_next_logits(graphdef, params, carry))
    carry = gen.decode_step(carry=carry, **common)  # donates the carry: read it before
  out = np.asarray(carry["out"])[:, :n]
  logits = np.stack(logits, 1)  # [B, n, V]
  for b, p in enumerate(prompts):
    new = out[b].tolist()
    assert len(new) == n and min(new) >= 0
    full = _full_logits(m, p + new[:-1])
    want = full[len(p) - 1:]  # the logits that predicted new[0], ..., new[n-1]
    np.testing.assert_allclose(logits[b], want, atol=TOL, rtol=TOL)
    assert new == np.argmax(want, -1).tolist()
    if cfg.attention_chunk and len(p) + n > cfg.attention_chunk:
      unchunked = nnx.merge(nnx.graphdef(abstract_model(
          dataclasses.replace(cfg, attention_chunk=0))), nnx.state(m))
      assert np.abs(_full_logits(unchunked, p + new[:-1])[len(p) - 1:] - want).max() > 1e-2
  streamed = []
  assert gen.generate(m, prompts, max_new_tokens=n, temperature=0.0,
                      callback=streamed.append) == out.tolist()
  assert np.stack(streamed, 1).tolist() == out.tolist()
  assert gen.generate(m, prompts, max_new_tokens=n, temperature=0.0) == out.tolist()


def test_batched_equals_single(model):
  """Padding is invisible: each row of a batch decodes exactly as it does alone."""
  prompts = _prompts(GQA.vocab_size, (3, 17, 8), seed=1)
  batched = gen.generate(model, prompts, max_new_tokens=6, temperature=0.0)
  single = [gen.generate(model, [p], max_new_tokens=6, temperature=0.0)[0] for p in prompts]
  assert batched == single


# ---------------------------------------------------------------------------- vs transformers

def _hf_model(seed=0):
  config = transformers.LlamaConfig(
      hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
      vocab_size=131, num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-5,
      attn_implementation="eager", bos_token_id=1, eos_token_id=None, pad_token_id=0,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
  torch.manual_seed(seed)
  ref = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.copy_(1 + 0.3 * torch.randn_like(p) if p.ndim == 1
              else torch.randn_like(p) / math.sqrt(p.shape[1]))
  return ref


def _hf_greedy(ref, prompts, n):
  """transformers' greedy generate on left-padded prompts with an attention mask."""
  width = max(map(len, prompts))
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = torch.tensor(p)
    mask[i, width - len(p):] = 1
  with torch.no_grad():
    out = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                       min_new_tokens=n, pad_token_id=0, eos_token_id=None)
  return out[:, width:].tolist()


def test_greedy_matches_transformers_generate():
  from llama_jax.hf import load_hf  # converts the same random weights into our layout
  ref = _hf_model()
  model, _ = load_hf(ref)
  prompts = _prompts(131, (7, 2, 12), seed=2)
  n = 12
  ours = gen.generate(model, prompts, max_new_tokens=n, temperature=0.0)
  for p, o in zip(prompts, ours):  # one prompt at a time: no padding on the HF side
    assert o == _hf_greedy(ref, [p], n)[0]
  assert ours == _hf_greedy(ref, prompts, n)  # and HF's own left-padded batch


# ---------------------------------------------------------------------------- sampling

@pytest.mark.slow
def test_sampling_reproducible_and_seed_dependent(model):
  prompts = _prompts(GQA.vocab_size, (4, 9), seed=3)
  kw = dict(max_new_tokens=12, temperature=1.0)
  a = gen.generate(model, prompts, seed=7, **kw)
  assert a == gen.generate(model, prompts, seed=7, **kw)
  assert a != gen.generate(model, prompts, seed=8, **kw)
  assert a != gen.generate(model, prompts, temperature=0.0, max_new_tokens=12)
  # The streamed (Python loop) path draws the same tokens as the while_loop.
  streamed = []
  assert gen.generate(model, prompts, seed=7, callback=streamed.append, **kw) == a
  assert np.stack(streamed, 1).tolist() == a


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5)],
                         ids=["top_k_1", "top_p_tiny", "both"])
def test_truncation_to_one_token_is_greedy(model, kw):
  prompts = _prompts(GQA.vocab_size, (6, 3), seed=4)
  greedy = gen.generate(model, prompts, max_new_tokens=10, temperature=0.0)
  assert gen.generate(model, prompts, max_new_tokens=10, temperature=1.3, seed=5, **kw) == greedy


def test_sample_logits_support():
  """top_k keeps the k largest; top_p keeps the smallest prefix reaching the mass."""
  probs = np.array([0.5, 0.25, 0.15, 0.07, 0.03])
  logits = np.log(np.tile(probs, (4000, 1))).astype(np.float32)
  keys = jax.random.PRNGKey(0)

  def support(**kw):
    return set(np.asarray(gen.sample_logits(logits, keys, 1.0, **kw)).tolist())

  assert support() == {0, 1, 2, 3, 4}
  assert support(top_k=2) == {0, 1}
  assert support(top_p=0.5) == {0}          # the mass before token 1 is already 0.5
  assert support(top_p=0.6) == {0, 1}
  assert support(top_p=0.9) == {0, 1, 2}    # 0.75 < 0.9, then 0.9 is reached
  assert support(top_k=3, top_p=0.6) == {0, 1}
  counts = np.bincount(np.asarray(gen.sample_logits(logits, keys, 1.0, top_k=2)), minlength=5)
  assert abs(counts[0] / counts[:2].sum() - 2 / 3) < 0.03  # renormalised over the kept two


# ---------------------------------------------------------------------------- EOS

def test_eos_stops_each_row(model):
  prompts = _prompts(GQA.vocab_size, (5, 10), seed=6)
  n = 10
  greedy = gen.generate(model, prompts, max_new_tokens=n, temperature=0.0)
  # A token row 0 first produces at step j >= 1.
  j = next(j for j in range(1, n) if greedy[0][j] not in greedy[0][:j])
  eos = greedy[0][j]

  def cut(row):
    return row[:row.index(eos) + 1] if eos in row else row

  want = [cut(r) for r in greedy]
  assert want[0] == greedy[0][:j + 1]
  assert gen.generate(model, prompts, max_new_tokens=n, temperature=0.0, eos_id=eos) == want
  steps = []
  out = gen.generate(model, prompts, max_new_tokens=n, temperature=0.0, eos_id=[eos, 10_000],
                     callback=steps.append)
  assert out == want
  # Finished rows report -1; decoding stops once every row is done.
  assert len(steps) == max(map(len, want))
  assert all(s[0] == -1 for s in steps[j + 1:])
  # Both rows stopping at step 0 ends decoding after the prefill.
  firsts = {r[0] for r in greedy}
  assert gen.generate(model, prompts, max_new_tokens=n, temperature=0.0,
                      eos_id=list(firsts)) == [[r[0]] for r in greedy]


# ---------------------------------------------------------------------------- errors

def test_errors(model):
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    gen.generate(model, [[1, 2], []], max_new_tokens=4)
  with pytest.raises(ValueError, match="non-empty list of prompts"):
    gen.generate(model, [], max_new_tokens=4)
  with pytest.raises(ValueError, match=r"max_seq_len=48"):
    gen.generate(model, [[1] * 40], max_new_tokens=9)
  with pytest.raises(ValueError, match=r"max_seq_len=48"):
    gen.generate(model, [[1] * 49], max_new_tokens=0)
  with pytest.raises(ValueError, match="outside"):
    gen.generate(model, [[1, GQA.vocab_size]], max_new_tokens=1)
  with pytest.raises(ValueError, match="top_p"):
    gen.generate(model, [[1]], max_new_tokens=1, top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    gen.generate(model, [[1]], max_new_tokens=1, temperature=-1.0)
  assert gen.generate(model, [[1], [2, 3]], max_new_tokens=0) == [[], []]
  # Exactly max_seq_len positions is allowed.
  assert len(gen.generate(model, [[1] * 40], max_new_tokens=8, temperature=0.0)[0]) == 8


# ---------------------------------------------------------------------------- text

class ByteTokenizer:
  """UTF-8 bytes shifted by 3 (0 pad, 1 BOS, 2 EOS), vocab 259."""
  bos_id, eos_id, vocab_size = 1, 2, 259

  def encode(self, s):
    return [b + 3 for b in s.encode()]

  def decode(self, ids):
    return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def test_sample_text_and_stream(model):
  tok = ByteTokenizer()
  m = model
  # max_new_tokens is cut to what fits after BOS + 6 bytes.
  text = gen.sample_text(m, tok, "héllo", max_new_tokens=100, temperature=0.0, top_k=0, seed=0)
  assert text.startswith("héllo")
  new = gen.generate(m, [[1] + tok.encode("héllo")], max_new_tokens=48 - 7, temperature=0.0,
                     eos_id=2)[0]
  assert text == "héllo" + tok.decode([t for t in new if t != 2])
  # Prompt ids the model's vocabulary lacks are dropped (a byte tokenizer on a synthetic
  # 104-id run: 'd' is id 103, 'e' id 104).
  small = _random_model(ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=80,
                                    vocab_size=104, max_seq_len=24))
  assert gen.sample_text(small, tok, "def ", max_new_tokens=4, temperature=0.0).startswith("def ")
  # The stream holds back half a UTF-8 character and emits it whole.
  stream = gen.TextStream(tok, [1] + tok.encode("a"))
  e = "é".encode()
  assert stream.push(e[0] + 3) == ""
  assert stream.push(e[1] + 3) == "é"
  assert stream.push(ord("b") + 3) == "b"


def _byte_level_tokenizer_json(path):
  """A real tokenizer.json (byte-level BPE) trained on a few words."""
  import tokenizers
  tk = tokenizers.Tokenizer(tokenizers.models.BPE())
  tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tk.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 5, trainer)
  tk.save(os.path.join(path, "tokenizer.json"))
  return tk.get_vocab_size()


def _hf_llama_dir(path, dim: int, ffn: int, layers: int, max_seq_len: int):
  """A saved transformers Llama (seed 0, GQA 4/2) with _byte_level_tokenizer_json's tokenizer
  in `path`; returns the torch model."""
  config = transformers.LlamaConfig(
      hidden_size=dim, num_attention_heads=4, num_key_value_heads=2, intermediate_size=ffn,
      vocab_size=_byte_level_tokenizer_json(path), num_hidden_layers=layers,
      max_position_embeddings=max_seq_len, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config)
  model.save_pretrained(path)
  return model


@pytest.mark.slow
def test_cli_hf_dir(tmp_path):
  """python -m llama_jax.generate --hf_dir: a saved transformers model and its tokenizer.json;
  the greedy text equals our in-process greedy continuation decoded by the same tokenizer."""
  _hf_llama_dir(tmp_path, dim=48, ffn=80, layers=2, max_seq_len=32)
  cmd = [sys.executable, "-m", "llama_jax.generate", f"--hf_dir={tmp_path}",
         "--prompt=the lazy", "--max_new_tokens=6", "--temperature=0"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]

  from llama_jax.hf import load_hf
  m, _ = load_hf(str(tmp_path))
  tok = HFDirTokenizer(str(tmp_path))
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  ids = gen.encode_prompt(tok, "the lazy")
  assert ids[0] == 1 and tok.decode(ids) == "the lazy"
  new = gen.generate(m, [ids], max_new_tokens=6, temperature=0.0, eos_id=2)[0]
  assert r.stdout == "the lazy" + tok.decode([t for t in new if t != 2]) + "\n"

  bad = subprocess.run(cmd[:4] + ["--prompt=x", "--max_new_tokens=100"], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=600)
  assert bad.returncode == 2 and "max_seq_len=32" in bad.stderr  # a user error: one line, 2
  assert "Traceback" not in bad.stderr


def test_load_reads_an_hf_dir_and_refuses_what_it_cannot_read(tmp_path):
  """generate.load (what the CLI and lm_eval read), in process: an HF directory gives its
  weights (the logits of transformers' model) and tokenizer; bad arguments are one line."""
  from llama_jax.errors import UserError
  from llama_jax.generate.load import load
  theirs = _hf_llama_dir(tmp_path, dim=32, ffn=48, layers=1, max_seq_len=16)
  model, tok = load(None, str(tmp_path), None, None)
  ids = tok.encode("the lazy dog")
  with torch.no_grad():
    expected = theirs(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(np.array([ids]))), expected, atol=TOL)
  with pytest.raises(UserError, match="exactly one of --workdir"):
    load(None, None, None, None)
  with pytest.raises(UserError, match="is not a directory"):
    load(None, str(tmp_path / "missing"), None, None)
  with pytest.raises(UserError, match="no checkpoint under .*train first"):  # never trained
    load(str(tmp_path / "no_run"), None, None, None)
