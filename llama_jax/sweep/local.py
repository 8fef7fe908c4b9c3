"""The local launcher of llama_jax.sweep: each run is a trainer subprocess (`python -m
llama_jax`, at most `parallel` at once) started in the current directory, logged to
<workdir>/log.txt and recorded in <workdir>/sweep.json; a run that reaches train.steps gets a
DONE file, and an interrupted one resumes when started again.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

from llama_jax import storage
from llama_jax.sweep.run import Run, final_value, last_step


def default_train_cmd() -> list[str]:
  """The package's training program under this Python (the same one as run_train.py)."""
  return [sys.executable, "-m", "llama_jax"]


def _write_json(path: str, obj: Any) -> None:
  storage.write_text(path, json.dumps(obj, indent=1, default=str))  # whole, atomically


class _Children:
  """Live subprocesses, so an interrupted sweep stops its own runs (and only those)."""

  def __init__(self):
    self.lock = threading.Lock()
    self.procs: set[subprocess.Popen] = set()
    self.stopping = False

  def terminate_all(self) -> None:
    with self.lock:
      self.stopping = True
      procs = list(self.procs)
    for p in procs:
      _terminate(p)


def _terminate(proc: subprocess.Popen) -> None:
  """SIGTERM to a run's own process group (it was started with start_new_session), so the
  trainer and anything it spawned stop, and nothing else."""
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
      proc.terminate()


def run_one(run: Run, train_cmd: Sequence[str], children: _Children | None = None,
            print_fn: Callable[[str], None] = print) -> str:
  """Runs (or resumes) one run to completion; returns its status afterwards.

  In a bucket, which cannot append, the run's output goes to a local copy of its log.txt
  (downloaded first when another machine started it) that is uploaded when the run ends."""
  remote = storage.is_remote(run.workdir)
  if not remote:
    os.makedirs(run.workdir, exist_ok=True)
  log_path = os.path.join(run.workdir, "log.txt")
  local_log = storage.local_copy_path(log_path)
  if remote and storage.exists(log_path) and not os.path.exists(local_log):
    storage.download(log_path, local_log)
  os.makedirs(os.path.dirname(local_log), exist_ok=True)
  cmd = list(train_cmd) + run.train_args()
  record = run.record()
  if record.get("overrides") not in (None, run.overrides):
    print_fn(f"[sweep] warning: {run.name}: {run.workdir} was started with other overrides "
             f"({record['overrides']}); its checkpoints are resumed with the new ones")
  record.update(name=run.name, overrides=run.overrides, tags=run.tags, command=shlex.join(cmd),
                cwd=os.getcwd())
  record.setdefault("attempts", [])
  start = time.time()
  attempt = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_from_step":
             last_step(run.metrics()), "returncode": None, "wall_s": None}
  record["attempts"].append(attempt)
  _write_json(os.path.join(run.workdir, "sweep.json"), record)
  with open(local_log, "a") as log:
    log.write(f"\n===== {attempt['started']} sweep: {shlex.join(cmd)}\n")
    log.flush()
    # The run inherits the current directory: the config path is absolute, and a relative
    # data.files glob or data_dir means what it means where the sweep was started.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, **run.wandb_env()})
    if children is not None:
      with children.lock:
        children.procs.add(proc)
        if children.stopping:
          _terminate(proc)
    try:
      rc = proc.wait()
    finally:
      if children is not None:
        with children.lock:
          children.procs.discard(proc)
  if remote:
    storage.upload(local_log, log_path)
  attempt.update(returncode=rc, wall_s=round(time.time() - start, 3))
  if children is not None and children.stopping:
    attempt["interrupted"] = True  # stopped by the sweep: resumable, not a failure
  record["wall_s"] = round(sum(a["wall_s"] or 0 for a in record["attempts"]), 3)
  metrics = run.metrics()
  reached = last_step(metrics) >= run.steps
  if rc == 0 and reached:
    _write_json(os.path.join(run.workdir, "DONE"),
                {"steps": run.steps, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
  elif rc == 0:
    print_fn(f"[sweep] {run.name}: exited 0 but metrics.jsonl stops at step "
             f"{last_step(metrics)} < train.steps={run.steps}; not marked DONE")
  _write_json(os.path.join(run.workdir, "sweep.json"), record)
  return run.status()


def _tail(path: str, n: int) -> list[str]:
  if not storage.exists(path):
    return []
  lines = storage.read_bytes(path).decode("utf-8", errors="replace").splitlines(keepends=True)
  return ["    " + line for line in lines[-n:]]


def run_local(runs: Sequence[Run], *, parallel: int = 1, train_cmd: Sequence[str] | None = None,
              print_fn: Callable[[str], None] = print) -> dict[str, str]:
  """Runs every unfinished run, at most `parallel` at once; returns {name: status}.

  Finished runs are skipped; interrupted ones are started again and resume from their
  checkpoints. Ctrl-C stops the runs this call started, then re-raises. train_cmd is the
  trainer's argv prefix (default: default_train_cmd()); each run's train_args() follow it.
  """
  train_cmd = list(train_cmd) if train_cmd is not None else default_train_cmd()
  statuses: dict[str, str] = {}
  todo = []
  for run in runs:
    if run.is_finished():
      statuses[run.name] = "done"
      print_fn(f"[sweep] {run.name}: finished, skipped")
    else:
      todo.append(run)
  if not todo:
    return statuses
  children = _Children()
  t0 = time.time()
  total = len(todo)
  finished = 0

  def work(run: Run) -> str:
    step = last_step(run.metrics())
    print_fn(f"[sweep] {run.name}: " + (f"resuming from step {step}" if step >= 0 else "starting")
             + f" -> {run.workdir}/log.txt")
    return run_one(run, train_cmd, children, print_fn)

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel))
  futures = {pool.submit(work, run): run for run in todo}
  try:
    for fut in concurrent.futures.as_completed(futures):
      run = futures[fut]
      finished += 1
      try:
        statuses[run.name] = fut.result()
      except Exception as e:  # a sweep keeps going when one run cannot even start
        statuses[run.name] = "failed"
        print_fn(f"[sweep] {run.name}: could not run: {e!r}")
      metrics = run.metrics()
      print_fn(f"[sweep] {run.name}: {statuses[run.name]} ({finished}/{total}, "
               f"{time.time() - t0:.0f}s) loss={final_value(metrics, 'loss'):.4g} "
               f"eval_loss={final_value(metrics, 'eval_loss'):.4g}")
      if statuses[run.name] == "failed":
        print_fn(f"[sweep] {run.name}: end of {run.workdir}/log.txt:\n"
                 + "".join(_tail(os.path.join(run.workdir, "log.txt"), 5)))
  except KeyboardInterrupt:
    print_fn("[sweep] interrupted: stopping the runs started here")
    for fut in futures:
      fut.cancel()
    children.terminate_all()
    pool.shutdown(wait=True, cancel_futures=True)
    raise
  pool.shutdown(wait=True)
  return statuses
