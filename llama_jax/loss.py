"""Next-token cross-entropy in fp32, with PaLM's optional z-loss and SFT's loss mask (per-token
weights), and the loss of one batch that the train step, the eval step and
llama_jax.evaluate all use."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.model import context_parallel


def cross_entropy(logits: jax.Array, targets: jax.Array, z_loss: float = 0.0,
                  weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(loss to minimise, mean cross-entropy): logits [B, T, V], targets [B, T].

  z_loss adds z_loss * log(Z)^2 per token (PaLM, Chowdhery et al. 2022), keeping the softmax
  normaliser near 1 so bf16 logits do not drift. `weights` [B, T] (default all ones) gives a
  weighted token mean.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit
  if weights is None:
    weights = jnp.ones_like(nll)
  denom = jnp.maximum(weights.sum(), 1.0)
  ce = (nll * weights).sum() / denom
  total = ce + z_loss * (jnp.square(log_z) * weights).sum() / denom if z_loss else ce
  return total, ce


def batch_loss(model, batch: dict[str, jax.Array],
               z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(loss to minimise, mean cross-entropy) of `model` on one batch: {'inputs', 'targets'}
  [B, T] int32, with 'positions' and 'segment_ids' [B, T] when documents are packed (each
  document then attends only to itself, its positions restarting at 0), and 'weights' [B, T]
  float32 for SFT (1 on the targets the loss counts, 0 on prompts: the mean is over the
  counted tokens). An MoE model's loss adds its balancing losses (batch_loss_and_stats)."""
  loss, (ce, _) = batch_loss_and_stats(model, batch, z_loss)
  return loss, ce


def batch_loss_and_stats(model, batch: dict[str, jax.Array], z_loss: float = 0.0,
                         dropout_rng=None):
  """(loss, (mean cross-entropy, MoE stats)): batch_loss with the MoE layers' routing
  statistics (llama_jax.model.moe.finalize, stacked over the MoE layers; {} for a dense
  model). The loss adds moe_aux_loss x the Switch loss and moe_z_loss x the router z-loss, each
  the mean over the MoE layers. `dropout_rng` (the train step's) turns model.dropout on.

  With the sequence split over the context axis every [B, T] entry of the batch is put in
  llama_jax.model.context_parallel's load-balanced order first (the loss is a token sum, the
  same in any order), so the model runs in it and nothing is reordered back."""
  cfg = model.cfg
  n = context_parallel.degree()
  if n > 1:
    batch = {k: context_parallel.load_balance(v, n) for k, v in batch.items()}
  kwargs = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                load_balanced=True, dropout_rng=dropout_rng)
  if not cfg.moe_experts:
    logits, stats = model(batch["inputs"], **kwargs), {}
  else:
    logits, stats = model(batch["inputs"], **kwargs, return_moe_stats=True)
  loss, ce = cross_entropy(logits, batch["targets"], z_loss, batch.get("weights"))
  for coef, key in ((cfg.moe_experts and cfg.moe_aux_loss, "aux"),
                    (cfg.moe_experts and cfg.moe_z_loss, "z")):
    if coef:
      loss = loss + coef * jnp.mean(stats[key])
  return loss, (ce, stats)


def loss_tokens(batch: dict[str, jax.Array]) -> jax.Array:
  """How many target tokens the loss of `batch` counts (all of them without weights)."""
  w = batch.get("weights")
  return (jnp.asarray(batch["targets"].size, jnp.float32) if w is None
          else w.sum(dtype=jnp.float32))
