"""Where one attempt of a run spends its wall time, kept while it trains (Ledger) and written to
metrics.jsonl as `goodput/...` fields, cumulative for the attempt.

From train.train's start to the end of its last checkpoint write, the wall time of an attempt
is split into:

  steps_s       the training loop's own time: the steps, logging, the guard's checks
                (llama_jax.goodput.report splits it into productive and lost work)
  compile_s     tracing, lowering and compiling any jitted function (jax.monitoring's
                /jax/core/compile/* durations), wherever it happens
  restore_s     restoring the train state (or making it) at the start and at each rollback
  checkpoint_s  the blocking part of the checkpoint saves and the final wait for them
  data_s        making the tokenizer and the loaders (data preparation) and, in the loop,
                waiting for the next batch
  eval_s        the evaluations
  other         the rest of wall_s (setup: mesh, shardings, the peak FLOP/s measurement)

A timed section leaves out the compilation inside it, so no second is counted twice.
"""

from __future__ import annotations

import contextlib
import threading
import time

PREFIX = "goodput/"
SECTIONS = ("restore", "checkpoint", "data", "eval")
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")

_compiled = [0.0]
_lock = threading.Lock()
_listening = [False]


def _on_duration(event: str, duration: float, **kwargs) -> None:
  if event in COMPILE_EVENTS:
    with _lock:
      _compiled[0] += duration


def compile_seconds() -> float:
  """Seconds jax has spent compiling in this process since the first call (a listener on
  jax.monitoring, registered once per process)."""
  if not _listening[0]:
    import jax
    with _lock:
      if not _listening[0]:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening[0] = True
  return _compiled[0]


def next_attempt(lines: list[dict]) -> int:
  """1 + the highest attempt metrics.jsonl's lines record (1 for a new run)."""
  return 1 + max((int(m[PREFIX + "attempt"]) for m in lines if PREFIX + "attempt" in m),
                 default=0)


class Ledger:
  """One attempt's accounting: `section(name)` times a block, `add` adds measured seconds,
  `start_loop` / `end_loop` bracket the training loop, `fields()` is what metrics.jsonl gets."""

  def __init__(self, attempt: int, clock=time.perf_counter):
    self.attempt, self.clock = attempt, clock
    self.t0, self.compile0 = clock(), compile_seconds()
    self.spent = dict.fromkeys(SECTIONS, 0.0)
    self.loop_s, self._loop_t0, self._loop_busy0 = 0.0, None, 0.0

  @classmethod
  def of_workdir(cls, workdir: str, is_main: bool = True) -> "Ledger":
    """The ledger of a new attempt of the run in `workdir` (its metrics.jsonl numbers the
    attempts; only process 0, which writes it, reads it)."""
    from llama_jax.metrics import read_metrics
    return cls(next_attempt(read_metrics(workdir) if is_main else []))

  def _busy(self) -> float:
    return sum(self.spent.values()) + compile_seconds() - self.compile0

  def add(self, name: str, seconds: float) -> None:
    self.spent[name] += seconds

  @contextlib.contextmanager
  def section(self, name: str):
    t, c = self.clock(), compile_seconds()
    try:
      yield
    finally:
      self.spent[name] += max(0.0, self.clock() - t - (compile_seconds() - c))

  def start_loop(self) -> None:
    self._loop_t0, self._loop_busy0 = self.clock(), self._busy()

  def steps_s(self) -> float:
    if self._loop_t0 is None:
      return self.loop_s
    return self.loop_s + max(0.0, self.clock() - self._loop_t0 - (self._busy() - self._loop_busy0))

  def end_loop(self) -> None:
    self.loop_s, self._loop_t0 = self.steps_s(), None

  def fields(self, **extra) -> dict:
    """The cumulative `goodput/...` fields of the attempt so far (extra: more of them)."""
    out = {"attempt": self.attempt, "wall_s": self.clock() - self.t0,
           "steps_s": self.steps_s(), "compile_s": compile_seconds() - self.compile0,
           **{f"{k}_s": v for k, v in self.spent.items()}, **extra}
    return {PREFIX + k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
