"""The LLaMA transformer in Flax NNX: pure maths, no mesh axis named anywhere.

Axis letters used in einsum strings and shape comments:
  B batch, T query length, S key length, D model dim (`dim`), N query heads,
  K kv heads, G query heads per kv head (N = K * G), H head dim, F ffn dim,
  V vocabulary, L layers.

Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab`, `norm`, `layers`); llama_jax.sharding maps them to mesh axes through the config's
rules. Activations are constrained with `act_*` names at block boundaries.

The default configuration is LLaMA (RMSNorm, RoPE, SwiGLU, no biases). The variants of the
original Transformer (LayerNorm, GELU/ReLU MLP, learned or sinusoidal positions) are chosen by
config for ablations, and so are Llama 4's (docs/llama4.md): NoPE layers with an attention
temperature, chunked attention on the others, qk-norm, MoE layers interleaved with dense ones;
and residual dropout. The config schema (ModelConfig, SIZES) is llama_jax.model.config, the
attention implementations llama_jax.model.attention, the norms llama_jax.model.norms, the
position encodings llama_jax.model.positions, the mixture-of-experts layers
llama_jax.model.moe, and parameter counts and FLOPs llama_jax.model.sizes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llama_jax.model import attention as attention_lib
from llama_jax.model import context_parallel
from llama_jax.model import moe as moe_lib
from llama_jax.model import parametrization as param_lib
from llama_jax.model import remat as remat_lib
from llama_jax.model.config import ModelConfig
from llama_jax.model.norms import RMSNorm, make_norm, rms_normalize
from llama_jax.model.positions import (  # noqa: F401  (rope_frequencies: tests import it here)
    apply_rope, attention_temperature, rope_angles, rope_frequencies, sinusoidal_embedding)
from llama_jax.sharding import ShardingError, constrain

# Parameters get their shardings from `jit(init, out_shardings=...)`, derived from the
# abstract state and the logical-axis rules (llama_jax.sharding). Flax's eager sharding
# would instead demand a mesh context for every module construction, so a model could not
# be built in a plain test or a notebook; turning it off keeps construction mesh-agnostic.
nnx.use_eager_sharding(False)

EMBED_STD = 0.02  # token embedding init (HF's initializer_range)


def _dtype(name: str):
  return jnp.dtype(name)


# ---------------------------------------------------------------------------- initialisers

def _normal(std: float, names: tuple[str | None, ...]):
  return nnx.with_partitioning(nnx.initializers.normal(std), names)


def _fan_in(in_axis, out_axis, names, scale: float = 1.0):
  # Truncated-normal with variance scale/fan_in; fan_in is the product of the input axes.
  init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                           in_axis=in_axis, out_axis=out_axis)
  return nnx.with_partitioning(init, names)


# ---------------------------------------------------------------------------- layer inputs

def dropout(x, rate: float, key):
  """Inverted dropout: x with each element zeroed with probability `rate`, the rest scaled by
  1 / (1 - rate); x itself without a key (eval, decoding) or at rate 0."""
  if key is None or not rate:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class LayerInputs(NamedTuple):
  """What every layer reads besides x, built once per forward pass: RoPE's cos and sin (None
  without RoPE), the decoding mask [B, 1, T, S] of the full-context layers and of the chunked
  ones (None in training), segment ids [B, T] (training), the NoPE layers' query temperature
  [B, T] (None when off)."""

  rope: tuple[jax.Array, jax.Array] | None
  mask: jax.Array | None
  chunk_mask: jax.Array | None
  segment_ids: jax.Array | None
  temperature: jax.Array | None


# ---------------------------------------------------------------------------- projections

def dense(x: jax.Array, w: jax.Array, n_in: int = 1, preferred_element_type=None) -> jax.Array:
  """Contracts x's last n_in axes with w's first n_in axes: [..., *in] x [*in, *out] -> [..., *out].

  Computed as one 2-D GEMM [rows, prod(in)] x [prod(in), prod(out)]. The same contraction as a
  3-D einsum (BTD,DF->BTF) is the same FLOPs, but its backward pass contracts two axes (B, T)
  for the weight gradient, and XLA:CPU then fuses the surrounding elementwise backward ops into
  loops that write transposed copies (measured in docs/PERFORMANCE.md, "What limited the step").
  """
  batch, contract, out = x.shape[:-n_in], x.shape[x.ndim - n_in:], w.shape[n_in:]
  x2, w2 = x.reshape(-1, math.prod(contract)), w.reshape(math.prod(contract), -1)
  y = jnp.dot(x2, w2, preferred_element_type=preferred_element_type)
  return y.reshape(*batch, *out)


def adapter_names(name: str) -> tuple[str, str, str]:
  """Attributes a LoRA adapter of parameter `name` lives in beside it (llama_jax.model.lora)."""
  return f"{name}_lora_a", f"{name}_lora_b", f"{name}_lora_scale"


def project(module: nnx.Module, name: str, x: jax.Array, n_in: int = 1) -> jax.Array:
  """x through the module's weight `name`: dense(x, W), plus scale * (x A) B when
  llama_jax.model.lora gave W an adapter (A [*in, r], B [r, *out]; B = 0 adds exactly 0)."""
  dt = x.dtype
  y = dense(x, getattr(module, name)[...].astype(dt), n_in)
  a_name, b_name, scale_name = adapter_names(name)
  a = getattr(module, a_name, None)
  if a is None:
    return y
  low = dense(dense(x, a[...].astype(dt), n_in), getattr(module, b_name)[...].astype(dt))
  return y + low * jnp.asarray(getattr(module, scale_name), dt)


@jax.custom_vjp
def lm_head_logits(x: jax.Array, head: jax.Array) -> jax.Array:
  """x [..., D] @ head [D, V] -> fp32 logits, for a softmax over V that needs fp32's range.

  The backward pass runs its two GEMMs in x's dtype, like every other layer's: jax's own
  transpose of a bf16 x bf16 -> fp32 dot upcasts bf16 operands to meet the fp32 cotangent, which
  would make the two largest GEMMs of the backward pass fp32 (TF32 on a GPU) ones
  (measured in docs/PERFORMANCE.md, "Measured: one H200"). In fp32 the two are the same
  computation.
  """
  return dense(x, head, preferred_element_type=jnp.float32)


def _lm_head_logits_fwd(x, head):
  return lm_head_logits(x, head), (x, head)


def _lm_head_logits_bwd(residuals, d_logits):
  x, head = residuals
  _, vjp = jax.vjp(dense, x, head)
  return vjp(d_logits.astype(x.dtype))


lm_head_logits.defvjp(_lm_head_logits_fwd, _lm_head_logits_bwd)


# ---------------------------------------------------------------------------- attention

class Attention(nnx.Module):
  """Grouped-query attention; n_kv_heads == n_heads is MHA, n_kv_heads == 1 is MQA."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    pd = _dtype(cfg.param_dtype)
    self.wq = nnx.Param(_fan_in(0, (1, 2), ("embed", "heads", "head_dim"))(rngs.params(), (d, n, h), pd))
    self.wk = nnx.Param(_fan_in(0, (1, 2), ("embed", "kv_heads", "head_dim"))(rngs.params(), (d, k, h), pd))
    self.wv = nnx.Param(_fan_in(0, (1, 2), ("embed", "kv_heads", "head_dim"))(rngs.params(), (d, k, h), pd))
    # Residual-branch output scaled by 1/sqrt(2L) (GPT-2) so the residual stream's variance
    # stays O(1) with depth (with depth scaling: the base depth's L, see parametrization).
    self.wo = nnx.Param(_fan_in((0, 1), 2, ("heads", "head_dim", "embed"),
                                scale=1.0 / (2 * param_lib.residual_init_layers(cfg)))(
                                    rngs.params(), (n, h, d), pd))
    self.query_multiplier = param_lib.query_multiplier(cfg)
    if cfg.qk_norm == "rms":  # one [H] scale each, shared by the heads (Qwen3)
      self.q_norm = RMSNorm(h, cfg.norm_eps, pd)
      self.k_norm = RMSNorm(h, cfg.norm_eps, pd)

  def __call__(self, x, inputs: LayerInputs, cache, nope: bool = False):
    """x [B, T, D] -> (out [B, T, D], cache). A NoPE layer (`nope`, static) skips RoPE and the
    l2 qk-norm, scales its queries by the attention temperature and attends over the whole
    causal context; the others attend within chunks of cfg.attention_chunk when it is set."""
    cfg = self.cfg
    dt = x.dtype
    # Named for the remat policies that keep them (llama_jax.model.remat).
    q = checkpoint_name(project(self, "wq", x), "query_proj")  # [B, T, N, H]
    if self.query_multiplier != 1.0:  # μP: scores x sqrt(base_head_dim) / head_dim
      q = q * jnp.asarray(self.query_multiplier, dt)
    k = checkpoint_name(project(self, "wk", x), "key_proj")  # [B, T, K, H]
    v = checkpoint_name(project(self, "wv", x), "value_proj")
    if cfg.qk_norm == "rms":  # before RoPE (Qwen3, OLMo 2)
      q, k = self.q_norm(q), self.k_norm(k)
    if inputs.rope is not None and not nope:
      q, k = apply_rope(q, *inputs.rope), apply_rope(k, *inputs.rope)
    if cfg.qk_norm == "l2" and not nope:  # after RoPE, without weights (Llama 4)
      q, k = rms_normalize(q, cfg.norm_eps), rms_normalize(k, cfg.norm_eps)
    if nope and inputs.temperature is not None:  # [B, T] fp32
      q = (q.astype(jnp.float32) * inputs.temperature[:, :, None, None]).astype(dt)
    q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
    k = constrain(k, ("act_batch", "act_seq", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_seq", "act_kv_heads", None))

    if cache is not None:
      # Write the new keys/values at slot `index` of the cache [B, S, K, H].
      index = cache["index"]
      ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, 1)
      cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, 1)
      cache = dict(cache, k=ck, v=cv)
      k, v = ck.astype(dt), cv.astype(dt)

    # Training: causal, within one document when packed, within a chunk on a chunked layer.
    # Decoding: the cache's slot mask (the chunked layers' own).
    chunked = bool(cfg.attention_chunk) and not nope
    mask = inputs.chunk_mask if chunked and cache is not None else inputs.mask
    out = attention_lib.attend(q, k, v, mask=mask,
                               segment_ids=inputs.segment_ids if cache is None else None,
                               is_causal=cache is None, implementation=cfg.attention,
                               block=cfg.attention_block,
                               chunk=cfg.attention_chunk if chunked and cache is None else 0,
                               context_strategy=cfg.context_strategy)
    out = checkpoint_name(project(self, "wo", out, n_in=2), "out_proj")
    return out, cache


# ---------------------------------------------------------------------------- MLP

class MLP(nnx.Module):
  """SwiGLU: w_down(silu(x w_gate) * x w_up); or a non-gated GELU/ReLU MLP w_down(act(x w_up)).
  `ffn_dim` replaces cfg.ffn_dim (an MoE layer's shared experts)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, ffn_dim: int | None = None):
    self.kind = cfg.mlp
    d, f = cfg.dim, ffn_dim or cfg.ffn_dim
    pd = _dtype(cfg.param_dtype)
    if cfg.mlp == "swiglu":
      self.w_gate = nnx.Param(_fan_in(0, 1, ("embed", "mlp"))(rngs.params(), (d, f), pd))
    self.w_up = nnx.Param(_fan_in(0, 1, ("embed", "mlp"))(rngs.params(), (d, f), pd))
    self.w_down = nnx.Param(_fan_in(0, 1, ("mlp", "embed"),
                                    scale=1.0 / (2 * param_lib.residual_init_layers(cfg)))(
                                        rngs.params(), (f, d), pd))

  def __call__(self, x):
    up = project(self, "w_up", x)
    if self.kind == "swiglu":
      gate = project(self, "w_gate", x)
      h = jax.nn.silu(gate) * up
    elif self.kind == "gelu":
      h = jax.nn.gelu(up, approximate=False)
    else:
      h = jax.nn.relu(up)
    h = constrain(h, ("act_batch", "act_seq", "act_mlp"))
    return project(self, "w_down", h)


# ---------------------------------------------------------------------------- block

class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). In an MoE block the
  mlp is the routed experts (llama_jax.model.moe), plus the shared experts' MLP if any."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False):
    self.attn_norm = make_norm(cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = make_norm(cfg)
    self.moe = moe
    if moe:
      self.mlp = moe_lib.MoE(cfg, rngs=rngs)
      if cfg.moe_shared_experts:
        self.shared_mlp = MLP(cfg, rngs=rngs,
                              ffn_dim=cfg.moe_shared_experts * cfg.expert_ffn_dim)
    else:
      self.mlp = MLP(cfg, rngs=rngs)
    self.branch_multiplier = param_lib.branch_multiplier(cfg)  # depth scaling; 1 without
    self.rate = cfg.dropout

  def _branch(self, h):
    return h if self.branch_multiplier == 1.0 else h * jnp.asarray(self.branch_multiplier, h.dtype)

  def __call__(self, x, inputs: LayerInputs, cache, nope: bool = False, key=None):
    """(x, cache, stats): stats are the MoE layer's routing statistics ({} when dense). `key`
    (training with model.dropout > 0) draws the dropout masks of the two branches."""
    x = checkpoint_name(x, "layer_input")  # the residual stream a remat policy may keep
    keys = (None, None) if key is None else jax.random.split(key)
    h, cache = self.attn(self.attn_norm(x), inputs, cache, nope)
    x = x + self._branch(dropout(h, self.rate, keys[0]))
    h, stats = self.mlp_norm(x), {}
    if self.moe:
      y, stats = self.mlp(h, decoding=cache is not None)
      if hasattr(self, "shared_mlp"):
        y = y + self.shared_mlp(h)
    else:
      y = self.mlp(h)
    x = x + self._branch(dropout(y, self.rate, keys[1]))
    return constrain(x, ("act_batch", "act_seq", "act_embed")), cache, stats


# ---------------------------------------------------------------------------- the model

class Llama(nnx.Module):
  """tokens [B, T] -> logits [B, T, V] (fp32).

  The n_layers blocks are created stacked (every block parameter has a leading `layers` axis)
  whether or not they are scanned, so scan_layers only changes how the forward pass runs:
  `jax.lax.scan` over the stack (compile time flat in depth) or a Python loop over slices.
  An MoE model with moe_every = N > 1 has two stacks, `layers` (the dense blocks) and
  `moe_layers` (every N-th block), run as groups of N - 1 dense blocks and one MoE block.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = _dtype(cfg.param_dtype)
    self.embed = nnx.Param(_normal(EMBED_STD, ("vocab", "embed"))(rngs.params(), (cfg.vocab_size, cfg.dim), pd))
    if cfg.position == "learned":
      self.pos_embed = nnx.Param(_normal(0.02, (None, "embed"))(rngs.params(), (cfg.max_seq_len, cfg.dim), pd))

    def make_blocks(n, moe):
      @nnx.split_rngs(splits=n)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make(rngs: nnx.Rngs):
        return Block(cfg, rngs=rngs, moe=moe)
      return make(rngs)

    n_moe = cfg.n_moe_layers
    if n_moe < cfg.n_layers:
      self.layers = make_blocks(cfg.n_layers - n_moe, False)
    if n_moe:
      setattr(self, "layers" if n_moe == cfg.n_layers else "moe_layers", make_blocks(n_moe, True))
    self.final_norm = make_norm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(_fan_in(0, 1, ("embed", "vocab"),
                                       scale=param_lib.readout_init_scale(cfg))(
                                           rngs.params(), (cfg.dim, cfg.vocab_size), pd))

  def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None,
               output_hidden_states=False, return_moe_stats=False, dropout_rng=None,
               load_balanced=False):
    """Forward pass.

    tokens [B, T] int; positions [B, T] (default 0..T-1, or cache['index'] onward with a cache:
    a decode step needs explicit positions only when rows are padded); segment_ids [B, T] for
    packed documents. With `cache` (see `init_cache`) the T new keys/values and their positions are
    written at slot cache['index']; a query at position p sees every filled slot whose position
    is <= p (and, on a chunked layer, in p's chunk; a position of -1 marks padding, seen by
    nobody), and (logits, cache) is returned with index advanced by T. With output_hidden_states
    (training form only), (logits, hidden)
    is returned, hidden [L + 1, B, T, D] being the embedding output and every block's output
    (HF's output_hidden_states; the μP coordinate check reads their scales). With
    return_moe_stats (training form), (logits, stats) is returned: the MoE layers' routing
    statistics stacked over them ({} for a dense model; llama_jax.model.moe.finalize).
    `dropout_rng` (a key; training only) turns on model.dropout's masks; without it the model
    is deterministic (eval, decoding).

    Under a mesh that splits the sequence over the context axis (training form only), the
    sequence runs in llama_jax.model.context_parallel's load-balanced order: `load_balanced`
    says the caller has put tokens, positions and segment ids in it (llama_jax.loss does, and
    then reads the logits in that order too); otherwise they are reordered here and the logits
    (and hidden states) put back in their natural order.
    """
    cfg = self.cfg
    dt = _dtype(cfg.dtype)
    b, t = tokens.shape
    n = context_parallel.degree()
    if n > 1 and cache is not None:
      raise ShardingError(
          f"decoding with a KV cache does not run with the sequence split over the context "
          f"axis ({n} devices); decode on a mesh without it (python -m llama_jax.generate "
          "runs on one device)")
    if n > 1 and not load_balanced:
      return context_parallel.in_natural_order(
          functools.partial(self, output_hidden_states=output_hidden_states,
                            return_moe_stats=return_moe_stats, dropout_rng=dropout_rng),
          tokens, positions, segment_ids, n, output_hidden_states)
    if positions is None:
      start = 0 if cache is None else cache["index"]
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
      if load_balanced:
        positions = context_parallel.load_balance(positions, n)
    keys = None
    if cfg.dropout and dropout_rng is not None:  # one key for the embeddings, one per layer
      keys = jax.random.split(dropout_rng, cfg.n_layers + 1)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)  # [B, T, D]
    if cfg.position == "learned":
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
    elif cfg.position == "sinusoidal":
      # Vaswani et al. 2017 add unit-amplitude sinusoids (RMS 0.71) to token embeddings of std 1
      # (N(0, 1/dim) scaled by sqrt(dim)). Ours have std EMBED_STD; scaling the sinusoids by it
      # keeps their ratio, and keeps the token embeddings identical across position variants.
      x = x + EMBED_STD * sinusoidal_embedding(positions, cfg.dim).astype(dt)
    x = dropout(x, cfg.dropout, None if keys is None else keys[0])
    x = constrain(x, ("act_batch", "act_seq", "act_embed"))
    rope = rope_angles(cfg, positions) if cfg.position == "rope" else None
    mask = chunk_mask = None
    if cache is not None:
      slot_pos = jax.lax.dynamic_update_slice_in_dim(
          cache["pos"], positions.astype(jnp.int32), cache["index"], 1)  # [B, S]
      slots, query = slot_pos[:, None, None, :], positions[:, None, :, None]
      mask = (slots >= 0) & (slots <= query)  # [B, 1, T, S]
      if cfg.attention_chunk:  # Llama 4's chunks: by position, the same in every row
        chunk_mask = mask & (slots // cfg.attention_chunk == query // cfg.attention_chunk)
      cache = dict(cache, pos=slot_pos)
    temperature = attention_temperature(cfg, positions) if cfg.attn_temperature_tuning else None
    inputs = LayerInputs(rope, mask, chunk_mask, segment_ids, temperature)

    x0 = x
    x, cache, hidden, stats = self._run_layers(x, inputs, cache, output_hidden_states,
                                               None if keys is None else keys[1:])

    x = self.final_norm(x)
    head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
    logits = lm_head_logits(x, head.astype(dt))
    if (mult := param_lib.logit_multiplier(cfg)) != 1.0:  # μP readout: x base_dim / dim
      logits = logits * mult
    logits = constrain(logits, ("act_batch", "act_seq", "act_vocab"))
    if output_hidden_states:
      return logits, jnp.concatenate([x0[None], hidden])
    if return_moe_stats:
      return logits, stats
    return logits if cache is None else (logits, cache)

  def _run_layers(self, x, inputs, cache, output_hidden_states=False, keys=None):
    """The blocks in order: (x, cache, hidden [L, B, T, D] or None, MoE stats [L_moe, ...]).
    One scan step (or loop iteration) runs a group of cfg.layer_period layers, in which each
    layer's kind (dense or MoE, RoPE or NoPE) is fixed: the dense ones from the stack `layers`,
    the MoE ones from `moe_layers` (or `layers` when every layer is MoE). keys [L]: the layers'
    dropout keys, or None."""
    cfg = self.cfg
    n = cfg.layer_period
    kinds = [cfg.is_moe_layer(j) for j in range(n)]  # MoE or not, by place in the group
    all_moe = cfg.n_moe_layers == cfg.n_layers
    graphdefs, states = {}, {}
    for moe in sorted(set(kinds)):
      # `layers` holds the dense blocks, or the MoE ones when every layer is MoE
      graphdef, state = nnx.split(self.layers if moe == all_moe else self.moe_layers)
      m = kinds.count(moe)  # [L_kind, ...] -> [G, m, ...]
      graphdefs[moe] = graphdef
      states[moe] = jax.tree.map(lambda a: a.reshape(-1, m, *a.shape[1:]), state)
    layers = [self._layer(graphdefs[kinds[j]], cache, inputs, cfg.is_nope_layer(j))
              for j in range(n)]
    split = lambda a: a.reshape(-1, n, *a.shape[1:])  # noqa: E731 [L..] -> [G, n..]
    xs = (states, None if cache is None else jax.tree.map(split, {"k": cache["k"],
                                                                 "v": cache["v"]}),
          None if keys is None else split(keys))

    def group(x, xs):  # layers g*n, ..., g*n + n - 1
      states, kv, keys = xs
      outs, moe_stats, taken = [], [], {False: 0, True: 0}
      for j in range(n):
        state = jax.tree.map(lambda a: a[taken[kinds[j]]], states[kinds[j]])
        taken[kinds[j]] += 1
        kv_j = None if kv is None else jax.tree.map(lambda a: a[j], kv)
        x, kv_j, stats = layers[j](x, state, kv_j, None if keys is None else keys[j])
        outs.append((kv_j, x))
        if kinds[j]:
          moe_stats.append(stats)
      kv, hidden = (jax.tree.map(lambda *a: jnp.stack(a), *o) for o in zip(*outs))
      stats = jax.tree.map(lambda *a: jnp.stack(a), *moe_stats) if moe_stats else {}
      return x, (kv, stats, hidden if output_hidden_states else None)

    if cfg.scan_layers:
      x, (new_kv, stats, hidden) = jax.lax.scan(group, x, xs)
    else:
      outs = []
      for i in range(cfg.n_layers // n):
        x, out = group(x, jax.tree.map(lambda a: a[i], xs))
        outs.append(out)
      new_kv, stats, hidden = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    # [G, n..] -> [L..]; the MoE stats [G, m..] -> [L_moe..]
    new_kv, hidden, stats = (jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), t)
                             for t in (new_kv, hidden, stats))
    if cache is None:
      return x, None, hidden, stats
    return x, dict(cache, **new_kv, index=cache["index"] + x.shape[1]), None, stats

  def _layer(self, graphdef, cache, inputs, nope: bool):
    """(x, one block's state, its kv or None, its dropout key or None) -> (x, kv, stats),
    checkpointed per cfg.remat."""
    def layer(x, layer_state, kv, key):
      block = nnx.merge(graphdef, layer_state)
      kv = None if kv is None else dict(kv, index=cache["index"])
      x, kv, stats = block(x, inputs, kv, nope, key)
      return x, (None if kv is None else {"k": kv["k"], "v": kv["v"]}), stats
    if self.cfg.remat != "none":
      layer = jax.checkpoint(layer, policy=remat_lib.policy(self.cfg.remat))
    return layer


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict[str, jax.Array]:
  """An empty KV cache: k and v [L, B, S, K, H] (kv heads, not query heads), the position held
  in each slot [B, S] (-1 while empty) and the next slot to write."""
  dtype = _dtype(cfg.dtype) if dtype is None else dtype
  shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "pos": jnp.full((batch, length), -1, jnp.int32), "index": jnp.zeros((), jnp.int32)}


# ---------------------------------------------------------------------------- sizes

def abstract_model(cfg: ModelConfig) -> Llama:
  """The model's shapes and logical axes, nothing allocated."""
  return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))

