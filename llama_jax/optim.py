"""The optax chain: learning-rate schedule, AdamW with a weight-decay mask, clipping.

Gradient accumulation is not an optax wrapper here: train_step splits the batch into
config.optim.grad_accum microbatches and sums their gradients inside the jitted step, so one
optimizer update sees exactly the large batch's mean gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr over warmup_steps, then the named decay to lr*min_lr_ratio
  (one of llama_jax.config.SCHEDULES: config.validate has checked the name)."""
  lr, warmup = optim.lr, min(optim.warmup_steps, total_steps)
  end = lr * optim.min_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  warm = optax.linear_schedule(0.0, lr, warmup) if warmup else None
  if optim.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim.min_lr_ratio)
  elif optim.schedule == "linear":
    main = optax.linear_schedule(lr, end, decay_steps)
  elif optim.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif optim.schedule == "wsd":
    # Warmup-stable-decay (MiniCPM, Hägele et al. 2024): constant, then the last
    # decay_fraction of all steps decays linearly to min_lr.
    cooldown = max(int(round(optim.decay_fraction * total_steps)), 1)
    stable = max(decay_steps - cooldown, 0)
    main = optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, end, cooldown)], [stable])
  else:  # not a user error: every entry point validates the config first
    raise AssertionError(f"unvalidated optim.schedule={optim.schedule!r}")
  if warm is None:
    return main
  return optax.join_schedules([warm, main], [warmup])


def traced_schedule(optim: ml_collections.ConfigDict, total_steps: int, lr, warmup_steps
                    ) -> optax.Schedule:
  """make_schedule's schedule with `lr` and `warmup_steps` as jax values (a population's
  per-member hyperparameters, llama_jax.population, traced under vmap). optax's schedules
  branch in Python on their step counts (`if transition_steps <= 0`), which a traced warmup
  cannot take, so this writes their formulas in jnp: optax's polynomial (power 1) and cosine
  decay and join_schedules' `where`, term for term; tests check it against make_schedule."""
  total = jnp.float32(total_steps)
  lr = jnp.asarray(lr, jnp.float32)
  warmup = jnp.minimum(jnp.asarray(warmup_steps, jnp.float32), total)
  alpha = optim.min_lr_ratio
  end = lr * alpha
  decay_steps = jnp.maximum(total - warmup, 1.0)

  def linear(count, init, final, steps):  # optax.polynomial_schedule, power 1
    count = jnp.clip(count, 0, steps)
    return (init - final) * (1 - count / steps) + final

  def main(count):
    if optim.schedule == "cosine":  # optax.cosine_decay_schedule, exponent 1
      count = jnp.minimum(count, decay_steps)
      return lr * ((1 - alpha) * (0.5 * (1 + jnp.cos(jnp.pi * count / decay_steps))) + alpha)
    if optim.schedule == "linear":
      return linear(count, lr, end, decay_steps)
    if optim.schedule == "constant":
      return lr
    if optim.schedule == "wsd":
      cooldown = max(int(round(optim.decay_fraction * total_steps)), 1)
      stable = jnp.maximum(decay_steps - cooldown, 0.0)
      return jnp.where(count < stable, lr, linear(count - stable, lr, end, float(cooldown)))
    raise AssertionError(f"unvalidated optim.schedule={optim.schedule!r}")

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    # A warmup of 0 steps is no warmup (optax's constant schedule, never selected below).
    warm = linear(count, 0.0, lr, jnp.maximum(warmup, 1.0))
    return jnp.where((warmup > 0) & (count < warmup), warm, main(count - warmup))

  return schedule


def decay_mask(params, decay_embeddings: bool):
  """True where weight decay applies: matrices (ndim >= 2 per layer), never norms or biases.

  Stacked block params carry a leading layers axis, so a norm scale [L, D] is still a vector:
  the test is on the parameter's name, not only its rank.
  """
  def wants_decay(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if any(n in ("scale", "bias") for n in names):
      return False
    if names and names[0] in ("embed", "pos_embed"):
      return decay_embeddings
    return True
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int,
                   lr_multipliers=None, *, schedule: optax.Schedule | None = None,
                   weight_decay=None) -> optax.GradientTransformation:
  """AdamW (the one optim.name validate accepts) after optional global-norm clipping.

  `lr_multipliers`, a tree like the params (llama_jax.model.parametrization: μP, depth
  scaling), scales each parameter's AdamW update, weight decay included, which is a per-
  parameter learning rate. A stateless step after AdamW keeps the optimizer state's arrays
  those of plain AdamW (optax.multi_transform would split them per class), so their shardings
  and checkpoints do not depend on the parametrization.

  `schedule` and `weight_decay` replace the config's (a population member's traced values:
  the optimizer state's structure does not depend on them)."""
  schedule = make_schedule(optim, total_steps) if schedule is None else schedule
  weight_decay = optim.weight_decay if weight_decay is None else weight_decay
  parts = []
  if optim.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.clip_norm))
  parts.append(optax.adamw(
      schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=weight_decay,
      mask=lambda p: decay_mask(p, optim.decay_embeddings)))
  if lr_multipliers is not None:
    parts.append(optax.stateless(
        lambda updates, params: jax.tree.map(lambda u, m: u * m if m != 1.0 else u,
                                             updates, lr_multipliers)))
  return optax.chain(*parts)
