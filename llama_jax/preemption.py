"""Stopping on a preemption notice: SIGTERM / SIGINT make a training loop save the step it is at
and exit cleanly, every process of a multi-host run at the same step (llama_jax.train, and
llama_jax.population's loop)."""

from __future__ import annotations

import signal

import jax
import numpy as np


class StopSignal:
  """SIGTERM / SIGINT make the loop save the current step and exit cleanly.

  One process: the signal sets a flag, acted on after the step. Several: a signal reaches one
  of them (a scheduler's preemption notice, a `kill`) and every process must save the same
  step, or one enters the collective save while another runs the next step. So they compare
  flags (an allgather through jax's multihost utilities) at the same steps: those that log,
  evaluate or save, which wait for the step anyway, and at least every `every` steps; if any
  process has one, all save that step. The notice must come that many steps before the kill
  (SLURM's --signal gives minutes, a Cloud TPU maintenance event about 30 s). There the
  handlers are installed when this is made, since restoring and compiling before the first
  step can take minutes of a short notice. (jax's own preemption sync point, which catches
  SIGTERM in C++, misses a notice that comes before the loop's first step.)"""

  def __init__(self, every: int = 10):
    self.received: int | None = None
    self.coordinated, self.every = jax.process_count() > 1, every
    self._previous = {}
    if self.coordinated:
      self._install()

  def _install(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave the handlers alone
        pass

  def __enter__(self):
    if not self.coordinated:
      self._install()
    return self

  def _handle(self, signum, frame):
    self.received = signum

  def should_stop(self, done: int, waited: bool) -> bool:
    """Whether to save `done` and stop; `waited`: this step is waited for anyway (a log, an
    eval, a checkpoint). Called once per step, on every process."""
    if not self.coordinated:
      return self.received is not None
    if not (waited or done % self.every == 0):
      return False
    from jax.experimental import multihost_utils

    from llama_jax import waiting
    with waiting.announced(f"the other processes' stop notices after step {done}"):
      flags = np.asarray(multihost_utils.process_allgather(np.int32(self.received or 0)))
    if flags.any():
      self.received = self.received or int(flags[flags > 0][0])
      return True
    return False

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
