"""The model's config schema: `config.model` (llama_jax.config) is built from ModelConfig's
defaults, checked here on construction; SIZES holds the published model sizes. Pure Python:
reading a config needs no jax."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

NORMS = ("rms", "layer")
MLPS = ("swiglu", "gelu", "relu")
POSITIONS = ("rope", "learned", "sinusoidal", "none")
# Remat policies, the one list of their names (llama_jax.model.remat builds each): 'none' keeps
# every activation, 'full' recomputes each layer from its input, 'dots' / 'dots_no_batch' keep
# matmul outputs by primitive. The named ones keep only the activations llama.py names with
# checkpoint_name, and their offload_* twins move the same names to host memory (TPU, GPU).
NAMED_REMATS = {
    # the attention projections' outputs only (MaxText's save_qkv_proj)
    "save_qkv_proj": ("query_proj", "key_proj", "value_proj"),
    # everything the backward pass reads but the MLP's input projections (gate, up)
    "save_dot_except_mlpwi": ("query_proj", "key_proj", "value_proj", "attention_out",
                              "attention_lse", "out_proj"),
    # only each layer's input, the residual stream ('full' keeps it too, as the scan's carry)
    "save_layer_input": ("layer_input",),
}
OFFLOAD_REMATS = {name.replace("save_", "offload_", 1): names
                  for name, names in NAMED_REMATS.items()}
REMATS = ("none", "full", "dots", "dots_no_batch", *NAMED_REMATS, *OFFLOAD_REMATS)
# llama_jax.model.attention.attend dispatches on these: XLA's softmax attention, cuDNN's flash
# attention (GPU), the blockwise (flash-style) attention written in XLA ops, or jax's splash
# attention Pallas kernel (TPU; interpreted elsewhere).
ATTENTIONS = ("xla", "cudnn", "blockwise", "splash")
# How attention reaches the keys and values of the other devices when the sequence is split
# over the context mesh axis (llama_jax.model.context_parallel): all gathered at once, or
# passed around the ring one device's a step (a step's transfer can overlap the previous
# step's blocks; 'blockwise' only).
CONTEXT_STRATEGIES = ("all_gather", "ring")
# The splash kernel's blocks are multiples of the TPU's 128 lanes (checked by the kernel even
# when interpreted).
SPLASH_LANES = 128


def splash_block(t: int, block: int) -> int:
  """The splash kernel's block for T tokens (the whole sequence when it is shorter than
  `block`), or 0 where that block is no multiple of 128 lanes or does not divide T."""
  b = min(block, t)
  return b if t % b == 0 and b % SPLASH_LANES == 0 else 0
DTYPES = ("float32", "bfloat16", "float16")
# llama_jax.model.parametrization: standard, or μP's width multipliers from a base shape; and
# the residual-branch depth scaling (none, alpha = 1/2, alpha = 1).
PARAMETRIZATIONS = ("sp", "mup")
DEPTH_SCALINGS = ("none", "depth_mup", "completep")
# Mixture of experts (llama_jax.model.moe): how the router scores the experts, and the grouped
# matmul that runs them (llama_jax.model.moe.expert_ffn dispatches on these: jax.lax.ragged_dot,
# the Pallas TPU kernel megablox, or every expert on every token as the reference).
MOE_ROUTERS = ("softmax", "sigmoid")
# Query / key normalisation (llama_jax.model.llama.Attention): none; 'l2', each head's q and k
# divided by their RMS without weights after RoPE, on the RoPE layers only (Llama 4's
# use_qk_norm); 'rms', an RMSNorm with a learned [head_dim] scale before RoPE, on every layer
# (Qwen3, OLMo 2).
QK_NORMS = ("none", "l2", "rms")
MOE_IMPLS = ("ragged", "megablox", "dense")
# megablox's tile along the contraction and output axes (llama_jax.model.moe). The TPU compiler
# (libtpu 0.0.42) lowers the kernel and its gradient only when model.dim and the expert hidden
# size are at least one tile (a ragged last tile is fine: 192, 200): a smaller axis gives a
# block that is neither a multiple of 128 nor the whole axis in one of the kernels.
MEGABLOX_TILE = 128


# LoRA targets (llama_jax/model/lora.py): Hugging Face / PEFT's projection name -> (submodule
# of the blocks, our parameter, its input axes).
LORA_TARGETS = {
    "q_proj": ("attn", "wq", 1),      # [D, N, H]
    "k_proj": ("attn", "wk", 1),      # [D, K, H]
    "v_proj": ("attn", "wv", 1),      # [D, K, H]
    "o_proj": ("attn", "wo", 2),      # [N, H, D]
    "gate_proj": ("mlp", "w_gate", 1),  # [D, F]
    "up_proj": ("mlp", "w_up", 1),    # [D, F]
    "down_proj": ("mlp", "w_down", 1),  # [F, D]
}
# Our parameter names are accepted too: 'wq,wv' is 'q_proj,v_proj'.
_ALIASES = {param: name for name, (_, param, _) in LORA_TARGETS.items()}


def parse_lora_targets(targets, mlp: str = "swiglu") -> tuple[str, ...]:
  """'q_proj,v_proj' (or a list, or our names 'wq,wv') -> ('q_proj', 'v_proj'); ValueError
  naming the valid names for anything else (gate_proj exists only in a SwiGLU MLP)."""
  names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
  names = [t for t in names if t]
  valid = [n for n in LORA_TARGETS if n != "gate_proj" or mlp == "swiglu"]
  out = []
  for t in names:
    t = _ALIASES.get(t, t)
    if t not in valid:
      ours = ",".join(LORA_TARGETS[n][1] for n in valid)
      raise ValueError(f"lora.targets names {t!r}, which is not a projection of this model; "
                       f"valid: {','.join(valid)} (or ours: {ours})")
    if t not in out:
      out.append(t)
  if not out:
    raise ValueError(f"lora.targets is empty; name projections from {','.join(valid)}")
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 frequency-dependent RoPE scaling (HF `rope_type: llama3`)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model schema: `config.model` (llama_jax.config) is built from these defaults."""

  dim: int = 256
  n_layers: int = 4
  n_heads: int = 8
  n_kv_heads: int = 4
  ffn_dim: int = 688
  vocab_size: int = 4096
  max_seq_len: int = 256
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_embeddings: bool = False
  norm: str = "rms"
  mlp: str = "swiglu"
  position: str = "rope"
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  # Keep the projections' outputs, recompute the elementwise ops in the backward pass: less to
  # store per layer, and on CPU faster than remat="none" (docs/PERFORMANCE.md).
  remat: str = "dots_no_batch"
  attention: str = "blockwise"  # one of ATTENTIONS
  # query rows per block of the `blockwise` attention; splash's query and key blocks (forward
  # and backward kernels), a multiple of 128
  attention_block: int = 128
  # Under mesh.context > 1: one of CONTEXT_STRATEGIES (no effect on one device's sequence).
  context_strategy: str = "all_gather"
  # μP / depth scaling (llama_jax.model.parametrization): the base shape the multipliers are
  # relative to; 0 means the model's own value, so the defaults are the model as it is.
  parametrization: str = "sp"
  depth_scaling: str = "none"
  mup_base_dim: int = 0
  mup_base_n_heads: int = 0
  mup_base_ffn_dim: int = 0
  mup_base_n_layers: int = 0
  # Multiplies every weight's initial values (embeddings, projections, readout; norms stay 1):
  # the init-scale hyperparameter of a sweep or a population member.
  init_scale: float = 1.0
  # Mixture of experts (llama_jax.model.moe; docs/moe.md). moe_experts = 0 is the dense model.
  moe_experts: int = 0
  moe_top_k: int = 2             # experts per token
  moe_ffn_dim: int = 0           # each expert's hidden size; 0 = ffn_dim
  moe_shared_experts: int = 0    # always-on experts of moe_ffn_dim, added to the routed output
  moe_every: int = 1             # every N-th layer is MoE (the last of each group of N)
  moe_router: str = "softmax"    # one of MOE_ROUTERS
  moe_capacity_factor: float = 0.0  # 0 = dropless; > 0: tokens per expert per sequence capped
  moe_impl: str = "ragged"       # one of MOE_IMPLS
  moe_aux_loss: float = 0.01     # Switch load-balancing loss coefficient
  moe_z_loss: float = 0.0        # router z-loss coefficient (ST-MoE)
  moe_bias_rate: float = 0.0     # aux-loss-free balancing bias step (DeepSeek-V3); 0 = off
  # Llama 4 (docs/llama4.md; Hugging Face's Llama4TextConfig names in brackets). The dense
  # layers' hidden size is ffn_dim [intermediate_size_mlp], the experts' moe_ffn_dim
  # [intermediate_size].
  nope_every: int = 0            # every N-th layer has no RoPE [no_rope_layer_interval]; 0 = none
  attention_chunk: int = 0       # RoPE layers attend within chunks of N [attention_chunk_size]
  qk_norm: str = "none"          # one of QK_NORMS [use_qk_norm: 'l2']
  # NoPE layers' queries x (1 + attn_scale * log1p(floor((position + 1) / floor_scale)))
  attn_temperature_tuning: bool = False
  floor_scale: int = 8192
  attn_scale: float = 0.1
  # Dropout on the embeddings and on each attention / MLP output before its residual add,
  # training only (llama_jax.train draws its masks from (train.seed, step)); 0 = off.
  dropout: float = 0.0

  def __post_init__(self):
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", _rope_scaling_from_dict(self.rope_scaling))
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size",
                 "max_seq_len", "attention_block"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.dim % self.n_heads:
      raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                       "choose n_heads that divides dim")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads={self.n_heads} is not divisible by "
                       f"model.n_kv_heads={self.n_kv_heads}; n_kv_heads must divide n_heads")
    if self.position == "rope" and self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head dim, got dim/n_heads={self.head_dim}")
    for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("position", POSITIONS),
                          ("remat", REMATS), ("attention", ATTENTIONS), ("dtype", DTYPES),
                          ("context_strategy", CONTEXT_STRATEGIES),
                          ("param_dtype", DTYPES), ("parametrization", PARAMETRIZATIONS),
                          ("depth_scaling", DEPTH_SCALINGS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}")
    if self.attention == "splash" and self.attention_block % SPLASH_LANES:
      raise ValueError(f"model.attention='splash' takes blocks of a multiple of {SPLASH_LANES} "
                       f"(the TPU's lanes), got model.attention_block={self.attention_block}")
    if not float(self.init_scale) > 0:
      raise ValueError(f"model.init_scale={self.init_scale} must be positive")
    self._check_base_shape()
    self._check_moe()
    self._check_llama4()

  def _check_llama4(self):
    for name in ("nope_every", "attention_chunk"):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"model.{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
    if self.nope_every:
      if self.position != "rope":
        raise ValueError(f"model.nope_every={self.nope_every} drops RoPE from every "
                         f"{self.nope_every}-th layer, but model.position={self.position!r} has "
                         "no RoPE to drop; set model.position='rope' or model.nope_every=0")
      if self.n_layers % self.nope_every:
        raise ValueError(f"model.nope_every={self.nope_every} must divide model.n_layers="
                         f"{self.n_layers} (the layers repeat in groups with one NoPE layer)")
    if self.attention_chunk > self.max_seq_len:
      raise ValueError(f"model.attention_chunk={self.attention_chunk} exceeds model.max_seq_len="
                       f"{self.max_seq_len}: every chunk would be the whole sequence; set "
                       "model.attention_chunk=0 for full causal attention, or a smaller chunk")
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"model.qk_norm={self.qk_norm!r} is not one of {QK_NORMS}")
    if self.attn_temperature_tuning and not self.nope_every:
      raise ValueError("model.attn_temperature_tuning=True scales the queries of the NoPE layers,"
                       " and there are none (model.nope_every=0); set model.nope_every")
    if self.floor_scale <= 0:
      raise ValueError(f"model.floor_scale={self.floor_scale} must be positive")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"model.dropout={self.dropout} must be in [0, 1) (0 turns it off)")

  def is_nope_layer(self, i: int) -> bool:
    """Whether layer i (from 0) has no RoPE: the last of each group of nope_every layers, as
    Hugging Face's Llama 4 places them (no_rope_layer_interval); it attends over the whole
    causal context while the others attend within chunks of attention_chunk."""
    return bool(self.nope_every) and (i + 1) % self.nope_every == 0

  @property
  def layer_period(self) -> int:
    """Layers after which the pattern of MoE and NoPE layers repeats (one scan step)."""
    return math.lcm(self.moe_every if self.moe_experts else 1, self.nope_every or 1)

  def _check_moe(self):
    moe_fields = [f for f in dataclasses.fields(self) if f.name.startswith("moe_")]
    if int(self.moe_experts) < 0:
      raise ValueError(f"model.moe_experts={self.moe_experts} must be >= 0 (0: a dense model)")
    if not self.moe_experts:
      changed = [f.name for f in moe_fields if getattr(self, f.name) != f.default]
      if changed:
        raise ValueError(f"model.{changed[0]}={getattr(self, changed[0])!r} is set on a dense "
                         "model (model.moe_experts=0); set model.moe_experts to the number of "
                         "experts, or leave the moe_* keys at their defaults")
      return
    if not 1 <= self.moe_top_k <= self.moe_experts:
      raise ValueError(f"model.moe_top_k={self.moe_top_k} must be between 1 and "
                       f"model.moe_experts={self.moe_experts}")
    for name in ("moe_ffn_dim", "moe_shared_experts", "moe_capacity_factor", "moe_aux_loss",
                 "moe_z_loss", "moe_bias_rate"):
      if getattr(self, name) < 0:
        raise ValueError(f"model.{name}={getattr(self, name)} must be >= 0")
    if self.moe_every < 1 or self.n_layers % self.moe_every:
      raise ValueError(f"model.moe_every={self.moe_every} must be a positive divisor of "
                       f"model.n_layers={self.n_layers} (every moe_every-th layer is MoE)")
    for name, allowed in (("moe_router", MOE_ROUTERS), ("moe_impl", MOE_IMPLS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}")
    if self.mlp != "swiglu":
      raise ValueError(f"model.mlp={self.mlp!r}: the experts of an MoE model are SwiGLU; set "
                       "model.mlp='swiglu' or model.moe_experts=0")
    if self.parametrization == "mup":
      raise ValueError("model.parametrization='mup' has no multipliers for expert weights yet; "
                       "use 'sp' with model.moe_experts > 0")
    if self.moe_impl == "megablox":
      for name, size in (("dim", self.dim), ("moe_ffn_dim (or ffn_dim)", self.expert_ffn_dim)):
        if size < MEGABLOX_TILE:
          raise ValueError(f"model.moe_impl='megablox' tiles model.{name}={size} by "
                           f"{MEGABLOX_TILE}, which the TPU kernel needs it to reach; use "
                           f"{MEGABLOX_TILE} or more, or model.moe_impl='ragged'")

  @property
  def expert_ffn_dim(self) -> int:
    """Each expert's hidden size (moe_ffn_dim, or ffn_dim when 0)."""
    return self.moe_ffn_dim or self.ffn_dim

  def is_moe_layer(self, i: int) -> bool:
    """Whether layer i (from 0) is an MoE layer: the last of each group of moe_every layers,
    as Hugging Face's Llama 4 places them (interleave_moe_layer_step)."""
    return bool(self.moe_experts) and (i + 1) % self.moe_every == 0

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers // self.moe_every if self.moe_experts else 0

  def _check_base_shape(self):
    for name in ("mup_base_dim", "mup_base_n_heads", "mup_base_ffn_dim", "mup_base_n_layers"):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"model.{name}={getattr(self, name)} must be >= 0 (0: the model's own)")
    base_dim, base_heads = self.mup_base_dim or self.dim, self.mup_base_n_heads or self.n_heads
    if base_dim % base_heads:
      raise ValueError(f"the μP base shape's dim {base_dim} is not divisible by its n_heads "
                       f"{base_heads}; set model.mup_base_dim / model.mup_base_n_heads to match")
    if self.parametrization == "mup" and self.tie_embeddings:
      raise ValueError("model.parametrization='mup' needs separate input and output embeddings "
                       "(μP scales them differently); set model.tie_embeddings=False")

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @classmethod
  def from_dict(cls, d: Any) -> "ModelConfig":
    """From `config.model` (a ConfigDict or dict); an unknown key is a ValueError naming it."""
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _rope_scaling_from_dict(d: dict) -> RopeScaling:
  d = {k: v for k, v in d.items() if k not in ("rope_type", "type")}
  known = {f.name for f in dataclasses.fields(RopeScaling)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"unknown model.rope_scaling key(s) {unknown}; known: {sorted(known)}")
  return RopeScaling(**d)


_LLAMA4 = dict(dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, ffn_dim=16384, vocab_size=202048,
               norm_eps=1e-5, rope_theta=500000.0, moe_top_k=1, moe_ffn_dim=8192,
               moe_shared_experts=1, moe_router="sigmoid", moe_aux_loss=0.001, nope_every=4,
               attention_chunk=8192, attn_temperature_tuning=True, floor_scale=8192,
               attn_scale=0.1)

# Published sizes. Llama-2 uses vocab 32000 and rope_theta 1e4; Llama-3 vocab 128256, theta 5e5.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=512,
                 max_seq_len=128),
    "small": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=688, vocab_size=4096,
                  max_seq_len=256),
    "llama2_7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                      vocab_size=32000, max_seq_len=4096, norm_eps=1e-5),
    "llama2_13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824,
                       vocab_size=32000, max_seq_len=4096, norm_eps=1e-5),
    "llama2_70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                       vocab_size=32000, max_seq_len=4096, norm_eps=1e-5),
    "llama3_8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      vocab_size=128256, max_seq_len=8192, norm_eps=1e-5, rope_theta=500000.0),
    "llama3_70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                       vocab_size=128256, max_seq_len=8192, norm_eps=1e-5,
                       rope_theta=500000.0),
    # Mixtral-8x7B-v0.1's config.json: 8 experts of 14336, top 2, in every layer.
    "mixtral_8x7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                         vocab_size=32000, max_seq_len=32768, norm_eps=1e-5,
                         rope_theta=1000000.0, moe_experts=8, moe_top_k=2, moe_aux_loss=0.02),
    # Llama 4's text models (Hugging Face Llama-4-Scout-17B-16E / Llama-4-Maverick-17B-128E
    # text_config; MaxText's llama4-17b-16e.yml / -128e.yml): 48 layers of 5120, GQA 40/8,
    # experts of 8192 with one shared expert and a sigmoid top-1 router, every 4th layer NoPE
    # with the attention temperature, the others chunked over 8192 tokens. Scout: 16 experts in
    # every layer, L2 qk-norm, Llama-3.1-style RoPE scaling x16; Maverick: 128 experts in every
    # 2nd layer (dense layers of 16384 between), no qk-norm, no RoPE scaling.
    "llama4_scout": dict(_LLAMA4, max_seq_len=10485760, moe_experts=16, qk_norm="l2",
                         rope_scaling=dict(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                           original_max_position_embeddings=8192)),
    "llama4_maverick": dict(_LLAMA4, max_seq_len=1048576, moe_experts=128, moe_every=2),
}
