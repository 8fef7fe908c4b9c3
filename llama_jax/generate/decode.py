"""KV-cache decoding and sampling: one prefill over the prompts, then one cached step per token.

    new = generate(model, [[1, 15, 27], [1, 9]], max_new_tokens=32, temperature=0.8, top_k=40)
    text = sample_text(model, tokenizer, "def ", max_new_tokens=64, temperature=0.8, top_k=40)

    python -m llama_jax.generate --workdir=DIR --prompt="def " [--prompt=...] [--interactive]
    python -m llama_jax.generate --hf_dir=path/to/Llama-3.2-1B --prompt="The capital of France"
        [--max_new_tokens=128 --temperature=0.8 --top_k=0 --top_p=1.0 --seed=0]

Batching. Prompts of different lengths are left-padded to a common width P with position -1
on the padding: the model's cache mask never attends to a slot of position -1, so padding is
invisible and row b decodes exactly as it would alone. Every row's next token then comes from
column P-1, and the cache (k/v [L, B, P + W, K, H]) is filled one shared slot per step while
each row's RoPE position counts from its own prompt length.

Compilation. P and the output width W are max prompt length and max_new_tokens rounded up to
a multiple of 16, and the sampling settings, EOS ids and max_new_tokens are traced values, so
one compilation serves every call with the same batch size, width bucket and greedy-or-not
(an interactive session does not recompile per prompt).

Decoding. The prefill and the one-token step are jitted functions of (graphdef, params, carry);
the carry holds the cache, the last token, each row's position, a done flag and the output
buffer. Without a callback the steps run inside one `jax.lax.while_loop` (no host round trip
per token; it exits as soon as every row has produced EOS). With a callback a Python loop calls
the jitted step and hands each new column of tokens to the host, so text streams as produced.
Both paths run the same step function, so they give the same tokens.

Sampling. temperature 0 is greedy (argmax); otherwise logits / temperature, optionally cut to
the top_k largest and then to the smallest set whose probability reaches top_p (nucleus, on
the top_k-renormalised distribution as in HF; the most likely token is always kept), then a
categorical draw with key fold_in(PRNGKey(seed), step): the same seed gives the same tokens,
and each step's draw is independent of the others.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.model.llama import Llama, init_cache

PAD_MULTIPLE = 16  # prompt lengths are padded up to this, so nearby lengths share a compile
_PAD_TOKEN = 0     # fed in padding slots and by finished rows; never attended, never returned


# ---------------------------------------------------------------------------- sampling

def sample_logits(logits: jax.Array, key: jax.Array, temperature=1.0, top_k=0,
                  top_p=1.0) -> jax.Array:
  """Next tokens [B] from logits [B, V]. temperature (> 0 here; 0 = greedy is decided by the
  caller, statically), top_k (0 = off) and top_p (1 = off) may be traced scalars, so changing
  them does not recompile. top_p applies to the top_k-renormalised distribution (as in HF)."""
  logits = logits.astype(jnp.float32)
  if isinstance(temperature, (int, float)) and temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  vocab = logits.shape[-1]

  def truncate(logits):
    desc = -jnp.sort(-logits, axis=-1)  # [B, V], largest first
    k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    in_k = jnp.arange(vocab) < k
    probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
    # Keep a token while the mass before it is < top_p: the most likely one always stays,
    # so a tiny top_p (or top_k=1) is greedy.
    kept = in_k & (jnp.cumsum(probs, axis=-1) - probs < top_p)
    threshold = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(logits < threshold, -jnp.inf, logits)

  # The sort is skipped when neither cut is on.
  logits = jax.lax.cond((top_k > 0) | (top_p < 1), truncate, lambda x: x, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature, top_k, top_p) -> tuple[float, int, float]:
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k must be a non-negative integer (0 = off), got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
  return float(temperature), int(top_k), float(top_p)


# ---------------------------------------------------------------------------- prompts

def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_seq_len: int,
                vocab_size: int | None = None, pad_multiple: int = PAD_MULTIPLE
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens [B, P], positions [B, P], lengths [B]), left-padded; position -1 marks padding.

  Raises ValueError for no prompts, an empty prompt, an out-of-vocabulary token, or a prompt
  whose length + max_new_tokens exceeds max_seq_len."""
  if isinstance(prompts, (str, bytes)) or not len(prompts):
    raise ValueError("generate needs a non-empty list of prompts, each a list of token ids")
  if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens}")
  lengths = np.array([len(p) for p in prompts], np.int32)
  for i, (p, n) in enumerate(zip(prompts, lengths)):
    if n == 0:
      raise ValueError(f"prompt {i} is empty: give at least one token (e.g. BOS) to condition on")
    if n + max_new_tokens > max_seq_len:
      raise ValueError(f"prompt {i} has {n} tokens; with max_new_tokens={max_new_tokens} that is "
                       f"{n + max_new_tokens} positions, more than the model's "
                       f"max_seq_len={max_seq_len}: shorten the prompt or lower max_new_tokens")
    if vocab_size is not None and (min(p) < 0 or max(p) >= vocab_size):
      raise ValueError(f"prompt {i} has a token id outside [0, {vocab_size}): "
                       f"{[t for t in p if not 0 <= t < vocab_size][:5]}")
  width = _round_up(int(lengths.max()), pad_multiple)
  tokens = np.full((len(prompts), width), _PAD_TOKEN, np.int32)
  positions = np.full((len(prompts), width), -1, np.int32)
  for i, (p, n) in enumerate(zip(prompts, lengths)):
    tokens[i, width - n:] = p
    positions[i, width - n:] = np.arange(n)
  return tokens, positions, lengths


def _eos_array(eos_id) -> np.ndarray:
  """EOS ids as an int32 array padded with -1 (never a token) to a power of two >= 4, so the
  common cases (none, one, Llama-3's two or three) share one compilation."""
  if eos_id is None:
    ids = []
  elif isinstance(eos_id, (int, np.integer)):
    ids = [int(eos_id)]
  else:
    ids = [int(e) for e in eos_id if e is not None]
  ids = [e for e in ids if e >= 0]
  size = max(4, 1 << (len(ids) - 1).bit_length())
  return np.array(ids + [-1] * (size - len(ids)), np.int32)


# ---------------------------------------------------------------------------- the decoder

def _sample(logits, key, step, greedy: bool, sampling):
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return sample_logits(logits, jax.random.fold_in(key, step), *sampling)


def _is_eos(tokens, eos):
  return jnp.any(tokens[:, None] == eos[None, :], axis=-1)


def _prefill_impl(model: Llama, tokens, positions, lengths, key, sampling, eos, *, width,
                  greedy):
  """Runs the prompts through the model into a fresh cache; samples the first new token.
  `width` is the static output width (>= max_new_tokens); the cache holds P + width slots."""
  b, p = tokens.shape
  cache = init_cache(model.cfg, b, p + width)
  logits, cache = model(tokens, positions=positions, cache=cache)
  last = logits[:, -1]  # [B, V]: left padding puts every row's last prompt token at P-1
  new = _sample(last, key, 0, greedy, sampling)
  out = jnp.full((b, width), -1, jnp.int32).at[:, 0].set(new)
  return {"cache": cache, "token": new, "pos": lengths.astype(jnp.int32),
          "done": _is_eos(new, eos), "step": jnp.ones((), jnp.int32), "out": out}


def _step_impl(model: Llama, carry, key, sampling, eos, *, greedy):
  """Feeds the last token of every row (one cached step) and samples the next."""
  step, done = carry["step"], carry["done"]
  logits, cache = model(carry["token"][:, None], positions=carry["pos"][:, None],
                        cache=carry["cache"])
  logits = logits[:, 0]
  new = _sample(logits, key, step, greedy, sampling)
  new = jnp.where(done, _PAD_TOKEN, new)  # finished rows keep feeding padding
  return dict(carry, cache=cache, token=new, pos=carry["pos"] + 1, step=step + 1,
              done=done | _is_eos(new, eos),
              out=jax.lax.dynamic_update_index_in_dim(
                  carry["out"], jnp.where(done, -1, new), step, 1))


def _no_constraints(fn):
  """Traces fn with no logical-axis rules, so the model's activation constraints are no-ops.

  Decoding batches (often 1) need not divide the training mesh's data axis; the parameters'
  own shardings still guide XLA when the model is sharded."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with nnx.logical_axis_rules(()):
      return fn(*args, **kwargs)
  return wrapped


@functools.partial(jax.jit, static_argnames=("graphdef", "width", "greedy"))
@_no_constraints
def prefill(graphdef, params, tokens, positions, lengths, key, sampling, eos, *, width,
            greedy):
  """Jitted prefill: the decoding carry after the prompts and the first sampled token."""
  return _prefill_impl(nnx.merge(graphdef, params), tokens, positions, lengths, key, sampling,
                       eos, width=width, greedy=greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnums=2)
@_no_constraints
def decode_step(graphdef, params, carry, key, sampling, eos, *, greedy):
  """Jitted one-token cached step (the carry, cache included, is donated and updated)."""
  return _step_impl(nnx.merge(graphdef, params), carry, key, sampling, eos, greedy=greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "width", "greedy"))
@_no_constraints
def _generate_loop(graphdef, params, tokens, positions, lengths, key, sampling, eos, n, *,
                   width, greedy):
  """Prefill plus a while_loop of cached steps until n tokens or every row is done."""
  model = nnx.merge(graphdef, params)
  carry = _prefill_impl(model, tokens, positions, lengths, key, sampling, eos, width=width,
                        greedy=greedy)

  def cond(c):
    return (c["step"] < n) & ~jnp.all(c["done"])

  def body(c):
    return _step_impl(nnx.merge(graphdef, params), c, key, sampling, eos, greedy=greedy)

  return jax.lax.while_loop(cond, body, carry)


def split_model(model: Llama):
  """(graphdef, params) with the params on device once (a model restored with device_get
  holds numpy arrays, which jit would otherwise copy to the device at every step)."""
  graphdef, params = nnx.split(model)
  return graphdef, jax.tree.map(jnp.asarray, params)


def _decode(model: Llama, prompts, *, max_new_tokens, temperature, top_k, top_p, seed, eos_id,
            callback) -> np.ndarray:
  """generate's engine: the new tokens [B, N], -1 after a row's EOS.

  Shapes are bucketed (prompt width and output width rounded up to PAD_MULTIPLE) and the
  sampling settings, EOS ids and N are traced values, so one compilation serves every call
  with the same batch size and greedy-or-not."""
  temperature, top_k, top_p = _check_sampling(temperature, top_k, top_p)
  cfg = model.cfg
  tokens, positions, lengths = pad_prompts(prompts, max_new_tokens, cfg.max_seq_len,
                                           cfg.vocab_size)
  b, n = len(prompts), max_new_tokens
  if n == 0:
    return np.zeros((b, 0), np.int32)
  graphdef, params = split_model(model)
  key = jax.random.PRNGKey(seed)
  sampling = (np.float32(max(temperature, 1e-6)), np.int32(top_k), np.float32(top_p))
  eos = _eos_array(eos_id)
  static = dict(graphdef=graphdef, greedy=temperature == 0.0)
  width = _round_up(n, PAD_MULTIPLE)
  if callback is None:
    carry = _generate_loop(params=params, tokens=tokens, positions=positions, lengths=lengths,
                           key=key, sampling=sampling, eos=eos, n=np.int32(n), width=width,
                           **static)
  else:
    carry = prefill(params=params, tokens=tokens, positions=positions, lengths=lengths,
                    key=key, sampling=sampling, eos=eos, width=width, **static)
    new, done = jax.device_get((carry["token"], carry["done"]))
    callback(np.asarray(new))
    for _ in range(1, n):
      if done.all():
        break
      carry = decode_step(params=params, carry=carry, key=key, sampling=sampling, eos=eos,
                          **static)
      done_before = done
      new, done = jax.device_get((carry["token"], carry["done"]))
      callback(np.where(done_before, -1, new))
  return np.asarray(jax.device_get(carry["out"]))[:, :n]


def generate(model: Llama, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | Sequence[int] | None = None,
             callback: Callable[[np.ndarray], Any] | None = None) -> list[list[int]]:
  """The new tokens for each prompt (a list of token-id lists, any lengths).

  temperature 0 is greedy. A row stops after producing an EOS (included in its list; eos_id
  may be one id or several); the others go on, and decoding ends early when all have stopped.
  `callback(tokens)`, if given, is called once per step with the int array [B] just produced
  (-1 for rows already finished), for streaming. Raises ValueError for an empty prompt or a
  prompt whose length + max_new_tokens exceeds the model's max_seq_len.
  """
  out = _decode(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id, callback=callback)
  # Once a row is done the rest of its buffer is -1.
  return [[int(t) for t in row[row >= 0]] for row in out]


# ---------------------------------------------------------------------------- text

def _bos(tokenizer) -> list[int]:
  bos = getattr(tokenizer, "bos_id", None)
  bos = bos() if callable(bos) else bos
  return [int(bos)] if bos is not None and bos >= 0 else []


def _eos(tokenizer) -> int | None:
  eos = getattr(tokenizer, "eos_id", None)
  eos = eos() if callable(eos) else eos
  return int(eos) if eos is not None and eos >= 0 else None


def _strip_eos(tokens: list[int], eos: int | None) -> list[int]:
  return tokens[:-1] if tokens and eos is not None and tokens[-1] == eos else tokens


class TextStream:
  """Turns a growing list of new tokens into printable text increments.

  The whole continuation is decoded together with the prompt (so SentencePiece's leading
  spaces come out right) and only the new suffix is returned; a suffix ending inside a UTF-8
  character (U+FFFD) is held back until the character is complete."""

  def __init__(self, tokenizer, prompt_tokens: Sequence[int]):
    self.tokenizer = tokenizer
    self.prompt = list(prompt_tokens)
    self.prefix = tokenizer.decode(self.prompt)
    self.tokens: list[int] = []
    self.emitted = ""

  def text(self) -> str:
    full = self.tokenizer.decode(self.prompt + self.tokens)
    if full.startswith(self.prefix):
      return full[len(self.prefix):]
    return self.tokenizer.decode(self.tokens)

  def push(self, token: int) -> str:
    self.tokens.append(int(token))
    text = self.text()
    if text.endswith("\ufffd") or not text.startswith(self.emitted):
      return ""
    piece, self.emitted = text[len(self.emitted):], text
    return piece


def encode_prompt(tokenizer, prompt: str) -> list[int]:
  """BOS (when the tokenizer has one) + the prompt's tokens."""
  return _bos(tokenizer) + list(tokenizer.encode(prompt))


def sample_text(model: Llama, tokenizer, prompt: str, *, max_new_tokens: int,
                temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
                seed: int = 0) -> str:
  """prompt + a sampled continuation (stopping at EOS; BOS prepended when the tokenizer has
  one). max_new_tokens is cut to what fits in the model's max_seq_len after the prompt, and
  prompt ids outside the model's vocabulary (a byte tokenizer over a smaller synthetic
  vocabulary) are dropped, so the end-of-training sample never fails on them."""
  tokens = [t for t in encode_prompt(tokenizer, prompt) if t < model.cfg.vocab_size]
  max_new_tokens = max(0, min(max_new_tokens, model.cfg.max_seq_len - len(tokens)))
  eos = _eos(tokenizer)
  new = generate(model, [tokens], max_new_tokens=max_new_tokens, temperature=temperature,
                 top_k=top_k, top_p=top_p, seed=seed, eos_id=eos)[0]
  stream = TextStream(tokenizer, tokens)
  stream.tokens = _strip_eos(new, eos)
  return prompt + stream.text()

