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

from llama_jax import config as config_lib
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


def _log_paths(path: str) -> str:
  """The local file a log is appended to: the log itself, or for a bucket (which cannot
  append) a local copy, downloaded first when another machine started it, uploaded after."""
  if not storage.is_remote(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path
  local = storage.local_copy_path(path)
  if storage.exists(path) and not os.path.exists(local):
    storage.download(path, local)
  os.makedirs(os.path.dirname(local), exist_ok=True)
  return local


def _run_process(cmd: list[str], log_path: str, started: str, children: _Children | None,
                 env: dict[str, str]) -> int:
  """Runs cmd to its end, its output appended to log_path (see _log_paths); its return code."""
  local_log = _log_paths(log_path)
  with open(local_log, "a") as log:
    log.write(f"\n===== {started} sweep: {shlex.join(cmd)}\n")
    log.flush()
    # The run inherits the current directory: the config path is absolute, and a relative
    # data.files glob or data_dir means what it means where the sweep was started.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, **env})
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
  if storage.is_remote(log_path):
    storage.upload(local_log, log_path)
  return rc


def _begin_attempt(run: Run, command: str, **extra) -> tuple[dict, dict]:
  """The run's sweep.json record with a new attempt appended (and written)."""
  record = run.record()
  record.update(name=run.name, overrides=run.overrides, tags=run.tags, command=command,
                cwd=os.getcwd())
  record.setdefault("attempts", [])
  metrics = run.metrics()
  attempt = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_from_step":
             last_step(metrics), "returncode": None, "wall_s": None,
             "metrics_lines": len(metrics), **extra}
  record["attempts"].append(attempt)
  _write_json(os.path.join(run.workdir, "sweep.json"), record)
  return record, attempt


def last_error(log_path: str) -> str:
  """The last `error: ...` line of a log, else its last line (a traceback's exception)."""
  lines = [line.strip() for line in _tail_lines(log_path, 200) if line.strip()]
  errors = [line for line in lines if line.startswith("error: ")]
  return (errors or lines or [""])[-1][:300]


def _end_attempt(run: Run, record: dict, attempt: dict, rc: int, wall_s: float,
                 children: _Children | None, print_fn, log_path: str) -> str:
  """Records how the attempt ended, writes DONE for a run that reached train.steps; the
  run's status."""
  attempt.update(returncode=rc, wall_s=round(wall_s, 3))
  if children is not None and children.stopping:
    attempt["interrupted"] = True  # stopped by the sweep: resumable, not a failure
  record["wall_s"] = round(sum(a["wall_s"] or 0 for a in record["attempts"]), 3)
  metrics = run.metrics()
  if rc != 0:
    # The trainer's last line of the attempt ends its metrics (goodput/end, llama_jax.train):
    # a divergence is recorded there; a population's exit 2 is its members' divergence.
    ends = [m.get("goodput/end") for m in metrics[attempt.get("metrics_lines", 0):]
            if "goodput/end" in m]
    attempt["diverged"] = (ends[-1:] == ["diverged"] if ends
                           else rc == 2 and "population" in attempt)
    attempt["error"] = last_error(log_path)
  reached = last_step(metrics) >= run.steps
  if rc == 0 and reached:
    _write_json(os.path.join(run.workdir, "DONE"),
                {"steps": run.steps, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
  elif rc == 0:
    print_fn(f"[sweep] {run.name}: exited 0 but metrics.jsonl stops at step "
             f"{last_step(metrics)} < train.steps={run.steps}; not marked DONE")
  _write_json(os.path.join(run.workdir, "sweep.json"), record)
  return run.status()


def _warn_changed_overrides(run: Run, print_fn) -> None:
  record = run.record()
  if record.get("overrides") not in (None, run.overrides):
    print_fn(f"[sweep] warning: {run.name}: {run.workdir} was started with other overrides "
             f"({record['overrides']}); its checkpoints are resumed with the new ones")


def run_one(run: Run, train_cmd: Sequence[str], children: _Children | None = None,
            print_fn: Callable[[str], None] = print, retries: int = 0) -> str:
  """Runs (or resumes) one run to completion; returns its status afterwards. Its output goes
  to its log.txt (a local copy for a bucket, uploaded when the run ends). A crash (status
  'failed': an exit code other than 0 and 2, or exit 0 short of train.steps) is re-launched
  from the run's checkpoints up to `retries` times; a divergence or a user error (exit 2) is
  not, nor a run the sweep itself stopped."""
  if not storage.is_remote(run.workdir):
    os.makedirs(run.workdir, exist_ok=True)
  cmd = list(train_cmd) + run.train_args()
  log_path = os.path.join(run.workdir, "log.txt")
  _warn_changed_overrides(run, print_fn)
  for attempt_no in range(retries + 1):
    record, attempt = _begin_attempt(run, shlex.join(cmd))
    start = time.time()
    rc = _run_process(cmd, log_path, attempt["started"], children, run.wandb_env())
    status = _end_attempt(run, record, attempt, rc, time.time() - start, children, print_fn,
                          log_path)
    retry = (status in ("failed", "incomplete") and rc != 2 and not attempt.get("interrupted")
             and attempt_no < retries)
    if not retry:
      return status
    print_fn(f"[sweep] {run.name}: attempt {attempt_no + 1} ended with exit code {rc} "
             f"({attempt.get('error') or 'no error line'}); retry {attempt_no + 1} of "
             f"{retries}, resuming from its checkpoints")
  return status


def population_name(runs: Sequence[Run]) -> str:
  return runs[0].name if len(runs) == 1 else f"{runs[0].name}+{len(runs) - 1}"


def run_population(runs: Sequence[Run], populations_dir: str, *, runs_devices: int = 1,
                   python: str = sys.executable, children: _Children | None = None,
                   print_fn: Callable[[str], None] = print) -> dict[str, str]:
  """Trains same-shape runs as one program (llama_jax.population) to completion; returns
  {name: status}. The program's spec and output are in POPULATIONS_DIR/<first>+<K-1>/; each
  run's sweep.json and log.txt say which population trained it, and each run gets its DONE
  as a run alone would."""
  name = population_name(runs)
  folder = storage.join(populations_dir, name)
  spec = storage.join(folder, "spec.json")
  _write_json(spec, {"runs_devices": runs_devices, "members": [
      {"name": r.name, "workdir": r.workdir, "config": json.loads(config_lib.to_json(r.config))}
      for r in runs]})
  cmd = [python, "-m", "llama_jax.population", spec]
  log_path = storage.join(folder, "log.txt")
  attempts = []
  for run in runs:
    if not storage.is_remote(run.workdir):
      os.makedirs(run.workdir, exist_ok=True)
    _warn_changed_overrides(run, print_fn)
    record, attempt = _begin_attempt(run, shlex.join(cmd), population=name)
    storage.write_text(os.path.join(run.workdir, "log.txt"),
                       _read_text(os.path.join(run.workdir, "log.txt"))
                       + f"\n===== {attempt['started']} sweep: trained in population {name} "
                       f"of {len(runs)}; its output: {log_path}\n")
    attempts.append((record, attempt))
  start = time.time()
  rc = _run_process(cmd, log_path, attempts[0][1]["started"], children, {})
  statuses = {}
  for run, (record, attempt) in zip(runs, attempts):
    # A member that reached train.steps ended well even when another diverged (exit 2).
    member_rc = 0 if last_step(run.metrics()) >= run.steps else (rc or 1)
    statuses[run.name] = _end_attempt(run, record, attempt, member_rc, time.time() - start,
                                      children, print_fn, log_path)
  return statuses


def _read_text(path: str) -> str:
  return storage.read_text(path) if storage.exists(path) else ""


def _tail_lines(path: str, n: int) -> list[str]:
  if not storage.exists(path):
    return []
  lines = storage.read_bytes(path).decode("utf-8", errors="replace").splitlines(keepends=True)
  return lines[-n:]


def _tail(path: str, n: int) -> list[str]:
  return ["    " + line for line in _tail_lines(path, n)]


def population_groups(runs: Sequence[Run], max_size: int = 0) -> list[list[Run]]:
  """Runs grouped into populations: the same config but for the values members may differ in
  (llama_jax.population.members.VARYING) and resumable from the same checkpoint step; each
  group of at most max_size (0: no limit) runs."""
  from llama_jax.population.members import group, group_key
  return group(runs, lambda r: (group_key(r.config), r.checkpoint_step()), max_size)


def run_local(runs: Sequence[Run], *, parallel: int = 1, train_cmd: Sequence[str] | None = None,
              print_fn: Callable[[str], None] = print, population: dict | None = None,
              retries: int = 0) -> dict[str, str]:
  """Runs every unfinished run, at most `parallel` at once; returns {name: status}.

  Finished runs are skipped; interrupted ones are started again and resume from their
  checkpoints. Ctrl-C stops the runs this call started, then re-raises. train_cmd is the
  trainer's argv prefix (default: default_train_cmd()); each run's train_args() follow it.
  `population` ({"dir", "max_size", "runs_devices"}) trains the same-shape runs as
  populations (population_groups, run_population; a group of one runs alone), `parallel` of
  them at once. `retries`: how often a run alone that crashed is re-launched (run_one).
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
  groups = (population_groups(todo, population.get("max_size", 0)) if population
            else [[run] for run in todo])
  children = _Children()
  t0 = time.time()
  total = len(todo)
  finished = 0

  def work(group: list[Run]) -> dict[str, str]:
    if len(group) == 1:
      run = group[0]
      step = last_step(run.metrics())
      print_fn(f"[sweep] {run.name}: " + (f"resuming from step {step}" if step >= 0
                                          else "starting") + f" -> {run.workdir}/log.txt")
      return {run.name: run_one(run, train_cmd, children, print_fn, retries)}
    name = population_name(group)
    print_fn(f"[sweep] population {name}: {len(group)} runs as one program -> "
             f"{storage.join(population['dir'], name)}/log.txt")
    return run_population(group, population["dir"], children=children, print_fn=print_fn,
                          runs_devices=population.get("runs_devices", 1))

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel))
  futures = {pool.submit(work, group): group for group in groups}
  try:
    for fut in concurrent.futures.as_completed(futures):
      group = futures[fut]
      try:
        result = fut.result()
      except Exception as e:  # a sweep keeps going when one run cannot even start
        result = {run.name: "failed" for run in group}
        print_fn(f"[sweep] {population_name(group)}: could not run: {e!r}")
      for run in group:
        finished += 1
        statuses[run.name] = result[run.name]
        metrics = run.metrics()
        print_fn(f"[sweep] {run.name}: {statuses[run.name]} ({finished}/{total}, "
                 f"{time.time() - t0:.0f}s) loss={final_value(metrics, 'loss'):.4g} "
                 f"eval_loss={final_value(metrics, 'eval_loss'):.4g}")
        if statuses[run.name] in ("failed", "diverged"):
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
