"""Automatic rollback past bad data (train.max_rollbacks), the host side of llama_jax/spikes.py.

Trouble is a non-finite loss or grad norm that reached the params (train.spike_sigma = 0; with
skip-step on such a step is skipped like a spike), or more than train.max_skips skipped steps
among the last train.spike_window. It is looked for only at the steps that log, evaluate or
save (those wait for the step anyway), from the guard in the train state, so an interrupted and
resumed run finds it at the same step as the uninterrupted one.

On trouble found at step d (first troubled step f) the run restores the newest checkpoint c <=
f - 1 (none: the run's start), sets aside every checkpoint after c (moved to
DIR/checkpoints_rolled_back/, never deleted), and moves its data position past everything the
abandoned steps read: offset' = d + offset - c, so step c reads the batch that step d would
have read next. The learning rate is scaled by train.rollback_lr_scale per rollback; the
rollback count, the skip total and the offset go into the train state, so the next checkpoint
carries them and a run killed after the rollback resumes bitwise. Each rollback is a
metrics.jsonl line (`rollback_to`, `rollback_reason`) and a `rollback_to` TensorBoard scalar.
When max_rollbacks are spent, the run stops with one line (DivergedError, exit 2), its
checkpoints before the trouble kept.

Several processes decide together: process 0's decision and checkpoint listing are broadcast
(every process computes the same guard, but each lists its own disk). A population's member
rolls back alone (llama_jax.population.loop uses the functions below per member).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import numpy as np

from llama_jax import storage, waiting
from llama_jax.errors import UserError

ROLLED_BACK = "checkpoints_rolled_back"


class DivergedError(UserError):
  """Trouble after train.max_rollbacks rollbacks: one line naming the steps and the cause."""


@dataclasses.dataclass(frozen=True)
class Trouble:
  found: int   # the step (updates done) at which it was found
  first: int   # the first troubled step (1-based, as metrics.jsonl counts)
  cause: str


def find_trouble(t_cfg, guard: dict[str, np.ndarray], done: int) -> Trouble | None:
  """The trouble the guard (host values) shows after `done` steps, or None."""
  first_bad = int(guard["first_bad"])
  if first_bad:
    return Trouble(done, first_bad, f"the loss or grad norm was not finite at step {first_bad}")
  if t_cfg.spike_sigma <= 0:
    return None
  skips = np.asarray(guard["skips"])
  w = len(skips)
  steps = [s for s in range(max(done - w, 0), done) if skips[s % w]]  # 0-based, last w steps
  if len(steps) <= t_cfg.max_skips:
    return None
  return Trouble(done, steps[0] + 1,
                 f"{len(steps)} of the last {min(w, done)} steps were skipped as loss or grad "
                 f"norm spikes (steps {steps[0] + 1}-{steps[-1] + 1}; train.max_skips="
                 f"{t_cfg.max_skips})")


def agreed(values: np.ndarray, what: str) -> np.ndarray:
  """Process 0's values on every process (one process: unchanged); the wait says `what`."""
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  with waiting.announced(f"process 0's {what}"):
    return np.asarray(multihost_utils.broadcast_one_to_all(values))


def checkpoint_before(checkpointer, first: int) -> int:
  """The newest checkpoint step <= first - 1 on process 0's listing; 0 (the run's start)
  when there is none."""
  step = max((s for s in checkpointer.steps() if s <= first - 1), default=0)
  return int(agreed(np.int64(step), f"checkpoint to roll back to (before step {first})"))


def set_aside(checkpointer, workdir: str, after: int, log=print) -> list[int]:
  """Moves every checkpoint after step `after` to DIR/checkpoints_rolled_back/<step>
  (process 0, once every save has finished); returns their steps."""
  checkpointer.manager.wait_until_finished()
  steps = [s for s in checkpointer.steps() if s > after]
  if steps and jax.process_index() == 0:
    for s in steps:
      target = storage.join(workdir, ROLLED_BACK, str(s))
      if storage.exists(target):  # an earlier rollback's step of the same number
        target = storage.join(workdir, ROLLED_BACK, f"{s}.{int(time.time())}")
      storage.move_tree(storage.join(checkpointer.directory, str(s)), target)
    log(f"checkpoint(s) {steps} set aside in {storage.join(workdir, ROLLED_BACK)}")
  waiting.barrier(f"checkpoints after step {after} set aside by process 0")
  checkpointer.manager.reload()
  return steps


def diverged(t_cfg, trouble: Trouble, kept: int) -> DivergedError:
  spent = (f"after {t_cfg.max_rollbacks} rollback(s) (train.max_rollbacks)" if t_cfg.max_rollbacks
           else "(train.max_rollbacks=0: no rollback)")
  newest = f"step {kept}" if kept else "none, a rerun starts from the beginning"
  return DivergedError(
      f"diverged: {trouble.cause}, found at step {trouble.found}, {spent}; stopped. The "
      f"checkpoints before the trouble are kept (newest: {newest}); lower optim.lr, set "
      "optim.clip_norm or look at the data of these steps, then rerun")


def rolled_guard(guard: dict, done: int, restored_step: int) -> dict[str, int]:
  """The guard values that outlive a rollback, from the abandoned state's guard (host
  values): the offset moved past what it read, one more rollback, its skip total."""
  return {"offset": done + int(guard["offset"]) - restored_step,
          "rollbacks": int(guard["rollbacks"]) + 1, "skipped": int(guard["skipped"])}


def log_fields(guard: dict, metrics: dict) -> dict:
  """A log line's skipped_steps and rollbacks (the guard's host values), and a skipped step's
  non-finite loss or grad norm as null, so no NaN reaches metrics.jsonl."""
  return {"skipped_steps": int(guard["skipped"]), "rollbacks": int(guard["rollbacks"]),
          **{k: None for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])}}


def record(writer, done: int, restored: int, trouble: Trouble, values: dict, extra: dict,
           log=print) -> None:
  """The metrics.jsonl line (and TensorBoard scalar) of a rollback, and its log line."""
  writer.write(done, {"rollback_to": restored, "rollback_reason": trouble.cause,
                      "rollbacks": values["rollbacks"], "data_offset": values["offset"], **extra})
  writer.flush()
  log(f"rollback {values['rollbacks']}: {trouble.cause}, found at step {done}; restored "
      f"{'step ' + str(restored) if restored else 'the start'}, data moved on by "
      f"{done - restored} steps (offset {values['offset']})")


class Rollbacks:
  """A single run's rollbacks: `trouble` at a log / eval / checkpoint step, `roll_back`."""

  def __init__(self, setup, checkpointer, workdir: str, writer,
               restore: Callable[[int], Any], log=print):
    self.t_cfg = setup.config.train
    self.enabled = "guard" in setup.abstract_state
    self.shardings = setup.state_shardings.get("guard")
    self.checkpointer, self.workdir, self.writer = checkpointer, workdir, writer
    self.restore, self.log = restore, log

  @staticmethod
  def offset(state) -> int:
    return int(jax.device_get(state["guard"]["offset"])) if "guard" in state else 0

  def guard(self, state) -> dict[str, np.ndarray]:
    return jax.device_get(state["guard"])

  def log_fields(self, state, metrics: dict) -> dict:
    """What a log line adds (skipped_steps, rollbacks) and changes: a skipped step's
    non-finite loss or grad norm is logged as null, so no NaN reaches metrics.jsonl."""
    return log_fields(self.guard(state), metrics) if self.enabled else {}

  def trouble(self, done: int, state) -> Trouble | None:
    """The trouble process 0 found after `done` steps (every process gets its answer)."""
    if not self.enabled:
      return None
    found = find_trouble(self.t_cfg, self.guard(state), done)
    if not int(agreed(np.int32(found is not None), f"trouble check after step {done}")):
      return None
    return found or Trouble(done, done, "trouble found by process 0")

  def may_save_at_stop(self, done: int, state) -> bool:
    """Whether a stop (a signal, between log steps) may save: not while trouble is pending,
    which the resumed run then meets again at the step the uninterrupted run would."""
    trouble = self.trouble(done, state)
    if trouble:
      self.log(f"not saving step {done} at the stop: {trouble.cause}; the rerun resumes from "
               "the checkpoint before it")
    return trouble is None

  def roll_back(self, trouble: Trouble, state, extra: dict | None = None):
    """The state restored from before the trouble with the data moved past it; raises
    DivergedError when train.max_rollbacks are spent (its later checkpoints set aside)."""
    g = self.guard(state)
    restored_step = checkpoint_before(self.checkpointer, trouble.first)
    set_aside(self.checkpointer, self.workdir, restored_step, self.log)
    if int(g["rollbacks"]) >= self.t_cfg.max_rollbacks:
      raise diverged(self.t_cfg, trouble, restored_step)
    new = self.restore(restored_step)
    values = rolled_guard(g, trouble.found, restored_step)
    new["guard"] = {**new["guard"], **{k: jax.device_put(np.int32(v), self.shardings[k])
                                       for k, v in values.items()}}
    record(self.writer, trouble.found, restored_step, trouble, values, extra or {}, self.log)
    return new


class Feed:
  """(step, batch) pairs of a loader read at data position step + offset; `seek` moves both
  (a rollback), the next pair then comes from the new position. The time spent waiting for a
  batch goes to `on_wait` (goodput's data waits)."""

  def __init__(self, loader, step: int, offset: int = 0, on_wait=None):
    self.loader, self.step, self.offset = loader, int(step), int(offset)
    self.on_wait = on_wait or (lambda seconds: None)
    self._moved = False

  def seek(self, step: int, offset: int) -> None:
    self.step, self.offset, self._moved = int(step), int(offset), True

  def __iter__(self):
    while True:
      self._moved = False
      batches = self.loader.iterate(self.step + self.offset)
      try:
        while not self._moved:
          t = time.perf_counter()
          position, batch = next(batches)
          self.on_wait(time.perf_counter() - t)
          yield position - self.offset, batch
      finally:
        batches.close()
