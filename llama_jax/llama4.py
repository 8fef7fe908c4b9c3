"""Llama 4 checkpoints (Hugging Face Llama4ForCausalLM and Llama4TextConfig, or the text part of
a Llama4ForConditionalGeneration directory) for llama_jax.hf: the config fields and the tensor
table. Errors are ValueErrors, which llama_jax.hf reports as its HFError.

What differs from a Llama (transformers 5.24's modeling_llama4.py):
  layers      a layer is MoE when it is in `moe_layers` (by default every
              interleave_moe_layer_step-th, the last of each group: our model.moe_every), else a
              dense SwiGLU of intermediate_size_mlp (our ffn_dim); the experts and the one shared
              expert are of intermediate_size (our moe_ffn_dim); the router is a sigmoid over the
              top k logits that scales the token before its expert (our moe_router='sigmoid').
  attention   a layer has no RoPE where no_rope_layers[i] is 0 (by default every
              no_rope_layer_interval-th: our model.nope_every); it scales its queries by the
              attention temperature (attn_temperature_tuning, floor_scale, attn_scale) and
              attends causally over everything; the others attend within chunks of
              attention_chunk_size (our attention_chunk) and, with use_qk_norm, L2-normalise q
              and k after RoPE (our qk_norm='l2').
  RoPE        rotates interleaved pairs (2j, 2j+1) as Meta's code does; ours rotates (j, j+H/2)
              as HF's Llama, so q_proj and k_proj rows are permuted per head on the way in and
              back on the way out (llama_jax.hf.meta_qk_to_hf and its inverse).
  tensors     per layer i (the MoE ones stacked in our `moe_layers`, the dense ones in `layers`,
              or all in `layers` when every layer is MoE):
    model.layers.{i}.feed_forward.{gate,up,down}_proj.weight            a dense layer's MLP
    model.layers.{i}.feed_forward.router.weight                 [E, D]  (ours [D, E])
    model.layers.{i}.feed_forward.experts.gate_up_proj          [E, D, 2F]  gate, then up: ours
                                                                          [E, D, F] each
    model.layers.{i}.feed_forward.experts.down_proj             [E, F, D]  as ours
    model.layers.{i}.feed_forward.shared_expert.{gate,up,down}_proj.weight
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

from llama_jax.mixtral import require_exportable

ARCH = "Llama4ForCausalLM"
# A Llama4ForConditionalGeneration checkpoint (model_type 'llama4') holds the text model under
# this prefix, beside its vision tower and projector, which a text model does not read.
TEXT_PREFIX = "language_model."
_VISION = re.compile(r"^(vision_model|multi_modal_projector)\.")
_FUSED = ".feed_forward.experts.gate_up_proj"
_QK = re.compile(r"\.self_attn\.([qk])_proj\.weight$")

_ATTENTION = (("input_layernorm.weight", "attn_norm.scale", 0),
              ("self_attn.q_proj.weight", "attn.wq", 1), ("self_attn.k_proj.weight", "attn.wk", 1),
              ("self_attn.v_proj.weight", "attn.wv", 1), ("self_attn.o_proj.weight", "attn.wo", 2),
              ("post_attention_layernorm.weight", "mlp_norm.scale", 0))
_MLP = tuple((f"feed_forward.{p}_proj.weight", f"mlp.w_{w}", 1)
             for p, w in (("gate", "gate"), ("up", "up"), ("down", "down")))
# The fused gate_up_proj is read as two halves under these names (`view`), written back fused.
_MOE = (("feed_forward.router.weight", "mlp.w_router", 1),
        ("feed_forward.experts.gate_proj", "mlp.w_gate", 0),
        ("feed_forward.experts.up_proj", "mlp.w_up", 0),
        ("feed_forward.experts.down_proj", "mlp.w_down", 0),
        *((f"feed_forward.shared_expert.{p}_proj.weight", f"shared_mlp.w_{p}", 1)
          for p in ("gate", "up", "down")))


def is_llama4(c: Mapping[str, Any]) -> bool:
  return c.get("model_type") in ("llama4", "llama4_text")


def text_config(c: Mapping[str, Any]) -> Mapping[str, Any]:
  """The text model's config: a Llama4Config's text_config, or a Llama4TextConfig itself."""
  return c.get("text_config") or {} if c.get("model_type") == "llama4" else c


def _interval(flags: list[int], name: str, shown, what: str, default: int) -> int:
  """N such that flags[i] is set exactly where (i + 1) % N == 0 (N = len + 1 > any layer: none
  set); a pattern of another shape is a ValueError (llama_jax places them every N-th)."""
  n_layers = len(flags)
  for n in range(1, n_layers + 2):
    if [int((i + 1) % n == 0) for i in range(n_layers)] == [int(bool(f)) for f in flags]:
      return n if n <= n_layers else 0
  raise ValueError(f"config {name}={shown} is not every N-th layer ({what}, as llama_jax "
                   f"places them; HF's default is every {default}-th)")


def config_kwargs(c: Mapping[str, Any]) -> dict[str, Any]:
  """The ModelConfig fields of a Llama4TextConfig dict beyond a Llama's (ffn_dim is the dense
  layers' intermediate_size_mlp)."""
  n_layers = int(c["num_hidden_layers"])
  step = int(c.get("interleave_moe_layer_step", 1))
  moe_layers = c.get("moe_layers")
  moe_layers = list(range(step - 1, n_layers, step)) if moe_layers is None else moe_layers
  moe_every = _interval([int(i in moe_layers) for i in range(n_layers)], "moe_layers",
                        list(moe_layers), "MoE layers", 1)
  interval = int(c.get("no_rope_layer_interval", 4))
  no_rope = c.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
  nope_every = _interval([1 - int(f) for f in no_rope[:n_layers]], "no_rope_layers",
                         list(no_rope), "0 for a NoPE layer", 4)
  kw = dict(ffn_dim=int(c.get("intermediate_size_mlp", c["intermediate_size"])),
            nope_every=nope_every, attention_chunk=int(c.get("attention_chunk_size") or 0),
            qk_norm="l2" if c.get("use_qk_norm", True) else "none",
            attn_temperature_tuning=bool(c.get("attn_temperature_tuning", True)) and
            bool(nope_every), floor_scale=int(c.get("floor_scale", 8192)),
            attn_scale=float(c.get("attn_scale", 0.1)))
  if moe_every:
    kw.update(moe_experts=int(c["num_local_experts"]), moe_top_k=int(c["num_experts_per_tok"]),
              moe_ffn_dim=int(c["intermediate_size"]), moe_shared_experts=1,
              moe_every=moe_every, moe_router="sigmoid",
              moe_aux_loss=float(c.get("router_aux_loss_coef", 0.001)))
  return kw


def is_exported_as_llama4(cfg) -> bool:
  """Whether save_hf writes cfg as a Llama 4 (a Llama 4 feature is on) rather than a Llama or
  Mixtral."""
  return bool(cfg.nope_every or cfg.attention_chunk or cfg.qk_norm == "l2"
              or cfg.attn_temperature_tuning or (cfg.moe_experts and (
                  cfg.moe_router == "sigmoid" or cfg.moe_shared_experts or cfg.moe_every > 1)))


def hf_fields(cfg, bias=None) -> dict[str, Any]:
  """The config.json entries of a Llama4TextConfig beyond the Llama ones llama_jax.hf writes;
  a model Llama 4 cannot express is a ValueError naming the field."""
  if cfg.moe_experts:
    require_exportable(cfg, bias, "Llama 4", (("moe_router", "sigmoid"),
                                              ("moe_shared_experts", 1)))
  if cfg.qk_norm == "rms":
    raise ValueError("model.qk_norm='rms' (learned q/k scales) cannot be exported to a Llama 4 "
                     "checkpoint, whose qk-norm has no weights: use model.qk_norm='l2'")
  n = cfg.n_layers
  moe_layers = [i for i in range(n) if cfg.is_moe_layer(i)]
  return {"architectures": [ARCH], "model_type": "llama4_text",
          "intermediate_size": cfg.expert_ffn_dim, "intermediate_size_mlp": cfg.ffn_dim,
          "num_local_experts": cfg.moe_experts or 1, "num_experts_per_tok": cfg.moe_top_k,
          "interleave_moe_layer_step": cfg.moe_every, "moe_layers": moe_layers,
          "no_rope_layers": [int(not cfg.is_nope_layer(i)) for i in range(n)],
          "no_rope_layer_interval": cfg.nope_every or n + 1,
          "attention_chunk_size": cfg.attention_chunk or None,
          "use_qk_norm": cfg.qk_norm == "l2",
          "attn_temperature_tuning": cfg.attn_temperature_tuning,
          "floor_scale": cfg.floor_scale, "attn_scale": cfg.attn_scale,
          "router_aux_loss_coef": cfg.moe_aux_loss, "router_jitter_noise": 0.0,
          "output_router_logits": False}


def tensor_table(cfg) -> list[tuple[str, str, int, tuple[int, ...]]]:
  """(HF name, our path, input axes, index into our stacked parameter) of every tensor, as
  llama_jax.hf's `_expected_names`, with the fused experts as their two halves."""
  all_moe = cfg.n_moe_layers == cfg.n_layers
  out = [("model.embed_tokens.weight", "embed", 0, ())]
  taken = {False: 0, True: 0}
  for i in range(cfg.n_layers):
    moe = cfg.is_moe_layer(i)
    stack, j = ("moe_layers" if moe and not all_moe else "layers"), taken[moe]
    taken[moe] += 1
    for hf_name, ours, n_in in _ATTENTION + (_MOE if moe else _MLP):
      out.append((f"model.layers.{i}.{hf_name}", f"{stack}.{ours}", n_in, (j,)))
  out.append(("model.norm.weight", "final_norm.scale", 0, ()))
  if not cfg.tie_embeddings:
    out.append(("lm_head.weight", "lm_head", 1, ()))
  return out


def _heads(name: str, cfg) -> int:
  return cfg.n_heads if _QK.search(name).group(1) == "q" else cfg.n_kv_heads


def view(get: Callable[[str], np.ndarray], names: set[str], cfg, meta_qk_to_hf
         ) -> tuple[Callable[[str], np.ndarray], set[str]]:
  """(get, names) of a Llama 4 checkpoint as tensor_table names them: the text model's names
  without TEXT_PREFIX (the vision tower's left out), gate_up_proj as its two halves, q_proj and
  k_proj rows in HF Llama's half-split RoPE layout."""
  prefixed = {n for n in names if n.startswith(TEXT_PREFIX)}
  rename = ({n[len(TEXT_PREFIX):]: n for n in prefixed} if prefixed else
            {n: n for n in names})
  rename.update({n: n for n in names - prefixed if prefixed and not _VISION.search(n)})
  halves = {}
  for name in [n for n in rename if n.endswith(_FUSED)]:
    base = name[:-len("gate_up_proj")]
    source = rename.pop(name)
    halves[base + "gate_proj"], halves[base + "up_proj"] = (source, 0), (source, 1)

  def read(name):
    if name in halves:
      fused, which = halves[name]
      w = get(fused)
      f = w.shape[-1] // 2
      return w[..., which * f:(which + 1) * f]
    w = get(rename[name])
    return meta_qk_to_hf(w, _heads(name, cfg)) if _QK.search(name) else w

  return read, set(rename) | set(halves)


def to_hf_tensors(tensors: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
  """Our export's tensors (tensor_table's names, HF Llama's RoPE layout) as a Llama 4
  checkpoint holds them: gate and up fused, q_proj and k_proj rows interleaved per head."""
  out = {}
  for name, w in tensors.items():
    if name.endswith("experts.up_proj"):
      continue
    if name.endswith("experts.gate_proj"):
      base = name[:-len("gate_proj")]
      out[base + "gate_up_proj"] = np.concatenate([w, tensors[base + "up_proj"]], axis=-1)
    elif _QK.search(name):  # inverse of meta_qk_to_hf: evens-then-odds back to pairs
      heads, (rows, d) = _heads(name, cfg), w.shape
      out[name] = np.ascontiguousarray(
          w.reshape(heads, 2, rows // heads // 2, d).transpose(0, 2, 1, 3).reshape(rows, d))
    else:
      out[name] = w
  return out
