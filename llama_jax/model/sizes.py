"""The one home of model arithmetic: parameter counts, FLOPs per token and model shapes.

Everything here is computed from a ModelConfig alone (no jax, no arrays), so sweeps, scaling
fits, MFU and the dry run agree on one count; tests/test_model.py checks the counts against the
traced model.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from llama_jax.model.config import NAMED_REMATS, OFFLOAD_REMATS, ModelConfig

# ---------------------------------------------------------------------------- FLOPs


def _layer_flops(cfg: ModelConfig, seq_len: int, causal_half: bool = False,
                 moe: bool = False, chunked: bool = False) -> dict[str, float]:
  """One layer's matmul FLOPs per token (2 per MAC) by the activation each produces. An MoE
  layer's feed-forward is its router (2*D*E) and, per token, its top-k routed and its shared
  experts, each a gated MLP of moe_ffn_dim (llama_jax.model.moe). A chunked layer's queries
  attend over their chunk of model.attention_chunk positions, not the whole sequence."""
  d, n, k, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  span = min(seq_len, cfg.attention_chunk) if chunked else seq_len
  out = {"q": 2 * d * n * h, "kv": 2 * d * 2 * k * h,
         "attention": 2 * 2 * n * h * span / (2 if causal_half else 1),
         "out": 2 * n * h * d}
  if moe:
    active, fe = cfg.moe_top_k + cfg.moe_shared_experts, cfg.expert_ffn_dim
    out.update(router=2 * d * cfg.moe_experts, mlp_in=2 * d * fe * 2 * active,
               mlp_out=2 * d * fe * active)
  else:
    f = cfg.ffn_dim
    out.update(mlp_in=2 * d * f * (2 if cfg.mlp == "swiglu" else 1), mlp_out=2 * d * f)
  return out


def _layers(cfg: ModelConfig, seq_len: int, causal_half: bool = False):
  """(how many, one's FLOPs by activation) of each kind of layer: dense or MoE, attending over
  the whole sequence or (model.attention_chunk, not a NoPE layer) within chunks."""
  kinds = [(cfg.is_moe_layer(i), bool(cfg.attention_chunk) and not cfg.is_nope_layer(i))
           for i in range(cfg.n_layers)]
  return [(kinds.count((moe, chunked)), _layer_flops(cfg, seq_len, causal_half, moe, chunked))
          for moe in (False, True) for chunked in (False, True)]


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal_half: bool = False) -> float:
  """Matmul FLOPs of one forward pass per token, every matmul counted (2 FLOPs per MAC).

  Per layer: q, k, v, o projections 2*D*H*(2N + 2K); attention scores and the weighted sum
  2 * 2*N*H*T each token attending over the full T (XLA computes the whole T x T block even
  though half is masked), or over its chunk C of a chunked layer (2 * 2*N*H*min(C, T)); the MLP 2*D*F times 3 (gated) or 2 matrices. Plus the LM head 2*D*V.
  An MoE layer's MLP is the active experts': the router 2*D*E, the top_k experts' and the shared
  experts' SwiGLU 3 * 2*D*F_e each (moe_impl='dense' computes all E; these are the model's
  FLOPs, the ones MFU counts). Norms, RoPE, softmax and the embedding lookup are not matmuls and
  are left out.

  Two conventions for the causal attention, both in use: the default counts the full T x T
  score and value products (PaLM's appendix B, nanoGPT, and MaxText before it changed);
  `causal_half=True` counts half of them, the unmasked half (MaxText's
  calculate_tflops_training_per_device today: causal_attention_flops = noncausal / 2).
  """
  layers = _layers(cfg, seq_len, causal_half)
  return float(sum(count * sum(layer.values()) for count, layer in layers)
               + 2 * cfg.dim * cfg.vocab_size)


def flops_per_token(cfg: ModelConfig, seq_len: int, *, causal_half: bool = False) -> float:
  """Training FLOPs per token: forward + backward (twice the forward), remat not counted."""
  return 3.0 * forward_flops_per_token(cfg, seq_len, causal_half=causal_half)


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Matmul FLOPs per token that cfg.remat runs a second time in the backward pass (2 per MAC).

  'none' and 'dots' keep every matmul output, and the dot policies also keep the blockwise,
  splash and cuDNN attentions' outputs (llama_jax.model.remat), so neither reruns a matmul:
  only elementwise work is recomputed. 'dots_no_batch' drops the products with batch
  dimensions, which on the `xla` attention are its score and value products (2 * 2*N*H*T a
  layer). The other policies rerun each projection whose output they do not keep
  (llama_jax.model.config.NAMED_REMATS), the attention where its output is not kept (always on
  `xla`, which names none), and the MLP's gate / up projections; never the MLP's down
  projection, whose output nothing in the backward pass reads (XLA drops its rerun: counted in
  the compiled step, tests/test_remat.py). 'full' is thus each layer's forward pass but its
  last matmul; the LM head sits outside the remat scope."""
  if cfg.remat in ("none", "dots"):
    return 0.0
  if cfg.remat == "dots_no_batch":
    return float(sum(count * layer["attention"] for count, layer in _layers(cfg, seq_len))
                 if cfg.attention == "xla" else 0.0)
  kept = set(NAMED_REMATS.get(cfg.remat, OFFLOAD_REMATS.get(cfg.remat, ())))  # 'full': none
  rerun = [("q", "query_proj"), ("kv", "key_proj"), ("out", "out_proj"),
           ("attention", "attention_out" if cfg.attention != "xla" else None)]
  # An MoE layer reruns its router and its experts' gate / up products like a dense MLP's.
  return float(sum(count * (layer["mlp_in"] + layer.get("router", 0.0)
                            + sum(layer[part] for part, name in rerun if name not in kept))
                   for count, layer in _layers(cfg, seq_len)))


def kaplan_flops_per_token(non_embedding_params: int) -> float:
  """Kaplan et al. 2020's C = 6 N per token, N without embeddings."""
  return 6.0 * non_embedding_params


# ---------------------------------------------------------------------------- shapes


def _default_head_dim(dim: int) -> int:
  # Small widths get small heads so there are still several of them (RoPE needs it even).
  target = 8 if dim <= 32 else 16 if dim <= 96 else 32 if dim <= 384 else 64 if dim <= 2048 else 128
  while dim % target:
    target //= 2
  return max(target, 1)


def model_shape(dim: int, n_layers: int, *, head_dim: int | None = None,
                n_kv_heads: int | None = None, mlp: str = "swiglu",
                multiple_of: int = 8) -> dict[str, int]:
  """A LLaMA-style shape: n_heads = dim / head_dim, GQA with 2 query heads per kv head when the
  head count is even, ffn_dim = 8/3 dim (gated) or 4 dim rounded up to `multiple_of`."""
  head_dim = head_dim or _default_head_dim(dim)
  if dim % head_dim:
    raise ValueError(f"dim={dim} is not a multiple of head_dim={head_dim}")
  n_heads = dim // head_dim
  if n_kv_heads is None:
    n_kv_heads = n_heads // 2 if n_heads % 2 == 0 else n_heads
  ffn = 8 * dim / 3 if mlp == "swiglu" else 4 * dim
  ffn_dim = int(math.ceil(ffn / multiple_of) * multiple_of)
  return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
              ffn_dim=ffn_dim)


def _as_model_config(shape: Mapping[str, Any] | ModelConfig) -> ModelConfig:
  if isinstance(shape, ModelConfig):
    return shape
  fields = {k.removeprefix("model."): v for k, v in dict(shape).items()}
  return ModelConfig(**fields)


def count_params(shape: Mapping[str, Any] | ModelConfig, *, non_embedding: bool = False) -> int:
  """Parameters of a model config (or a dict of its fields, `model.` prefixes allowed, the rest
  ModelConfig's defaults), counted from the shapes the layers create: no arrays built.
  tests/test_model.py checks it equals the count of the traced model for every variant.

  non_embedding drops the token embedding, the LM head when untied and learned positions
  (Kaplan et al.'s N)."""
  c = _as_model_config(shape)
  return _count(c, non_embedding, c.moe_experts)


def active_params(shape: Mapping[str, Any] | ModelConfig, *, non_embedding: bool = False) -> int:
  """Parameters one token goes through: count_params with an MoE layer's experts counted only
  top_k times (the router and the shared experts always); count_params for a dense model."""
  c = _as_model_config(shape)
  return _count(c, non_embedding, c.moe_top_k)


def _count(c: ModelConfig, non_embedding: bool, experts: int) -> int:
  """Parameters with `experts` of each MoE layer's routed experts counted."""
  d, h = c.dim, c.head_dim
  attention = d * c.n_heads * h + 2 * d * c.n_kv_heads * h + c.n_heads * h * d
  mlp = (3 if c.mlp == "swiglu" else 2) * d * c.ffn_dim
  moe = d * c.moe_experts + 3 * d * c.expert_ffn_dim * (experts + c.moe_shared_experts)
  norm = (1 if c.norm == "rms" else 2) * d
  qk_norm = 2 * h if c.qk_norm == "rms" else 0  # the q and k scales ('l2' has none)
  n_moe = c.n_moe_layers
  total = (c.n_layers * (attention + 2 * norm + qk_norm) + (c.n_layers - n_moe) * mlp
           + n_moe * moe + norm)
  if not non_embedding:
    total += c.vocab_size * d * (1 if c.tie_embeddings else 2)
    if c.position == "learned":
      total += c.max_seq_len * d
  return total


def shape_for_params(target: float, *, non_embedding: bool = False, aspect_ratio: float = 32.0,
                     tolerance: float = 0.05, dims: Iterable[int] | None = None,
                     max_layers: int = 128, **model_fields) -> dict[str, int]:
  """The model_shape() whose parameter count is closest to `target` (within `tolerance`
  relative, the one whose dim / n_layers is closest to `aspect_ratio`). model_fields are other
  ModelConfig fields that change the count (vocab_size, mlp, norm, tie_embeddings, ...)."""
  dims = list(dims) if dims is not None else list(range(16, 1024, 8)) + list(range(1024, 16385, 64))
  mlp = model_fields.get("mlp", "swiglu")
  best, best_key = None, None
  for dim in dims:
    try:
      one, two = (count_params({**model_fields, **model_shape(dim, n, mlp=mlp)},
                              non_embedding=non_embedding) for n in (1, 2))
    except ValueError:  # a width no valid head layout fits
      continue
    per_layer = two - one
    fixed = one - per_layer
    est = (target - fixed) / per_layer
    for n_layers in sorted({max(1, math.floor(est)), max(1, math.ceil(est))}):
      if n_layers > max_layers:
        continue
      n = fixed + per_layer * n_layers
      miss = abs(math.log(n / target))
      aspect = abs(math.log(dim / n_layers / aspect_ratio))
      key = (0, aspect, miss) if miss <= tolerance else (1, miss, aspect)
      if best_key is None or key < best_key:
        best, best_key = model_shape(dim, n_layers, mlp=mlp), key
  if best is None:
    raise ValueError(f"no shape for {target:g} parameters")
  return best
