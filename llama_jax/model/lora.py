"""Low-rank adapters (LoRA, Hu et al. 2021) on the model's projections: config.lora.

A targeted projection y = x W (W [*in, *out], llama.py's layout) becomes

    y = x W + (alpha / rank) (x A) B,    A [*in, r] ~ U(+-1/sqrt(fan_in)), B [r, *out] = 0

so at initialisation the model is the base model exactly (B = 0), and only A and B train.
A and B are `nnx.LoRAParam`s (a subclass of nnx.Param) set on the stacked block modules next to
W, with W's leading `layers` axis and W's logical names on the axes they share with it (the
rank axis is replicated): A of wq [L, D, r] splits like wq's `embed` axis, B of wq [L, r, N, H]
like its `heads` axis, so the adapters shard with the mesh. llama.project adds the low-rank
term wherever an adapter is present. `merged` folds W + (alpha/rank) A B for export.

Why not a library: qwix 0.1.8's LoraProvider (which tunix's LoRA recipes call) intercepts
dot_general/einsum inside the model's __call__ and creates the adapters lazily on the first
call, and it sets a shared nnx.Rngs and other attributes on every module. This model builds its
blocks stacked (nnx.vmap) and runs them as nnx.split state sliced per layer (jax.lax.scan or a
loop over `state[i]`): apply_lora_to_model on it fails with an IndexError (scan: "tuple index
out of range"; loop: "Too many indices: array is 0-dimensional") because the un-stacked scalar
RNG counters it attached are sliced like layer params, and adapters made inside the per-layer
nnx.merge would live only in that trace anyway. The adapters below are plain nnx variables set
at construction, so the stacked layout, the logical-axis shardings and nnx.split/merge stay as
they are.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.model import llama
from llama_jax.model.config import LORA_TARGETS as TARGETS, parse_lora_targets


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  alpha: float
  targets: tuple[str, ...]  # keys of TARGETS

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def spec_from_config(lora_cfg, mlp: str = "swiglu") -> LoraSpec | None:
  """The LoraSpec of config.lora (checked by config.validate), or None when rank = 0 (off)."""
  if not lora_cfg.rank:
    return None
  return LoraSpec(int(lora_cfg.rank), float(lora_cfg.alpha),
                  parse_lora_targets(lora_cfg.targets, mlp))


# ---------------------------------------------------------------------------- adapters

def add_adapters(model: llama.Llama, spec: LoraSpec, rngs: nnx.Rngs) -> llama.Llama:
  """Sets A and B (nnx.LoRAParam) beside each targeted W of the stacked blocks, in place."""
  for target in spec.targets:
    sub, name, n_in = TARGETS[target]
    module = getattr(model.layers, sub)
    w = getattr(module, name)
    shape, names = w.shape, w.get_metadata()["out_sharding"]  # [L, *in, *out], with 'layers'
    fan_in = math.prod(shape[1:1 + n_in])
    bound = 1.0 / math.sqrt(fan_in)  # PEFT's kaiming_uniform(a=sqrt(5)) on A
    a_shape, b_shape = (shape[0], *shape[1:1 + n_in], spec.rank), (shape[0], spec.rank,
                                                                   *shape[1 + n_in:])
    a_name, b_name, scale_name = llama.adapter_names(name)
    setattr(module, a_name, nnx.LoRAParam(
        jax.random.uniform(rngs.params(), a_shape, w.dtype, -bound, bound),
        out_sharding=(names[0], *names[1:1 + n_in], None)))
    setattr(module, b_name, nnx.LoRAParam(jnp.zeros(b_shape, w.dtype),
                                          out_sharding=(names[0], None, *names[1 + n_in:])))
    setattr(module, scale_name, spec.scale)
  return model


def build(cfg, spec: LoraSpec | None, rngs: nnx.Rngs) -> llama.Llama:
  """Llama(cfg) with adapters when spec is given. The base params are drawn first, so they are
  the same as Llama(cfg, rngs) of the same seed's."""
  model = llama.Llama(cfg, rngs=rngs)
  return model if spec is None else add_adapters(model, spec, rngs)


def merged(model: llama.Llama) -> llama.Llama:
  """A plain Llama (no adapters) whose W is W + (alpha/rank) A B, computed in fp32 and cast to
  W's dtype; the model itself when it has no adapters."""
  flat = {p: v for p, v in nnx.to_flat_state(nnx.state(model))}
  adapters = [p for p, v in flat.items() if isinstance(v, nnx.LoRAParam)]
  if not adapters:
    return model
  params = {p: v[...] for p, v in flat.items() if p not in adapters}
  for sub, name, n_in in TARGETS.values():
    module = getattr(model.layers, sub)
    a_name, b_name, scale_name = llama.adapter_names(name)
    if getattr(module, a_name, None) is None:
      continue
    w = params[("layers", sub, name)]
    a = jnp.asarray(getattr(module, a_name)[...], jnp.float32)
    b = jnp.asarray(getattr(module, b_name)[...], jnp.float32)
    n_layers, rank = a.shape[0], a.shape[-1]
    ab = jnp.matmul(a.reshape(n_layers, -1, rank), b.reshape(n_layers, rank, -1))  # [L, in, out]
    w32 = w.astype(jnp.float32) + getattr(module, scale_name) * ab.reshape(w.shape)
    params[("layers", sub, name)] = w32.astype(w.dtype)
  graphdef, state = nnx.split(llama.abstract_model(model.cfg))
  nested = nnx.to_pure_dict(state)
  for path, value in params.items():
    node = nested
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value
  return nnx.merge(graphdef, nested)


# ---------------------------------------------------------------------------- param trees

def _is_adapter_key(key) -> bool:
  return str(key).endswith(("_lora_a", "_lora_b"))


def adapters_of(params: dict) -> dict:
  """The adapter leaves of a pure-dict params tree (nnx.to_pure_dict), same nesting."""
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      sub = adapters_of(v)
      if sub:
        out[k] = sub
    elif _is_adapter_key(k):
      out[k] = v
  return out


def base_of(params: dict) -> dict:
  """The tree without its adapter leaves (the params of the model LoRA sits on)."""
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      out[k] = base_of(v)
    elif not _is_adapter_key(k):
      out[k] = v
  return out


def with_adapters(params: dict, adapters: dict) -> dict:
  """params with its adapter leaves replaced by `adapters` (a tree from adapters_of)."""
  out = dict(params)
  for k, v in adapters.items():
    out[k] = with_adapters(params[k], v) if isinstance(v, dict) else v
  return out


def count(params: dict) -> int:
  return int(sum(np.prod(np.shape(v)) for v in jax.tree.leaves(adapters_of(params))))
