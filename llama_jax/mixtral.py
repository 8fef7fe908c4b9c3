"""Mixtral checkpoints (Hugging Face MixtralForCausalLM) for llama_jax.hf: the MoE config fields
and tensor names. Mixtral is a Llama whose every MLP is an MoE layer (softmax router, top 2 of
8 experts in the published models); llama_jax.hf converts the rest as for a Llama.

Its MoE tensors come in two layouts:
  per expert: what the Hub's Mixtral checkpoints hold, what transformers 4.x writes, and what
  transformers 5.24's save_pretrained still writes by default (save_original_format=True):
    model.layers.{i}.block_sparse_moe.gate.weight             [E, D]
    model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight   [F, D]  gate
    model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight   [F, D]  up
    model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight   [D, F]  down
  fused: transformers 5's modules and state_dict (and save_pretrained(save_original_format=
  False)), its loader merging the per-expert tensors into these:
    model.layers.{i}.mlp.gate.weight                          [E, D]
    model.layers.{i}.mlp.experts.gate_up_proj                 [E, 2F, D]  gate rows, then up
    model.layers.{i}.mlp.experts.down_proj                    [E, D, F]
load_hf reads both (the fused one through `per_expert_view`); save_hf writes the per-expert one,
which transformers 4.x and 5.x both load. Errors are ValueErrors, which llama_jax.hf reports as
its HFError.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping

import numpy as np

# (HF name, our parameter path, leading input axes in our layout), as llama_jax.hf.HF_TENSORS;
# `{j}` marks a per-expert tensor, stacked along our `experts` axis after `layers`.
MOE_TENSORS: tuple[tuple[str, str, int], ...] = (
    ("model.layers.{i}.block_sparse_moe.gate.weight", "layers.mlp.w_router", 1),  # [E,D]<->[D,E]
    ("model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight", "layers.mlp.w_gate", 1),
    ("model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight", "layers.mlp.w_up", 1),
    ("model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight", "layers.mlp.w_down", 1),
)
# The dense MLP's tensors, which a Mixtral layer has instead of (llama_jax.hf.HF_TENSORS).
DENSE_MLP = re.compile(r"\.mlp\.(gate|up|down)_proj\.weight$")


def config_kwargs(c: Mapping[str, Any]) -> dict[str, Any]:
  """The ModelConfig fields of a Mixtral config.json beyond a Llama's."""
  if c.get("sliding_window") is not None:
    raise ValueError(f"config sliding_window={c['sliding_window']} is not supported: llama_jax "
                     "attends over the whole context (Mixtral-8x7B's configs have null)")
  return dict(moe_experts=int(c["num_local_experts"]), moe_top_k=int(c["num_experts_per_tok"]),
              moe_aux_loss=float(c.get("router_aux_loss_coef", 0.001)))


def require_exportable(cfg, bias, family: str, wants) -> None:
  """A ValueError naming the first field (name, wanted value) of `wants` that `cfg` does not
  have, or a router bias that moved from 0: what `family`'s checkpoints cannot express."""
  for name, want in wants:
    if getattr(cfg, name) != want:
      raise ValueError(f"model.{name}={getattr(cfg, name)!r} cannot be exported to a {family} "
                       f"checkpoint, which needs model.{name}={want!r}")
  if bias is not None and np.any(np.asarray(bias) != 0):
    raise ValueError(f"the model's router bias (model.moe_bias_rate > 0) changes which experts "
                     f"it picks and {family} has none: it cannot be exported to a {family} "
                     "checkpoint")


def hf_fields(cfg, bias=None) -> dict[str, Any]:
  """The config.json entries that make a Llama's a Mixtral's, for an MoE ModelConfig; a model
  Mixtral cannot express (shared experts, MoE every N layers, a sigmoid router, a router bias
  that moved from 0) is a ValueError naming the field."""
  require_exportable(cfg, bias, "Mixtral", (("moe_shared_experts", 0), ("moe_every", 1),
                                             ("moe_router", "softmax")))
  return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
          "num_local_experts": cfg.moe_experts, "num_experts_per_tok": cfg.moe_top_k,
          "intermediate_size": cfg.expert_ffn_dim, "router_aux_loss_coef": cfg.moe_aux_loss,
          "router_jitter_noise": 0.0, "output_router_logits": False, "sliding_window": None}


def per_expert_view(get: Callable[[str], np.ndarray], names: set[str]
                    ) -> tuple[Callable[[str], np.ndarray], set[str]]:
  """(get, names) with the fused layout's tensors presented as the per-expert ones (module
  doc); a checkpoint already per expert is returned as it is."""
  fused = {n for n in names if re.search(r"\.mlp\.(gate\.weight|experts\.(gate_up|down)_proj)$",
                                         n)}
  if not fused:
    return get, names
  read = functools.lru_cache(maxsize=2)(get)  # each fused tensor serves E * 2 names
  view: dict[str, Callable[[], np.ndarray]] = {}
  for name in fused:
    prefix = name[:name.index(".mlp.")] + ".block_sparse_moe"
    if name.endswith("gate.weight"):
      view[prefix + ".gate.weight"] = functools.partial(read, name)
      continue
    for j in range(np.shape(read(name))[0]):
      expert = f"{prefix}.experts.{j}"
      if name.endswith("gate_up_proj"):
        view[f"{expert}.w1.weight"] = functools.partial(_half, read, name, j, 0)
        view[f"{expert}.w3.weight"] = functools.partial(_half, read, name, j, 1)
      else:
        view[f"{expert}.w2.weight"] = functools.partial(lambda n, j: read(n)[j], name, j)
  return (lambda n: view[n]() if n in view else get(n)), (names - fused) | set(view)


def _half(read, name: str, j: int, which: int) -> np.ndarray:
  """Expert j's gate (which 0) or up (1) rows of a fused gate_up_proj [E, 2F, D]."""
  w = read(name)[j]
  f = w.shape[0] // 2
  return w[which * f:(which + 1) * f]
