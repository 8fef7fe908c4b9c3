"""Skip-step: an update whose loss or gradient norm is far outside the recent window is not
applied, decided inside the jitted step (no recompilation, no host sync).

A step is skipped when its loss or grad norm is not finite, or exceeds mean + sigma x std of the
last `spike_window` ACCEPTED steps' (train.spike_sigma > 0; Levanter's and OLMo-core's 6 sigma
over 128 steps). Judging starts once half the window holds accepted steps, as OLMo-core's does:
the first steps' statistics say nothing. A skipped step leaves the params and the optimizer
state as they were (its values do not enter the statistics either); the step counter still
advances, so the next step reads the next batch.

The window and the rollback counters live in the train state under "guard" (only when
train.spike_sigma or train.max_rollbacks is on, so other runs' state and checkpoints are
unchanged), so a resumed run is bitwise the run that was never interrupted:

  losses, grad_norms  f32[W]   the accepted steps' values, a ring indexed by accepted % W
  accepted            i32      steps accepted so far
  skips               i32[W]   1 where step s (0-based) was skipped, at s % W: the last W steps
  skipped             i32      steps skipped so far (kept across rollbacks)
  first_bad           i32      1 + the first step whose non-finite loss or grad norm was applied
                               (skip-step off; 0: none)
  offset              i32      data position - step (llama_jax/rollback.py moves it past bad data)
  rollbacks           i32      rollbacks so far; the lr is scaled by rollback_lr_scale ** this
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.errors import UserError

WINDOW_KEYS = ("losses", "grad_norms", "accepted", "skips")  # the rest outlives a new window


def enabled(t_cfg) -> bool:
  """Whether the train state carries the guard (skip-step or rollbacks on)."""
  return t_cfg.spike_sigma > 0 or t_cfg.max_rollbacks > 0


def window(t_cfg) -> int:
  return int(t_cfg.spike_window) if t_cfg.spike_sigma > 0 else 1


def init(t_cfg) -> dict:
  """The guard's starting value: an empty window, no skips, offset 0."""
  w = window(t_cfg)
  zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (one buffer each: they are donated)
  return {"losses": jnp.zeros((w,), jnp.float32), "grad_norms": jnp.zeros((w,), jnp.float32),
          "accepted": zero(), "skips": jnp.zeros((w,), jnp.int32), "skipped": zero(),
          "first_bad": zero(), "offset": zero(), "rollbacks": zero()}


def with_guard(t_cfg, state: dict) -> dict:
  """A new train state with the guard's starting value when the config asks for it."""
  return {**state, "guard": init(t_cfg)} if enabled(t_cfg) else state


def abstract(t_cfg) -> dict:
  return jax.eval_shape(lambda: init(t_cfg))


def _over(history, n, value, sigma):
  """value > mean + sigma x std of history's first n entries (n >= 1)."""
  valid = jnp.arange(history.shape[0]) < n
  mean = jnp.sum(jnp.where(valid, history, 0.0)) / n
  var = jnp.sum(jnp.where(valid, (history - mean) ** 2, 0.0)) / n
  return value > mean + sigma * jnp.sqrt(var)


def scale_updates(t_cfg, state, updates):
  """The optimizer's updates times rollback_lr_scale ** rollbacks (an AdamW update, weight
  decay included, is proportional to the lr); unchanged when no rollback scales the lr."""
  if "guard" not in state or t_cfg.max_rollbacks == 0 or t_cfg.rollback_lr_scale == 1.0:
    return updates
  scale = jnp.power(jnp.float32(t_cfg.rollback_lr_scale), state["guard"]["rollbacks"])
  return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)


def guard(t_cfg, state, new_state, stats):
  """(new_state, stats) of one step with skip-step applied: where the step is skipped every
  entry of new_state but the step counter keeps its old value. stats gains `skipped` (0/1)."""
  if "guard" not in state:
    return new_state, stats
  g = state["guard"]
  loss = stats["loss"].astype(jnp.float32)
  gnorm = stats["grad_norm"].astype(jnp.float32)
  bad = ~(jnp.isfinite(loss) & jnp.isfinite(gnorm))
  w = g["losses"].shape[0]
  step = state["step"]
  if t_cfg.spike_sigma > 0:
    n = jnp.minimum(g["accepted"], w)
    judged = n >= max(2, w // 2)
    spike = judged & (_over(g["losses"], jnp.maximum(n, 1), loss, t_cfg.spike_sigma)
                      | _over(g["grad_norms"], jnp.maximum(n, 1), gnorm, t_cfg.spike_sigma))
    skip = bad | spike
  else:  # rollbacks alone: nothing is skipped, a non-finite loss is found by the host
    skip = jnp.zeros((), bool)
  at = g["accepted"] % w
  accept = ~skip
  new_g = {
      "losses": jnp.where(accept, g["losses"].at[at].set(loss), g["losses"]),
      "grad_norms": jnp.where(accept, g["grad_norms"].at[at].set(gnorm), g["grad_norms"]),
      "accepted": g["accepted"] + accept.astype(jnp.int32),
      "skips": g["skips"].at[step % w].set(skip.astype(jnp.int32)),
      "skipped": g["skipped"] + skip.astype(jnp.int32),
      # Only a bad step that was applied (skip-step off) is a rollback's cause at once; with
      # skip-step on it is skipped, and counts towards train.max_skips like a spike.
      "first_bad": jnp.where((g["first_bad"] == 0) & bad & ~skip, step + 1, g["first_bad"]),
      "offset": g["offset"], "rollbacks": g["rollbacks"],
  }
  out = {k: v if k == "step" else jax.tree.map(lambda a, b: jnp.where(skip, a, b), state[k], v)
         for k, v in new_state.items()}
  out["guard"] = new_g
  return out, {**stats, "skipped": skip.astype(jnp.int32)}


# ---------------------------------------------------------------------------- checkpoints


def readable(abstract: dict, saved, replicated) -> dict:
  """The abstract state to read a checkpoint with, whose tree of array metadata is `saved`
  (None: unreadable, `abstract` as it is): its own guard (a run that had skip-step or
  rollbacks on, maybe with another window), or none (a run that had them off)."""
  if saved is None:  # unreadable: left to the restore, which moves the step aside
    return abstract
  abstract = {k: v for k, v in abstract.items() if k != "guard"}
  if "guard" in saved:
    abstract["guard"] = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated)
                         for k, m in saved["guard"].items()}
  return abstract


def adapted(t_cfg, state: dict, shardings: dict) -> dict:
  """A restored state with the guard this config asks for: a fresh one for a checkpoint
  without (skip-step or rollbacks just turned on), a fresh window keeping the offset and the
  counts for another spike_window, none when both are off, which a checkpoint whose data
  offset was moved by a rollback refuses (resuming would read the bad data again)."""
  have, want = state.get("guard"), enabled(t_cfg)
  if have is None and not want:
    return state
  if not want:
    offset = int(jax.device_get(have["offset"]))
    if offset:
      raise UserError(f"this run's checkpoint has its data moved on by {offset} steps by a "
                      "rollback; resume it with train.spike_sigma or train.max_rollbacks on "
                      "as before")
    return {k: v for k, v in state.items() if k != "guard"}
  fresh = init(t_cfg)
  if have is not None and all(have[k].shape == fresh[k].shape for k in fresh):
    return state
  kept = {} if have is None else {k: v for k, v in have.items() if k not in WINDOW_KEYS}
  # From host copies: arrays placed from one device buffer could share it, and the train step
  # donates each of them.
  guard = {k: jax.device_put(np.array(jax.device_get(kept.get(k, v))), shardings["guard"][k])
           for k, v in fresh.items()}
  return {**state, "guard": guard}
