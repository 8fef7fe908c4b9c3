"""Mixture-of-experts feed-forward layers: routing, balancing, and the experts' grouped matmul.

A router scores the E experts for each token in fp32 and picks its top k; the token goes through
those k SwiGLU experts and their outputs are combined (Shazeer et al. 2017; Switch, Fedus et al.
2021; Mixtral, Jiang et al. 2024). Two routers (`model.moe_router`):
  softmax  probabilities over all E experts, the top k kept and renormalised to sum to 1, the
           outputs weighted by them (Mixtral, Hugging Face's MixtralSparseMoeBlock);
  sigmoid  top k of the logits, the sigmoid of each chosen one scaling the token before its
           expert and the outputs summed (Llama 4).
Shared experts (`moe_shared_experts`, DeepSeek-MoE, Llama 4) are an ordinary MLP beside the
routed ones (llama.Block). `moe_capacity_factor` > 0 caps the tokens an expert takes from one
sequence at ceil(factor * T * k / E), earlier positions first, and drops the rest (their
experts' output is 0: the residual stream carries them); counted per sequence, so the choice
depends neither on the mesh nor on the other rows of the batch.

Balancing: the Switch load-balancing loss E * sum_e f_e P_e (f_e the fraction of the N * k
choices that went to e, P_e the mean router probability of e; 1 when perfectly balanced), the
router z-loss mean(logsumexp(logits)^2) (ST-MoE, Zoph et al. 2022), and DeepSeek-V3's
aux-loss-free bias: a per-expert bias added to the scores for choosing only, updated after each
step by rate * sign(mean load - load) (update_bias, from llama_jax.train). The bias is a
RouterBias variable, not an nnx.Param: it sits in the params tree (so it is checkpointed,
sharded with its layer and read by every load), but the train step keeps it out of the
gradient and the optimizer (trainable / with_trainable).

The experts run as one grouped matmul over the tokens sorted by expert (`model.moe_impl`, one
dispatch in `expert_ffn`): 'ragged' is jax.lax.ragged_dot (CPU, GPU), 'megablox' the Pallas
TPU kernel (interpret mode off TPU), 'dense' every expert on every token with a one-hot
combine, the reference the other two are tested against. Expert parallelism (the `expert` mesh
axis) is llama_jax.model.expert_parallel; this module is the per-shard maths.

Axis letters (llama.py's, plus): E experts (G of them on this shard), k top_k, N tokens of the
shard (B * T), M = N * k (token, choice) rows, F an expert's hidden size.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llama_jax.model import expert_parallel
from llama_jax.model import parametrization as param_lib
from llama_jax.model.config import MEGABLOX_TILE, ModelConfig

ROUTER_STD = 0.02
BIAS = "router_bias"  # the RouterBias variable's name in the MoE module (and the params tree)


class RouterBias(nnx.Variable):
  """The aux-loss-free balancing bias [E] of one MoE layer: state, not a parameter."""


def _fan_in(in_axis, out_axis, names, scale: float = 1.0, batch_axis=()):
  init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=in_axis,
                                           out_axis=out_axis, batch_axis=batch_axis)
  return nnx.with_partitioning(init, names)


class MoE(nnx.Module):
  """The routed experts of one layer: x [B, T, D] -> (y [B, T, D], stats of `finalize`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    e, d, f = cfg.moe_experts, cfg.dim, cfg.expert_ffn_dim
    pd = jnp.dtype(cfg.param_dtype)
    # The router's expert axis stays whole on every device: each one routes its own tokens.
    # N(0, 0.02) as Hugging Face initialises it: logits near 0, routing near uniform at first
    # (a fan-in init gives unit-variance logits and sends most tokens to a few experts).
    self.w_router = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(ROUTER_STD),
                                                    ("embed", None))(rngs.params(), (d, e), pd))
    expert = dict(batch_axis=(0,))  # fan-in per expert (D, or F for w_down), not E * D
    self.w_gate = nnx.Param(_fan_in(1, 2, ("experts", "embed", "mlp"), **expert)(
        rngs.params(), (e, d, f), pd))
    self.w_up = nnx.Param(_fan_in(1, 2, ("experts", "embed", "mlp"), **expert)(
        rngs.params(), (e, d, f), pd))
    self.w_down = nnx.Param(_fan_in(1, 2, ("experts", "mlp", "embed"),
                                    scale=1.0 / (2 * param_lib.residual_init_layers(cfg)),
                                    **expert)(rngs.params(), (e, f, d), pd))
    setattr(self, BIAS, RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,)))

  def __call__(self, x, *, decoding: bool = False):
    weights = {n: getattr(self, n)[...] for n in ("w_router", "w_gate", "w_up", "w_down")}
    weights["bias"] = getattr(self, BIAS)[...]
    # Decoding drops nothing: a capacity is a training-time bound, and a cached step sees one
    # token of each sequence, not the sequence the capacity is counted over.
    drop = self.cfg.moe_capacity_factor > 0 and not decoding
    return moe_layer(x, weights, self.cfg, drop=drop)


def moe_layer(x, weights: dict, cfg: ModelConfig, *, drop: bool):
  """x [B, T, D] through the routed experts: (y [B, T, D], stats), per device under the active
  mesh (llama_jax.model.expert_parallel) or on all of x without one."""
  plan = expert_parallel.plan_for(x.shape[0])

  def core(x, w, plan):
    b, t, d = x.shape
    experts, in_scale, combine, partial = route(x, w["w_router"], w["bias"], cfg, drop=drop)
    k = cfg.moe_top_k
    tokens = plan.gather((x.reshape(b * t, d), experts.reshape(-1, k),
                          in_scale.reshape(-1, k), combine.reshape(-1, k)))
    xs, experts, in_scale, combine = tokens
    local = experts - plan.shard_index() * w["w_gate"].shape[0]  # ids of this shard's experts
    y = expert_ffn(xs, local, in_scale, combine, w["w_gate"], w["w_up"], w["w_down"],
                   cfg.moe_impl, plan.platform)
    return plan.return_tokens(y).reshape(b, t, d), finalize(plan.total(partial), cfg)

  return expert_parallel.shard(core, x, weights, plan, pallas=cfg.moe_impl == "megablox")


# ---------------------------------------------------------------------------- routing


def route(x, w_router, bias, cfg: ModelConfig, *, drop: bool):
  """Routing of x [B, T, D], in fp32: (experts [B, T, k] int32, in_scale [B, T, k] (what a
  token is scaled by before its expert), combine [B, T, k] (what its output is weighted by, 0
  where dropped), partial stats (sums over these tokens, for `finalize`))."""
  k, e = cfg.moe_top_k, cfg.moe_experts
  logits = jnp.dot(x.astype(jnp.float32), w_router.astype(jnp.float32),  # [B, T, E]
                   precision=jax.lax.Precision.HIGHEST)  # fp32 on TPUs too (not bf16 passes)
  if cfg.moe_router == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)
    probs = scores
  else:
    scores = jax.nn.sigmoid(logits)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)  # P_e of the balancing loss
  # The bias moves which experts are chosen, never the weights they are given.
  _, experts = jax.lax.top_k(scores + jax.lax.stop_gradient(bias), k)
  chosen = jnp.take_along_axis(scores, experts, axis=-1)  # [B, T, k]
  if cfg.moe_router == "softmax":
    in_scale, combine = jnp.ones_like(chosen), chosen / jnp.sum(chosen, axis=-1, keepdims=True)
  else:
    in_scale, combine = chosen, jnp.ones_like(chosen)
  onehot = jax.nn.one_hot(experts, e, dtype=jnp.float32)  # [B, T, k, E]
  load = jnp.sum(onehot, axis=(0, 1, 2))
  dropped = jnp.zeros((), jnp.float32)
  if drop:
    kept = _within_capacity(onehot, cfg)
    dropped = jnp.sum(1.0 - kept)
    combine = combine * kept
  partial = {"load": load, "prob": jnp.sum(probs, axis=(0, 1)),
             "z": jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1))), "dropped": dropped,
             "tokens": jnp.asarray(logits.shape[0] * logits.shape[1], jnp.float32)}
  return experts.astype(jnp.int32), in_scale, combine, partial


def capacity(cfg: ModelConfig, seq_len: int) -> int:
  """Tokens an expert takes from one sequence: ceil(factor * T * k / E)."""
  return math.ceil(cfg.moe_capacity_factor * seq_len * cfg.moe_top_k / cfg.moe_experts)


def _within_capacity(onehot, cfg: ModelConfig):
  """[B, T, k] 1.0 where a choice is within its expert's capacity for the sequence: choices
  are counted in order of position, then rank (t, j)."""
  b, t, k, e = onehot.shape
  flat = onehot.reshape(b, t * k, e)
  rank = jnp.sum((jnp.cumsum(flat, axis=1) - 1.0) * flat, axis=-1)  # 0 for an expert's first
  return (rank < capacity(cfg, t)).astype(jnp.float32).reshape(b, t, k)


def finalize(partial: dict[str, jax.Array], cfg: ModelConfig) -> dict[str, jax.Array]:
  """The layer's stats from its partial sums over all the batch's tokens: `aux` (the Switch
  loss), `z` (router z-loss), `load` [E] (choices per expert), `dropped` (fraction of the
  choices over capacity)."""
  n, k, e = partial["tokens"], cfg.moe_top_k, cfg.moe_experts
  f = jax.lax.stop_gradient(partial["load"]) / (n * k)
  return {"aux": e * jnp.sum(f * partial["prob"] / n), "z": partial["z"] / n,
          "load": partial["load"], "dropped": partial["dropped"] / (n * k)}


# ---------------------------------------------------------------------------- the experts


def expert_ffn(x, experts, in_scale, combine, w_gate, w_up, w_down, impl: str,
               platform: str = "cpu"):
  """sum_j combine[n, j] * FFN_{experts[n, j]}(in_scale[n, j] * x[n]) for x [N, D] and the G
  experts of w_* ([G, D, F], [G, F, D]); an expert id outside [0, G) is another shard's and
  adds nothing. `impl` is one of llama_jax.model.config.MOE_IMPLS: this is the one place that
  chooses between them."""
  dt = x.dtype
  w_gate, w_up, w_down = (w.astype(dt) for w in (w_gate, w_up, w_down))
  if impl == "dense":
    return _dense_experts(x, experts, in_scale, combine, w_gate, w_up, w_down)
  n, k = experts.shape
  g = w_gate.shape[0]
  flat = experts.reshape(-1)
  here = (flat >= 0) & (flat < g)
  key = jnp.where(here, flat, g)  # rows of other shards sort after every group
  order = jnp.argsort(key, stable=True)  # [M]: (token, choice) rows grouped by expert
  sizes = jnp.bincount(key, length=g + 1)[:g].astype(jnp.int32)
  # A token has at most min(k, G) choices among this shard's experts, so the first
  # N * min(k, G) sorted rows hold them all: under expert parallelism (G = E / n_ep) the
  # matmuls' rows shrink from the gathered N * k when G < k. Dropless at any routing.
  m = n * min(k, g)
  gather = order[:m]
  here = here[gather]
  rows = x[gather // k] * in_scale.reshape(-1)[gather][:, None].astype(dt)
  rows = jnp.where(here[:, None], rows, 0)

  if impl == "ragged":
    def gmm(lhs, rhs):
      return jax.lax.ragged_dot(lhs, rhs, sizes)
  elif impl == "megablox":
    gmm = _megablox(rows.shape[0], sizes, interpret=platform != "tpu")
  else:  # not a user error: the config is validated before a model is built
    raise AssertionError(f"unvalidated model.moe_impl={impl!r}")
  gate = checkpoint_name(gmm(rows, w_gate), "moe_gate")
  up = checkpoint_name(gmm(rows, w_up), "moe_up")
  out = checkpoint_name(gmm(jax.nn.silu(gate) * up, w_down), "moe_down")  # [M, D]
  # Rows outside every group (other shards', megablox's padding) are not written by every
  # kernel: zero them before they are weighted.
  weight = jnp.where(here, combine.reshape(-1)[gather], 0.0)
  out = jnp.where(here[:, None], out.astype(jnp.float32), 0.0) * weight[:, None]
  out = jnp.pad(out, ((0, n * k - m), (0, 0)))  # the rows past m: other shards', zero here
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  return jnp.sum(out[inverse].reshape(n, k, -1), axis=1).astype(dt)


def _dense_experts(x, experts, in_scale, combine, w_gate, w_up, w_down):
  """The reference: every expert on every token (G x the FLOPs), combined by one-hot weights."""
  g = w_gate.shape[0]
  onehot = jax.nn.one_hot(experts, g, dtype=jnp.float32)  # [N, k, G]; zero off this shard
  weight = jnp.einsum("nkg,nk->ng", onehot, combine)
  # The input each expert sees: x scaled by its choice's in_scale (1 where not chosen).
  scale = jnp.einsum("nkg,nk->ng", onehot, in_scale) + 1.0 - jnp.sum(onehot, axis=1)
  xin = x[None] * scale.T[:, :, None].astype(x.dtype)  # [G, N, D]
  gate = checkpoint_name(jnp.einsum("gnd,gdf->gnf", xin, w_gate), "moe_gate")
  up = checkpoint_name(jnp.einsum("gnd,gdf->gnf", xin, w_up), "moe_up")
  out = checkpoint_name(jnp.einsum("gnf,gfd->gnd", jax.nn.silu(gate) * up, w_down), "moe_down")
  return jnp.einsum("gnd,ng->nd", out.astype(jnp.float32), weight).astype(x.dtype)


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
  """(tm, tk, tn) tiles of the Pallas grouped matmul for [m, k] x [G, k, n]: MEGABLOX_TILE, or
  the whole axis when it is smaller (m is padded to a multiple of tm by the caller)."""
  tm = MEGABLOX_TILE if m >= MEGABLOX_TILE else -(-m // 16) * 16
  return tm, min(k, MEGABLOX_TILE), min(n, MEGABLOX_TILE)


def _megablox(m: int, sizes, *, interpret: bool):
  """The Pallas TPU grouped matmul (megablox), rows padded to its m tile."""
  from jax.experimental.pallas.ops.tpu.megablox import ops

  def gmm(lhs, rhs):
    tiling = megablox_tiling(m, lhs.shape[1], rhs.shape[2])
    pad = -m % tiling[0]
    out = ops.gmm(jnp.pad(lhs, ((0, pad), (0, 0))), rhs, sizes, lhs.dtype, tiling, None, None,
                  False, interpret)
    return out[:m]
  return gmm


# ---------------------------------------------------------------------------- the bias


def _is_bias(path) -> bool:
  return any(str(getattr(k, "key", k)) == BIAS for k in path)


def has_bias(params) -> bool:
  return any(_is_bias(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def trainable(params: dict) -> dict:
  """A pure-dict params tree without the router biases (what the optimizer sees); the tree
  itself when it has none (a dense model)."""
  if not has_bias(params):
    return params
  return {k: trainable(v) for k, v in params.items() if k != BIAS}


def with_trainable(params: dict, trained: dict) -> dict:
  """params with everything but the router biases taken from `trained` (which is all of it
  for a dense model)."""
  if not has_bias(params):
    return trained
  return {k: (v if k == BIAS else with_trainable(v, trained[k])) for k, v in params.items()}


def over_microbatches(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Stats of the whole batch from its microbatches' (stacked on a leading axis): the choices
  per expert add up, the losses and the dropped fractions average."""
  return {k: v.sum(0) if k == "load" else v.mean(0) for k, v in stats.items()}


def update_bias(params: dict, stats: dict[str, jax.Array], cfg) -> dict:
  """DeepSeek-V3's update after a step: bias += rate * sign(mean load - load) for each MoE
  layer (stats['load'] [L_moe, E], in the order of the stacked MoE blocks); params unchanged
  when model.moe_bias_rate is 0 (cfg: config.model or a ModelConfig)."""
  rate = cfg.moe_bias_rate if cfg.moe_experts else 0.0
  if not rate:
    return params
  load = stats["load"]
  step = rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)

  def update(path, x):
    return x + step.astype(x.dtype) if _is_bias(path) else x
  return jax.tree_util.tree_map_with_path(update, params)


def after_step(params: dict, stats: dict[str, jax.Array], cfg) -> tuple[dict, dict]:
  """(params with the router biases updated (update_bias), the step's MoE log scalars
  (stat_metrics)) from the step's stats; (params, {}) for a dense model."""
  return update_bias(params, stats, cfg), stat_metrics(stats, cfg)


def stat_metrics(stats: dict[str, Any], cfg) -> dict[str, jax.Array]:
  """The scalars a log line carries of the per-layer stats [L_moe, ...]: the balancing losses
  (mean over MoE layers), the load imbalance max/mean choices per expert (mean and max over
  layers) and, with a capacity, the dropped fraction; none for a dense model (no stats)."""
  if not stats:
    return {}
  load = jnp.asarray(stats["load"], jnp.float32)
  imbalance = jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9)
  out = {"moe_aux_loss": jnp.mean(stats["aux"]), "moe_z_loss": jnp.mean(stats["z"]),
         "moe_load_imbalance": jnp.mean(imbalance), "moe_load_imbalance_max": jnp.max(imbalance)}
  if cfg.moe_capacity_factor > 0:
    out["moe_dropped_frac"] = jnp.mean(stats["dropped"])
  return out
