"""Hugging Face Llama, Mixtral and Llama 4 import/export (safetensors), Meta original-checkpoint
import.

    model, model_config = load_hf("path/to/Llama-3.1-8B")   # or an in-memory LlamaForCausalLM
    save_hf(model, model_config, "out_dir")   # then LlamaForCausalLM.from_pretrained("out_dir")
    model, model_config = load_meta("path/to/Meta-Llama-3.1-8B/original")

Every tensor goes through one table (`HF_TENSORS`): the HF name, our parameter path and how
many leading axes of our parameter are the matmul's input. HF `nn.Linear` stores [out, in];
we store [in..., out...] split per head (q_proj [N*H, D] <-> wq [D, N, H]; o_proj [D, N*H] <->
wo [N, H, D]), so a linear converts as `w.T.reshape(our_shape)` one way and
`w.reshape(prod(in_axes), -1).T` the other. Per-layer tensors are stacked on a leading `layers`
axis. Both sides use the same RoPE layout (HF's half-split), so q/k need no permutation; Meta's
interleaved layout is permuted once, on import.

A Mixtral (an MoE model, model.moe_experts > 0) converts the same way, its MoE tensors named by
llama_jax.mixtral (per-expert tensors stacked on our `experts` axis after `layers`). A Llama 4
(Llama4ForCausalLM, or the text part of a Llama4ForConditionalGeneration directory) has its own
table, layouts and config fields in llama_jax.llama4; a model with a Llama 4 feature (NoPE
layers, chunked attention, L2 qk-norm, a sigmoid router, shared experts, interleaved MoE layers)
is exported as one.

Tensors are read with the `safetensors` library as numpy (bf16 via ml_dtypes) or taken from
torch; torch itself is needed only for `load_meta` and in-memory models.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import llama4, mixtral
from llama_jax.errors import UserError
from llama_jax.model import parametrization as param_lib
from llama_jax.model.config import ModelConfig, RopeScaling
from llama_jax.model.llama import Llama, abstract_model


class HFError(UserError, ValueError):
  """A checkpoint or config this conversion cannot take (or produce), named in one line."""


# (HF tensor name, our parameter path, leading input axes in our layout; 0 = copied as is).
# `{i}` marks a per-layer tensor, stacked along our leading `layers` axis.
HF_TENSORS: tuple[tuple[str, str, int], ...] = (
    ("model.embed_tokens.weight", "embed", 0),  # [V, D]
    ("model.layers.{i}.input_layernorm.weight", "layers.attn_norm.scale", 0),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.attn.wq", 1),  # [N*H, D] <-> [D, N, H]
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.attn.wk", 1),  # [K*H, D] <-> [D, K, H]
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.attn.wv", 1),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.attn.wo", 2),  # [D, N*H] <-> [N, H, D]
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.mlp_norm.scale", 0),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.mlp.w_gate", 1),  # [F, D] <-> [D, F]
    ("model.layers.{i}.mlp.up_proj.weight", "layers.mlp.w_up", 1),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.mlp.w_down", 1),  # [D, F] <-> [F, D]
    ("model.norm.weight", "final_norm.scale", 0),
    ("lm_head.weight", "lm_head", 1),  # [V, D] <-> [D, V]
)

# Buffers some checkpoints carry that are recomputed, not loaded.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _to_ours(w: np.ndarray, n_in: int, shape: tuple[int, ...]) -> np.ndarray:
  return w.reshape(shape) if n_in == 0 else w.T.reshape(shape)


def _to_hf(w: np.ndarray, n_in: int) -> np.ndarray:
  if n_in == 0:
    return w
  return np.ascontiguousarray(w.reshape(math.prod(w.shape[:n_in]), -1).T)


def _expected_names(cfg: ModelConfig, family: str) -> list[tuple[str, str, int, tuple[int, ...]]]:
  """(HF name, our path, input axes, index into our stacked parameter: () or (layer,) or
  (layer, expert)) for every tensor cfg needs, in a checkpoint of `family` (_family)."""
  if family == "llama4":
    return llama4.tensor_table(cfg)
  out = []
  table = HF_TENSORS if not cfg.moe_experts else (
      tuple(t for t in HF_TENSORS if not mixtral.DENSE_MLP.search(t[0])) + mixtral.MOE_TENSORS)
  for hf_name, path, n_in in table:
    if path == "lm_head" and cfg.tie_embeddings:
      continue
    if "{j}" in hf_name:
      out += [(hf_name.format(i=i, j=j), path, n_in, (i, j)) for i in range(cfg.n_layers)
              for j in range(cfg.moe_experts)]
    elif "{i}" in hf_name:
      out += [(hf_name.format(i=i), path, n_in, (i,)) for i in range(cfg.n_layers)]
    else:
      out.append((hf_name, path, n_in, ()))
  return out


# ---------------------------------------------------------------------------- config mapping

def _rope_from_hf(c: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
  """transformers >= 5 keeps theta and scaling in `rope_parameters`; older versions used
  top-level `rope_theta` and `rope_scaling`. rope_parameters wins when both are present."""
  params = c.get("rope_parameters") or {}
  theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
  scaling = params if params else (c.get("rope_scaling") or {})
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind in (None, "default"):
    return theta, None
  if kind != "llama3":
    raise HFError(f"rope type {kind!r} is not supported (only 'default' and Llama-3.1 "
                     f"'llama3' scaling): {dict(scaling)}")
  return theta, RopeScaling(
      factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
      high_freq_factor=float(scaling["high_freq_factor"]),
      original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def _family(c: Mapping[str, Any]) -> str:
  """'llama', 'mixtral' or 'llama4': which tensor table a config.json's checkpoint uses."""
  model_type = c.get("model_type")
  if llama4.is_llama4(c):
    return "llama4"
  if model_type not in ("llama", "mixtral"):
    raise HFError(f"not a Llama, Mixtral or Llama 4 checkpoint: config model_type is "
                  f"{model_type!r}, expected 'llama', 'mixtral', 'llama4_text' or 'llama4'")
  return model_type


def _export_family(cfg: ModelConfig) -> str:
  if llama4.is_exported_as_llama4(cfg) or cfg.qk_norm != "none":
    return "llama4"
  return "mixtral" if cfg.moe_experts else "llama"


def config_from_hf(c: Mapping[str, Any], **overrides) -> ModelConfig:
  """ModelConfig from a transformers Llama, Mixtral or Llama 4 config dict (a Llama4Config's
  text_config); a feature llama_jax lacks is a ValueError."""
  family = _family(c)
  c = llama4.text_config(c)
  arch = {"mixtral": "MixtralForCausalLM", "llama4": llama4.ARCH}.get(family, "LlamaForCausalLM")
  archs = [a.replace("ForConditionalGeneration", "ForCausalLM")
           for a in (c.get("architectures") or [arch])]
  if arch not in archs:
    raise HFError(f"config architectures is {archs}, expected {arch}")
  for key in ("attention_bias", "mlp_bias"):
    if c.get(key):
      raise HFError(f"config {key}=True is not supported: llama_jax has no bias terms")
  if c.get("hidden_act", "silu") != "silu":
    raise HFError(f"config hidden_act={c['hidden_act']!r} is not supported, expected 'silu'")
  dim, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
  if c.get("head_dim") is not None and int(c["head_dim"]) * n_heads != dim:
    raise HFError(f"config head_dim={c['head_dim']} != hidden_size/num_attention_heads="
                     f"{dim}/{n_heads}: llama_jax needs head_dim = dim / n_heads")
  theta, scaling = _rope_from_hf(c)
  kw = dict(
      dim=dim, n_layers=int(c["num_hidden_layers"]), n_heads=n_heads,
      n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
      ffn_dim=int(c["intermediate_size"]), vocab_size=int(c["vocab_size"]),
      max_seq_len=int(c.get("max_position_embeddings", 2048)),
      norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
      tie_embeddings=bool(c.get("tie_word_embeddings", False)))
  try:
    if family != "llama":
      kw.update({"mixtral": mixtral.config_kwargs, "llama4": llama4.config_kwargs}[family](c))
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**kw)
  except ValueError as e:
    raise HFError(str(e)) from None


def config_to_hf(cfg: ModelConfig, router_bias=None) -> dict[str, Any]:
  """A config.json that transformers 5 (rope_parameters) and 4.x (rope_theta, rope_scaling)
  both load; each version ignores the other's keys. A model with a Llama 4 feature gets a
  Llama4TextConfig's, another MoE model a Mixtral's (its router_bias, when given, must be 0:
  neither has one)."""
  for name, want in (("norm", "rms"), ("mlp", "swiglu"), ("position", "rope")):
    if getattr(cfg, name) != want:
      raise HFError(f"model.{name}={getattr(cfg, name)!r} cannot be exported to a HF Llama "
                       f"checkpoint, which needs model.{name}={want!r}")
  s = cfg.rope_scaling
  scaling = None if s is None else {
      "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
      "high_freq_factor": s.high_freq_factor,
      "original_max_position_embeddings": s.original_max_position_embeddings}
  family = _export_family(cfg)
  try:
    moe = ({"llama4": llama4.hf_fields, "mixtral": mixtral.hf_fields}[family](cfg, router_bias)
           if family != "llama" else {})
  except ValueError as e:
    raise HFError(str(e)) from None
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim, "vocab_size": cfg.vocab_size,
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
      "tie_word_embeddings": cfg.tie_embeddings,
      "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
      "rope_parameters": {"rope_type": "default" if s is None else "llama3",
                          "rope_theta": cfg.rope_theta, **(scaling or {})},
      "torch_dtype": cfg.param_dtype, "dtype": cfg.param_dtype, **moe,
  }


# ---------------------------------------------------------------------------- building

def _build(cfg: ModelConfig, get: Callable[[str], np.ndarray], available: set[str],
           family: str) -> Llama:
  """A Llama whose parameters are the named tensors of a `family` checkpoint, converted through
  its table (HF_TENSORS, llama_jax.mixtral's, llama_jax.llama4's)."""
  if family == "llama4":
    get, available = llama4.view(get, available, cfg, meta_qk_to_hf)
  else:
    get, available = mixtral.per_expert_view(get, available)
  expected = _expected_names(cfg, family)
  missing = [name for name, *_ in expected if name not in available]
  if missing:
    raise HFError(f"checkpoint is missing {len(missing)} tensor(s): {missing[:12]}"
                     + (" ..." if len(missing) > 12 else ""))
  # A tied checkpoint may still carry lm_head.weight (a copy of the embedding).
  unused = available - {e[0] for e in expected}
  if cfg.tie_embeddings:
    unused.discard("lm_head.weight")
  unexpected = sorted(n for n in unused if not _IGNORED.search(n))
  if unexpected:
    raise HFError(f"checkpoint has tensor(s) a {cfg.n_layers}-layer llama_jax model does not "
                     f"use: {unexpected[:12]}" + (" ..." if len(unexpected) > 12 else ""))

  graphdef, state = nnx.split(abstract_model(cfg))
  shapes = {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(state)}
  dtype = jnp.dtype(cfg.param_dtype)
  parts: dict[str, dict[tuple[int, ...], np.ndarray]] = {}
  for name, path, n_in, index in expected:
    shape = shapes[path][len(index):]
    w = np.asarray(get(name))
    if w.size != math.prod(shape):
      raise HFError(f"tensor {name} has shape {w.shape}, which does not fit {path} {shape}")
    parts.setdefault(path, {})[index] = _to_ours(w, n_in, shape).astype(dtype)
  # Stacked in order: [L, ...] of layers, [L, E, ...] of experts; an MoE layer's router bias
  # (state of llama_jax.model.moe, no HF tensor) starts at 0.
  values = {p: ws[()] if () in ws else np.stack([ws[i] for i in sorted(ws)]).reshape(shapes[p])
            for p, ws in parts.items()}
  flat = [(p, v.replace(jnp.asarray(values.get(".".join(map(str, p)), np.zeros(v.shape)),
                                    v.dtype)))
          for p, v in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _torch_to_numpy(t) -> np.ndarray:
  import torch
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits, exactly.
    return t.view(torch.int16).numpy().view(jnp.bfloat16)
  return t.numpy()


def load_hf(path_or_model, *, dtype: str | None = None, param_dtype: str | None = None
            ) -> tuple[Llama, ModelConfig]:
  """A transformers Llama directory (config.json + model.safetensors or a sharded index) or an
  in-memory LlamaForCausalLM -> (Llama, ModelConfig). dtype / param_dtype default to the
  ModelConfig defaults (fp32), not the checkpoint's storage dtype."""
  overrides = dict(dtype=dtype, param_dtype=param_dtype)
  if not isinstance(path_or_model, (str, os.PathLike)):
    hf = path_or_model
    cfg = config_from_hf(hf.config.to_dict(), **overrides)
    tensors = dict(hf.state_dict())
    return _build(cfg, lambda n: _torch_to_numpy(tensors[n]), set(tensors),
                  _family(hf.config.to_dict())), cfg

  from safetensors import safe_open
  path = os.fspath(path_or_model)
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise HFError(f"{path} has no config.json: not a Hugging Face model directory")
  with open(config_path) as f:
    hf_config = json.load(f)
  cfg = config_from_hf(hf_config, **overrides)
  index_path = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
  elif os.path.exists(os.path.join(path, "model.safetensors")):
    with safe_open(os.path.join(path, "model.safetensors"), framework="np") as f:
      weight_map = {k: "model.safetensors" for k in f.keys()}
  else:
    raise HFError(f"{path} has neither model.safetensors nor model.safetensors.index.json "
                     "(.bin checkpoints are not read: re-save with safe_serialization=True)")
  handles = {}

  def get(name):
    file = weight_map[name]
    if file not in handles:
      handles[file] = safe_open(os.path.join(path, file), framework="np")
    return handles[file].get_tensor(name)

  return _build(cfg, get, set(weight_map), _family(hf_config)), cfg


def _multiplier_folded_into(hf_name: str, cfg: ModelConfig) -> float:
  """μP's and depth scaling's forward multipliers (llama_jax.model.parametrization) are
  linear in one weight each, so the export folds them in and a HF Llama computes the same
  logits: q_proj x the query multiplier, o_proj and down_proj x the residual-branch one,
  lm_head x the logit one (all 1 under SP)."""
  branch = param_lib.branch_multiplier(cfg)
  for suffix, m in (("q_proj.weight", param_lib.query_multiplier(cfg)),
                    ("o_proj.weight", branch), ("down_proj.weight", branch), ("w2.weight", branch),
                    ("experts.down_proj", branch),
                    ("lm_head.weight", param_lib.logit_multiplier(cfg))):
    if hf_name.endswith(suffix):
      return m
  return 1.0


def save_hf(model: Llama, model_config: ModelConfig, out_dir: str, *,
            max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes config.json and model.safetensors (or numbered shards of at most max_shard_bytes
  plus model.safetensors.index.json) that LlamaForCausalLM.from_pretrained loads. A model with
  LoRA adapters is exported merged: W + (alpha/rank) A B (llama_jax.model.lora.merged)."""
  from safetensors.numpy import save_file
  from llama_jax.model import lora
  model = lora.merged(model)
  state = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model))}
  hf_config = config_to_hf(model_config, *(np.asarray(v[...]) for p, v in state.items()
                                           if p.endswith(".router_bias")))
  params = {p: np.asarray(v[...]) for p, v in state.items() if isinstance(v, nnx.Param)}
  tensors, family = {}, _export_family(model_config)
  for name, path, n_in, index in _expected_names(model_config, family):
    w = params[path][index]
    w, m = _to_hf(w, n_in), _multiplier_folded_into(name, model_config)
    tensors[name] = w if m == 1.0 else (w.astype(np.float32) * m).astype(w.dtype)
  if family == "llama4":
    tensors = llama4.to_hf_tensors(tensors, model_config)

  os.makedirs(out_dir, exist_ok=True)
  for stale in glob.glob(os.path.join(out_dir, "model*.safetensors*")):
    os.remove(stale)  # A previous export with another shard count must not linger.
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  shards, size = [[]], 0
  for name, w in tensors.items():
    if shards[-1] and size + w.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += w.nbytes
  meta = {"format": "pt"}  # transformers refuses safetensors files without a format tag.
  if len(shards) == 1:
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata=meta)
    return
  weight_map = {}
  for k, names in enumerate(shards):
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({n: tensors[n] for n in names}, os.path.join(out_dir, file), metadata=meta)
    weight_map.update({n: file for n in names})
  index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())},
           "weight_map": weight_map}
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)


# ---------------------------------------------------------------------------- Meta layout

# Meta name -> (HF name, axis its model-parallel shards are split along; None = replicated).
# Column-parallel linears (wq, wk, wv, w1, w3, output) split their output rows, row-parallel
# ones (wo, w2) their input columns, in torch's [out, in] layout.
META_TENSORS: tuple[tuple[str, str, int | None], ...] = (
    ("tok_embeddings.weight", "model.embed_tokens.weight", 1),  # Llama 3 splits axis 0: detected
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight", None),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", 0),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", 0),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", 0),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", 1),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", None),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight", 0),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight", 0),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight", 1),
    ("norm.weight", "model.norm.weight", None),
    ("output.weight", "lm_head.weight", 0),
)


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
  """Meta's FeedForward hidden size: 2/3 of 4*dim, times the multiplier, rounded up to
  multiple_of (Llama-2 7B: int(2*16384/3) = 10922 -> 11008 with multiple_of 256)."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_qk_to_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Meta rotates interleaved pairs (2j, 2j+1) of each head; HF rotates (j, j + H/2). Reorder
  each head's output rows evens-then-odds (transformers' convert_llama_weights_to_hf permute)."""
  out, d = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, d).transpose(0, 2, 1, 3).reshape(out, d)


def load_meta(path: str, *, dtype: str | None = None, param_dtype: str | None = None,
              max_seq_len: int | None = None) -> tuple[Llama, ModelConfig]:
  """Meta's original layout (params.json + consolidated.NN.pth model-parallel shards) ->
  (Llama, ModelConfig). params.json has no context length: max_seq_len defaults to 4096
  (Llama 2, theta 1e4), 8192 (Llama 3, theta 5e5) or 131072 (use_scaled_rope, Llama 3.1)."""
  import torch
  with open(os.path.join(path, "params.json")) as f:
    p = json.load(f)
  files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
  if not files:
    raise HFError(f"{path} has no consolidated.*.pth shards")
  shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
  dim, n_heads = int(p["dim"]), int(p["n_heads"])
  n_kv_heads = int(p.get("n_kv_heads") or n_heads)
  keys = set(shards[0])

  def gather(meta_name: str, axis: int | None) -> np.ndarray:
    parts = [_torch_to_numpy(s[meta_name]) for s in shards]
    if axis is None or len(parts) == 1:
      return parts[0]
    if meta_name == "tok_embeddings.weight" and parts[0].shape[1] == dim:
      axis = 0  # Llama 3's VocabParallelEmbedding splits the vocabulary, not the dim.
    return np.concatenate(parts, axis=axis)

  theta = float(p.get("rope_theta", 10000.0))
  scaled = bool(p.get("use_scaled_rope", False))
  if max_seq_len is None:
    max_seq_len = 131072 if scaled else (8192 if theta >= 500000 else 4096)
  n_layers = int(p["n_layers"])
  w1 = shards[0].get("layers.0.feed_forward.w1.weight")
  ffn_dim = meta_ffn_dim(dim, int(p.get("multiple_of", 256)), p.get("ffn_dim_multiplier"))
  if w1 is not None and w1.shape[0] * len(shards) != ffn_dim:
    raise HFError(f"params.json gives ffn dim {ffn_dim} (multiple_of={p.get('multiple_of')}, "
                     f"ffn_dim_multiplier={p.get('ffn_dim_multiplier')}) but w1 has "
                     f"{w1.shape[0] * len(shards)} rows")
  vocab = int(p.get("vocab_size", -1))
  if vocab <= 0:  # Llama 2's params.json leaves it to the tokenizer (-1).
    emb = shards[0]["tok_embeddings.weight"]
    vocab = emb.shape[0] if emb.shape[1] != dim else emb.shape[0] * len(shards)
  cfg = ModelConfig(
      dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
      vocab_size=vocab, max_seq_len=max_seq_len, norm_eps=float(p.get("norm_eps", 1e-5)),
      rope_theta=theta, rope_scaling=RopeScaling() if scaled else None,
      tie_embeddings="output.weight" not in keys,
      **{k: v for k, v in dict(dtype=dtype, param_dtype=param_dtype).items() if v is not None})

  to_hf = {}  # HF name -> (Meta name, split axis)
  for meta_name, hf_name, axis in META_TENSORS:
    layers = range(n_layers) if "{i}" in meta_name else [None]
    for i in layers:
      m, h = (meta_name, hf_name) if i is None else (meta_name.format(i=i), hf_name.format(i=i))
      if not (cfg.tie_embeddings and m == "output.weight"):
        to_hf[h] = (m, axis)
  missing = [m for m, _ in to_hf.values() if m not in keys]
  if missing:
    raise HFError(f"Meta checkpoint is missing {len(missing)} tensor(s): {missing[:12]}")

  def get(hf_name: str) -> np.ndarray:
    meta_name, axis = to_hf[hf_name]
    w = gather(meta_name, axis)
    if meta_name.endswith("attention.wq.weight"):
      w = meta_qk_to_hf(w, n_heads)
    elif meta_name.endswith("attention.wk.weight"):
      w = meta_qk_to_hf(w, n_kv_heads)
    return w

  unknown = sorted(k for k in keys if k not in {m for m, _ in to_hf.values()}
                   and k != "rope.freqs")  # Llama 2 ships its RoPE table; we recompute it.
  if unknown:
    raise HFError(f"Meta checkpoint has tensor(s) llama_jax does not use: {unknown[:12]}")
  return _build(cfg, get, set(to_hf), "llama"), cfg
