"""Waiting on other processes, out loud and with a bound.

A process of a multi-host run waits on the others at a few places: for their shards and
process 0's manifest (data preparation), at barriers (the run's tokenizer saved, a bad
checkpoint moved aside), at the collectives that decide together (a stop notice, the step to
restore). On a 64-host slice a wait that never ends is a job that never starts and never says
why; so every such wait goes through here and

  - says what it waits for and since when, on stderr, every LLAMA_JAX_WAIT_LOG_S seconds
    (default 60), e.g. `process 1: waiting 120 s (since 12:03:04) for gs://b/.../manifest.json
    (process 0 writes it)`;
  - gives up after LLAMA_JAX_WAIT_S seconds where it can (polls and barriers; a collective
    cannot be abandoned, it only logs), with a one-line error naming what never came.

Tests of multi-process paths set both short, so a hang fails in seconds with every process's
last words instead of after minutes of silence.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
from typing import Callable, TypeVar

from llama_jax.errors import UserError

TIMEOUT_ENV = "LLAMA_JAX_WAIT_S"
LOG_ENV = "LLAMA_JAX_WAIT_LOG_S"
DEFAULT_TIMEOUT_S = 6 * 3600.0  # a large corpus's shards on a busy host take hours
DEFAULT_LOG_S = 60.0

T = TypeVar("T")
_barriers = itertools.count()


class WaitTimeout(UserError, TimeoutError):
  """Another process never did what this one waited for (one line naming it)."""


def _env_seconds(name: str, default: float) -> float:
  raw = os.environ.get(name, "")
  try:
    value = float(raw) if raw else default
  except ValueError:
    raise UserError(f"{name}={raw!r} is not a number of seconds; set it to e.g. 600") from None
  if value <= 0:
    raise UserError(f"{name}={raw!r} must be positive; set it to e.g. 600")
  return value


def timeout_s(default: float = DEFAULT_TIMEOUT_S) -> float:
  """How long a process waits for the others: $LLAMA_JAX_WAIT_S, else `default`."""
  return _env_seconds(TIMEOUT_ENV, default)


def log_every_s() -> float:
  return _env_seconds(LOG_ENV, DEFAULT_LOG_S)


def _who() -> str:
  try:
    import jax
    return f"process {jax.process_index()}"
  except Exception:  # noqa: BLE001 — before jax.distributed starts there is no index yet
    return f"pid {os.getpid()}"


def _say(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def announced(what: str, *, who: str | None = None, log=_say):
  """Runs the body (a blocking call: a barrier, a collective) while a timer thread says, every
  log_every_s(), what this process is still waiting for and since when."""
  who = who or _who()
  start, every = time.time(), log_every_s()
  done = threading.Event()

  def tell():
    while not done.wait(every):
      log(f"{who}: waiting {time.time() - start:.0f} s (since "
          f"{time.strftime('%H:%M:%S', time.localtime(start))}) for {what}")

  thread = threading.Thread(target=tell, name="llama_jax-waiting", daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()


def poll(what: str, ready: Callable[[], T | None], *, timeout: float | None = None,
         interval: float = 0.5, fix: str = "", who: str | None = None, log=_say) -> T:
  """ready()'s first value that is not None, called every `interval` seconds; says what it
  waits for every log_every_s() and raises WaitTimeout (naming `what`, then `fix`) after
  `timeout` seconds (default timeout_s())."""
  timeout = timeout_s() if timeout is None else timeout
  start = time.monotonic()
  with announced(what, who=who, log=log):
    while True:
      value = ready()
      if value is not None:
        return value
      waited = time.monotonic() - start
      if waited >= timeout:
        raise WaitTimeout(f"{who or _who()}: waited {waited:.0f} s for {what}"
                          + (f"; {fix}" if fix else ""))
      time.sleep(min(interval, max(timeout - waited, 0.0)))


def barrier(name: str, *, timeout: float | None = None) -> None:
  """Every process reaches `name` (jax.distributed's coordination service, which gives up
  after `timeout` seconds with an error naming the barrier); nothing to do for one process.
  Not a device collective: a barrier with a deadline is what a stuck peer needs."""
  import jax
  if jax.process_count() == 1:
    return
  from jax._src import distributed
  timeout = timeout_s(3600.0) if timeout is None else timeout
  # A barrier id is used once: the counter keeps repeated barriers of one name apart (every
  # process passes the same barriers in the same order).
  key = f"llama_jax:{next(_barriers)}:{name}"
  with announced(f"the other {jax.process_count() - 1} process(es) at {name}"):
    try:
      distributed.global_state.client.wait_at_barrier(key, int(timeout * 1000))
    except Exception as e:  # noqa: BLE001 — the runtime's deadline error: say which barrier
      if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
        raise
      raise WaitTimeout(f"{_who()}: waited {timeout:.0f} s at {name} for the other processes; "
                        "one of them stopped or is stuck (its log says where)") from None
