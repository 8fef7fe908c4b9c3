"""Sweeps: an experiment file expands into runs; run them here, or emit a TPU / SLURM script.

An experiment file (experiments/*.py) is plain Python:

    '''What it studies, how to launch it, what it found.'''
    CONFIG = "configs/default.py"              # base config file (optionally "path.py:arg")
    BASE = {"data.seq_len": 128}               # overrides common to every run (optional)

    def sweep(add):
      for seed in (0, 1):
        add(name=f"rope_s{seed}", **{"model.position": "rope", "train.seed": seed})

`add(name=..., tags=None, **overrides)` adds one run. Overrides are dotted config keys exactly
as on the run_train.py command line (`"model.dim": 128` is `--config.model.dim=128`); as a
keyword-friendly spelling a double underscore stands for the dot (`model__dim=128`). `tags` is
a dict of extra columns for results.csv that are not config values (e.g. the compute budget a
run belongs to). Every run is resolved against the base config when the sweep is expanded, so a
misspelt key, a value of the wrong type or an invalid model shape fails before anything runs.

    python -m llama_jax.sweep experiments/X.py --workdir DIR [--parallel N] [--dry]
        [--launcher local|tpu|slurm] [--only NAME|PATTERN ...] [--set KEY=VALUE ...] [--collect]

Local launcher: each run is `python run_train.py --config=CONFIG --workdir=DIR/<name>
--config.k=v ...` in its own subprocess (at most --parallel at once), stdout+stderr appended to
DIR/<name>/log.txt. A run is finished when DIR/<name>/DONE exists or its metrics.jsonl has a
line with step >= train.steps (run_train logs the number of completed updates as `step`);
DONE records train.steps, so raising train.steps makes a finished run unfinished again. Finished
runs are skipped, and any other run is started again, which resumes it from the
checkpoints in its workdir. The sweep writes DONE after a run exits 0 having reached
train.steps, and DIR/<name>/sweep.json (overrides, command, attempts with wall time and exit
code). Afterwards (and with --collect alone) it writes DIR/results.csv: one row per run with its
overrides and tags, params, non-embedding params, tokens (= steps * batch_size * seq_len), exact
FLOPs (llama_jax.metrics.flops_per_token * tokens), Kaplan FLOPs (6 N_nonembed tokens), final
train and eval loss, wall time and status (done | incomplete | failed | pending).

TPU launcher: writes DIR/launch_tpu.sh (or --script), one `gcloud compute tpus tpu-vm ssh
"$TPU_NAME" --zone="$ZONE" --worker=all --command='cd REPO && python run_train.py ...'` per run,
run one after another, the same command on every host (jax.distributed auto-detects the pod).
The workdir must be reachable from every host (gs://bucket/...); REPO (--remote_dir) is the
checkout on the TPU VMs, relative to the home directory unless absolute.

SLURM launcher: writes DIR/launch_slurm.sh, an sbatch job array (one array task per unfinished
run, at most --parallel at once) with `#SBATCH --nodes=N --ntasks-per-node=1` and `srun python run_train.py
...` in each task (jax.distributed auto-detects SLURM). Submit with `sbatch DIR/launch_slurm.sh`.

The run command can be replaced (tests use a fake trainer) by the `train_cmd` argument of
`run_local` or the environment variable LLAMA_JAX_SWEEP_TRAIN_CMD (a shell-quoted prefix that
replaces `python run_train.py`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import csv
import dataclasses
import difflib
import fnmatch
import functools
import importlib.util
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TRAIN = os.path.join(REPO_ROOT, "run_train.py")
DEFAULT_CONFIG = "configs/default.py"
TRAIN_CMD_ENV = "LLAMA_JAX_SWEEP_TRAIN_CMD"

# A run name is a directory name and a shell word: no quoting needed, no path tricks.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")

STATUSES = ("done", "incomplete", "failed", "pending")


# ---------------------------------------------------------------------------- config files


def _ensure_importable() -> None:
  """Config files import `configs.base`, which lives at the repository root."""
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def resolve_path(path: str) -> str:
  """An existing file: as given (relative to the cwd), else relative to the repository root."""
  if os.path.isabs(path) or os.path.exists(path):
    return os.path.abspath(path)
  candidate = os.path.join(REPO_ROOT, path)
  if os.path.exists(candidate):
    return candidate
  raise FileNotFoundError(f"{path!r} not found (looked in {os.getcwd()} and {REPO_ROOT})")


def _import_file(path: str, module_name: str):
  _ensure_importable()
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(config: str) -> ml_collections.ConfigDict:
  """get_config(arg) of a config file given as 'path.py' or 'path.py:arg', like run_train."""
  path, _, arg = config.partition(":")
  module = _import_file(resolve_path(path), f"_sweep_config_{abs(hash(path))}")
  return module.get_config(arg or None)


def _canonical_key(key: str) -> str:
  return key.replace("__", ".")


def _parent(config: ml_collections.ConfigDict, key: str) -> ml_collections.ConfigDict:
  """The section holding a dotted leaf key; an unknown key is a KeyError with suggestions."""
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts):
    where = ".".join(parts[:i]) or "config"
    if not isinstance(node, ml_collections.ConfigDict):
      raise KeyError(f"config key {key!r}: {where} is a value, not a section")
    if part not in node:
      close = difflib.get_close_matches(part, list(node.keys()), n=3)
      hint = (f"; did you mean {', '.join('.'.join(parts[:i] + [c]) for c in close)}?"
              if close else "")
      raise KeyError(f"unknown config key {key!r}: {where} has no field {part!r}{hint} "
                     f"(fields: {sorted(node.keys())})")
    if i < len(parts) - 1:
      node = node[part]
  if isinstance(node[parts[-1]], ml_collections.ConfigDict):
    raise KeyError(f"config key {key!r} is a section; override its fields one by one")
  return node


def set_override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """config.<key> = value for a dotted leaf key; unknown keys and wrong types are errors."""
  node = _parent(config, key)
  try:
    node[key.split(".")[-1]] = value
  except TypeError as e:
    raise TypeError(f"config key {key!r}: {e}") from None


def get_value(config: ml_collections.ConfigDict, key: str) -> Any:
  return _parent(config, key)[key.split(".")[-1]]


def format_value(value: Any) -> str:
  """A value as ml_collections' config_flags parses it back (`--config.k=<this>`)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return value
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (int, tuple, list, dict)) or value is None:
    return repr(value)
  return str(value)


def parse_value(config: ml_collections.ConfigDict, key: str, text: str) -> Any:
  """A command-line string for `--set key=text`, typed like the field it overrides."""
  import ast
  current = get_value(config, _canonical_key(key))
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{key}: expected true/false, got {text!r}")
    return text.lower() in ("true", "1")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  return ast.literal_eval(text)


# ---------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
  """One point of a sweep: a name, its overrides (BASE first), the resolved config."""

  name: str
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict
  workdir: str
  config_file: str           # 'path.py[:arg]', the path absolute
  tags: dict[str, Any] = dataclasses.field(default_factory=dict)
  _sizes: dict[str, float] | None = dataclasses.field(default=None, repr=False)

  # -- sizes
  @property
  def model_config(self):
    from llama_jax.model import ModelConfig
    return ModelConfig.from_dict(self.config.model)

  def sizes(self) -> dict[str, float]:
    """params, non-embedding params, tokens, exact and Kaplan FLOPs (cached)."""
    if self._sizes is None:
      from llama_jax.metrics import flops_per_token, kaplan_flops_per_token
      cfg = self.model_config
      seq_len = int(self.config.data.seq_len)
      tokens = int(self.config.train.steps) * int(self.config.data.batch_size) * seq_len
      non_embed = _count_params(cfg, True)
      self._sizes = dict(
          params=_count_params(cfg, False),
          non_embedding_params=non_embed,
          tokens=tokens,
          flops=flops_per_token(cfg, seq_len) * tokens,
          kaplan_flops=kaplan_flops_per_token(non_embed) * tokens,
      )
    return self._sizes

  # -- command
  def train_args(self, *, config_file: str | None = None, workdir: str | None = None) -> list[str]:
    """run_train.py's arguments (no program): --config, --workdir, one --config.k=v each."""
    args = [f"--config={config_file or self.config_file}",
            f"--workdir={workdir or self.workdir}"]
    args += [f"--config.{k}={format_value(v)}" for k, v in self.overrides.items()]
    return args

  # -- state on disk
  @property
  def steps(self) -> int:
    return int(self.config.train.steps)

  def metrics(self) -> list[dict[str, Any]]:
    return read_jsonl(os.path.join(self.workdir, "metrics.jsonl"))

  def record(self) -> dict[str, Any]:
    path = os.path.join(self.workdir, "sweep.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    return {}

  def is_finished(self, metrics: list[dict[str, Any]] | None = None) -> bool:
    """DONE written for at least train.steps, or metrics.jsonl reaching train.steps."""
    done = os.path.join(self.workdir, "DONE")
    if os.path.exists(done):
      try:
        with open(done) as f:
          if int(json.load(f)["steps"]) >= self.steps:
            return True
      except (ValueError, KeyError, TypeError):  # a DONE without steps (made by hand): trusted
        return True
    metrics = self.metrics() if metrics is None else metrics
    return last_step(metrics) >= self.steps

  def status(self) -> str:
    metrics = self.metrics()
    if self.is_finished(metrics):
      return "done"
    attempts = self.record().get("attempts", [])
    if (attempts and attempts[-1].get("returncode") not in (0, None)
        and not attempts[-1].get("interrupted")):
      return "failed"
    if metrics or attempts:
      return "incomplete"
    return "pending"


@functools.lru_cache(maxsize=None)
def _count_params(cfg, non_embedding: bool) -> int:
  """llama_jax.model.count_params, once per distinct shape (it traces the model)."""
  from llama_jax.model import count_params
  return count_params(cfg, non_embedding=non_embedding)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Lines of a JSONL file; a torn last line (a killed writer) is ignored."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def last_step(metrics: list[dict[str, Any]]) -> int:
  return max((int(m["step"]) for m in metrics if "step" in m), default=-1)


def final_value(metrics: list[dict[str, Any]], key: str) -> float:
  """The value of `key` at the largest step that logged it (nan if never logged)."""
  best_step, value = -math.inf, math.nan
  for m in metrics:
    if key in m and m[key] is not None and m.get("step", 0) >= best_step:
      best_step, value = m.get("step", 0), float(m[key])
  return value


@dataclasses.dataclass
class Experiment:
  path: str
  config_file: str
  base: dict[str, Any]
  doc: str
  sweep_fn: Callable[[Callable[..., None]], None]

  @property
  def name(self) -> str:
    return os.path.splitext(os.path.basename(self.path))[0]


def load_experiment(path: str) -> Experiment:
  path = resolve_path(path)
  module = _import_file(path, f"_sweep_experiment_{os.path.splitext(os.path.basename(path))[0]}")
  if not callable(getattr(module, "sweep", None)):
    raise ValueError(f"{path} defines no sweep(add) function")
  config = getattr(module, "CONFIG", DEFAULT_CONFIG)
  base = {_canonical_key(k): v for k, v in dict(getattr(module, "BASE", {}) or {}).items()}
  return Experiment(path=path, config_file=config, base=base, doc=module.__doc__ or "",
                    sweep_fn=module.sweep)


def _absolute_config(config: str) -> str:
  path, sep, arg = config.partition(":")
  return resolve_path(path) + sep + arg


def expand(experiment: Experiment | str, workdir: str, *, config: str | None = None,
           extra: dict[str, Any] | None = None, only: Sequence[str] | None = None) -> list[Run]:
  """The experiment's runs, each resolved and checked against the base config.

  config replaces the file's CONFIG; extra are overrides applied after BASE and each run's own
  (a smoke test: {'train.steps': 5}); only keeps the runs named or matched by a shell pattern
  (a name or pattern matching nothing is an error).
  """
  if isinstance(experiment, str):
    experiment = load_experiment(experiment)
  config_file = _absolute_config(config or experiment.config_file)
  base_config = load_config(config_file)
  workdir = workdir if _is_remote(workdir) else os.path.abspath(workdir)
  runs: list[Run] = []
  names: set[str] = set()

  def add(name: str | None = None, *, tags: dict[str, Any] | None = None, **overrides) -> None:
    if not name or not isinstance(name, str):
      raise ValueError(f"add() needs name='...', got {name!r}")
    if not _NAME_RE.match(name):
      raise ValueError(f"run name {name!r}: use letters, digits and _ . + = - "
                       "(it becomes a directory and a shell word)")
    if name in names:
      raise ValueError(f"duplicate run name {name!r} in {experiment.path}")
    names.add(name)
    own: dict[str, Any] = {}
    for k, v in overrides.items():
      key = _canonical_key(k)
      if key in own:
        raise ValueError(f"run {name!r}: {key!r} given twice")
      own[key] = v.item() if hasattr(v, "item") and hasattr(v, "dtype") else v  # numpy scalars
    merged = dict(experiment.base)
    merged.update(own)
    merged.update({_canonical_key(k): v for k, v in (extra or {}).items()})
    cfg = copy.deepcopy(base_config)
    try:
      for k, v in merged.items():
        set_override(cfg, k, v)
      _validate(cfg)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"run {name!r} of {experiment.path}: {e.args[0] if e.args else e}") from None
    runs.append(Run(name=name, overrides=merged, config=cfg,
                    workdir=_join(workdir, name), config_file=config_file,
                    tags=dict(tags or {})))

  experiment.sweep_fn(add)
  if not runs:
    raise ValueError(f"{experiment.path}: sweep(add) added no runs")
  if only:
    # Names or shell-style patterns ('C2e11_*').
    unmatched = [pat for pat in only if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
    if unmatched:
      raise ValueError(f"--only names not in the sweep: {unmatched}; runs: {sorted(names)}")
    runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, pat) for pat in only)]
  return runs


def _validate(cfg: ml_collections.ConfigDict) -> None:
  """What can be checked without building anything: the model shape and basic sizes."""
  from llama_jax.model import ModelConfig
  ModelConfig.from_dict(cfg.model)
  for key in ("train.steps", "data.batch_size", "data.seq_len"):
    if int(get_value(cfg, key)) <= 0:
      raise ValueError(f"{key} must be positive, got {get_value(cfg, key)}")


def _is_remote(path: str) -> bool:
  return "://" in path


def _join(workdir: str, name: str) -> str:
  return f"{workdir.rstrip('/')}/{name}" if _is_remote(workdir) else os.path.join(workdir, name)


# ---------------------------------------------------------------------------- local runner


def default_train_cmd() -> list[str]:
  env = os.environ.get(TRAIN_CMD_ENV)
  if env:
    return shlex.split(env)
  return [sys.executable, RUN_TRAIN]


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=str)
  os.replace(tmp, path)


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
  """Runs (or resumes) one run to completion; returns its status afterwards."""
  os.makedirs(run.workdir, exist_ok=True)
  cmd = list(train_cmd) + run.train_args()
  record = run.record()
  if record.get("overrides") not in (None, run.overrides):
    print_fn(f"[sweep] warning: {run.name}: {run.workdir} was started with other overrides "
             f"({record['overrides']}); its checkpoints are resumed with the new ones")
  record.update(name=run.name, overrides=run.overrides, tags=run.tags, command=shlex.join(cmd))
  record.setdefault("attempts", [])
  start = time.time()
  attempt = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_from_step":
             last_step(run.metrics()), "returncode": None, "wall_s": None}
  record["attempts"].append(attempt)
  _write_json(os.path.join(run.workdir, "sweep.json"), record)
  with open(os.path.join(run.workdir, "log.txt"), "a") as log:
    log.write(f"\n===== {attempt['started']} sweep: {shlex.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=REPO_ROOT, start_new_session=True)
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
  if not os.path.exists(path):
    return []
  with open(path, errors="replace") as f:
    return ["    " + line for line in f.readlines()[-n:]]


def run_local(runs: Sequence[Run], *, parallel: int = 1, train_cmd: Sequence[str] | None = None,
              print_fn: Callable[[str], None] = print) -> dict[str, str]:
  """Runs every unfinished run, at most `parallel` at once; returns {name: status}.

  Finished runs are skipped; interrupted ones are started again and resume from their
  checkpoints. Ctrl-C stops the runs this call started, then re-raises.
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


# ---------------------------------------------------------------------------- results


def result_row(run: Run) -> dict[str, Any]:
  metrics = run.metrics()
  sizes = run.sizes()
  row: dict[str, Any] = {"name": run.name}
  row.update(run.overrides)
  row.update(run.tags)
  row.update(sizes)
  row.update(
      steps=run.steps,
      final_step=last_step(metrics) if metrics else "",
      final_loss=final_value(metrics, "loss"),
      final_eval_loss=final_value(metrics, "eval_loss"),
      wall_s=run.record().get("wall_s", ""),
      status=run.status(),
  )
  return row


_SIZE_COLUMNS = ["params", "non_embedding_params", "tokens", "flops", "kaplan_flops", "steps",
                 "final_step", "final_loss", "final_eval_loss", "wall_s", "status"]


def collect_results(runs: Sequence[Run], path: str) -> list[dict[str, Any]]:
  """Writes results.csv (one row per run) and returns the rows. Columns: name, every config key
  some run overrides (each run's resolved value), tags, sizes, final losses, wall_s, status."""
  rows = [result_row(r) for r in runs]
  override_keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
  tag_keys = [k for k in dict.fromkeys(k for r in runs for k in r.tags) if k not in override_keys]
  columns = ["name"] + override_keys + tag_keys
  for run, row in zip(runs, rows):  # a key another run overrides: this run's resolved value
    for k in override_keys:
      row.setdefault(k, get_value(run.config, k))
  columns += [c for c in _SIZE_COLUMNS if c not in columns]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=columns, restval="")
    w.writeheader()
    for row in rows:
      w.writerow({k: _csv_value(v) for k, v in row.items()})
  return rows


def _csv_value(v: Any) -> Any:
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, float):
    return "" if math.isnan(v) else repr(v)
  if isinstance(v, (tuple, list, dict)):
    return json.dumps(v)
  return v


def read_results(path: str) -> list[dict[str, Any]]:
  """results.csv back as dicts, numbers as int / float (empty cells as nan)."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  return [{k: _parse_cell(v) for k, v in row.items()} for row in rows]


def _parse_cell(v: str) -> Any:
  if v is None:
    return None
  if v == "":
    return math.nan
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return v


# ---------------------------------------------------------------------------- cluster scripts


def _remote_config(run: Run) -> str:
  """The config path relative to the repository root when it lies inside it (so it resolves in
  the remote checkout), else as is."""
  path, sep, arg = run.config_file.partition(":")
  rel = os.path.relpath(path, REPO_ROOT)
  if not rel.startswith(".."):
    path = rel
  return path + sep + arg


def remote_command(run: Run, *, repo_dir: str, python: str = "python",
                   workdir: str | None = None) -> str:
  """`cd REPO && python run_train.py ...` as one shell string, every word quoted."""
  argv = [python, "run_train.py"] + run.train_args(config_file=_remote_config(run),
                                                   workdir=workdir)
  return f"cd {shlex.quote(repo_dir)} && {shlex.join(argv)}"


def tpu_script(runs: Sequence[Run], *, experiment: str = "", remote_dir: str = "llama_jax",
               python: str = "python") -> str:
  """A bash script running each run on every host of a TPU slice, one run after another."""
  lines = [
      "#!/usr/bin/env bash",
      f"# {len(runs)} run(s) of {experiment or 'a sweep'} on a Cloud TPU pod slice, one after",
      "# another. Each `gcloud ... --worker=all` runs the same command on every host of the slice;",
      "# jax.distributed.initialize() finds the other hosts on its own.",
      "#   TPU_NAME=my-tpu ZONE=us-central2-b [PROJECT=my-project] bash THIS_SCRIPT",
      f"# Needs the same checkout of this repository at ~/{remote_dir} (or that absolute path)",
      "# on every host, and a workdir every host can reach (gs://...). A run that stops is",
      "# resumed from its checkpoints by running this script again.",
      "set -uo pipefail",
      ': "${TPU_NAME:?set TPU_NAME to the TPU VM name}"',
      ': "${ZONE:?set ZONE to its zone}"',
      "failed=()",
      "",
  ]
  for run in runs:
    cmd = remote_command(run, repo_dir=remote_dir, python=python)
    lines.append(f"echo {shlex.quote('=== ' + run.name)}")
    lines.append('gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" '
                 '${PROJECT:+--project="$PROJECT"} --worker=all '
                 f"--command={shlex.quote(cmd)} || failed+=({shlex.quote(run.name)})")
  lines += [
      "",
      'if (( ${#failed[@]} )); then echo "failed runs: ${failed[*]}" >&2; exit 1; fi',
      f'echo "all {len(runs)} run(s) finished"',
      "",
  ]
  return "\n".join(lines)


def slurm_script(runs: Sequence[Run], *, experiment: str = "", repo_dir: str = REPO_ROOT,
                 python: str = "python", nodes: int = 1, parallel: int | None = None,
                 log_dir: str | None = None, sbatch_options: Sequence[str] = ()) -> str:
  """An sbatch job array: task i runs run i with `srun` on `nodes` nodes, one task per node."""
  for value in (log_dir or "",) + tuple(sbatch_options):
    if any(c.isspace() for c in value):
      raise ValueError(f"#SBATCH lines cannot hold whitespace: {value!r}")
  name = re.sub(r"[^A-Za-z0-9_.-]", "_",
                os.path.splitext(os.path.basename(experiment))[0] if experiment else "sweep")
  array = f"0-{len(runs) - 1}" + (f"%{parallel}" if parallel else "")
  lines = [
      "#!/usr/bin/env bash",
      f"#SBATCH --job-name={name}",
      f"#SBATCH --nodes={nodes}",
      "#SBATCH --ntasks-per-node=1",
      f"#SBATCH --array={array}",
  ]
  if log_dir:
    lines.append(f"#SBATCH --output={log_dir.rstrip('/')}/{name}-%A_%a.out")
  lines += [f"#SBATCH {opt}" for opt in sbatch_options]
  lines += [
      f"# {len(runs)} run(s) of {experiment or 'a sweep'}: one array task per run, each on",
      f"# {nodes} node(s) with one process per node (jax.distributed.initialize() reads the",
      "# SLURM environment). Submit with: sbatch THIS_SCRIPT. A run that stops is resumed from",
      "# its checkpoints by submitting again (or by a new script, which leaves out finished runs).",
      "set -euo pipefail",
      f"cd {shlex.quote(repo_dir)}",
      'case "${SLURM_ARRAY_TASK_ID:?not inside a SLURM array job}" in',
  ]
  for i, run in enumerate(runs):
    argv = ["srun", python, "run_train.py"] + run.train_args(config_file=_remote_config(run))
    lines.append(f"  {i}) # {run.name}")
    lines.append(f"    {shlex.join(argv)} ;;")
  lines += [
      '  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;',
      "esac",
      "",
  ]
  return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI


def _fmt_count(x: float) -> str:
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.3g}"


def _fmt_duration(seconds: float) -> str:
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 5400:
    return f"{seconds / 60:.0f} min"
  return f"{seconds / 3600:.1f} h"


def dry_listing(runs: Sequence[Run], train_cmd: Sequence[str]) -> str:
  out = io.StringIO()
  total = total_kaplan = 0.0
  for run in runs:
    s = run.sizes()
    total += s["flops"]
    total_kaplan += s["kaplan_flops"]
    out.write(f"{run.name}  [{run.status()}]  params={_fmt_count(s['params'])} "
              f"non_embed={_fmt_count(s['non_embedding_params'])} steps={run.steps} "
              f"tokens={_fmt_count(s['tokens'])} flops={s['flops']:.3g} "
              f"kaplan_flops={s['kaplan_flops']:.3g}\n")
    out.write(f"  {shlex.join(list(train_cmd) + run.train_args())}\n")
  out.write(f"{len(runs)} run(s), {total:.3g} training FLOPs in all (Kaplan 6ND: "
            f"{total_kaplan:.3g}); at 20-40 GFLOP/s (about 2 CPU cores) "
            f"{_fmt_duration(total / 40e9)} - {_fmt_duration(total / 20e9)} of compute\n")
  return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m llama_jax.sweep",
      description="Run an experiment file's sweep locally, or write a TPU / SLURM launch script.")
  p.add_argument("experiment", help="experiments/NAME.py defining sweep(add)")
  p.add_argument("--workdir", required=True, help="parent directory of the runs' workdirs")
  p.add_argument("--parallel", type=int, default=1,
                 help="local: runs at once; slurm: array throttle (%%N)")
  p.add_argument("--dry", action="store_true", help="list runs, commands and FLOPs; run nothing")
  p.add_argument("--launcher", choices=("local", "tpu", "slurm"), default="local")
  p.add_argument("--only", nargs="+", metavar="NAME",
                 help="only these runs (names or shell patterns, e.g. 'C2e11_*')")
  p.add_argument("--config", help="base config file (replaces the experiment's CONFIG)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="extra override for every run, after the sweep's own (e.g. train.steps=5)")
  p.add_argument("--collect", action="store_true",
                 help="only (re)write WORKDIR/results.csv from what is on disk")
  p.add_argument("--script", help="tpu/slurm: where to write the script "
                 "(default WORKDIR/launch_<launcher>.sh)")
  p.add_argument("--remote_dir", help="tpu: the checkout on the TPU VMs (default llama_jax, "
                 "relative to home); slurm: the checkout on the cluster (default this one)")
  p.add_argument("--python", default="python", help="tpu/slurm: the Python on the hosts")
  p.add_argument("--nodes", type=int, default=1, help="slurm: nodes per run")
  p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                 help="slurm: extra #SBATCH line, e.g. --sbatch=--gpus-per-node=8")
  args = p.parse_args(argv)

  try:
    return _main(p, args)
  except (KeyError, ValueError, TypeError, FileNotFoundError) as e:
    print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("[sweep] stopped; run the same command again to resume", file=sys.stderr)
    return 130


def _main(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
  experiment = load_experiment(args.experiment)
  extra = {}
  if args.set:
    base_config = load_config(_absolute_config(args.config or experiment.config_file))
    for item in args.set:
      key, sep, text = item.partition("=")
      if not sep:
        p.error(f"--set needs KEY=VALUE, got {item!r}")
      extra[_canonical_key(key)] = parse_value(base_config, key, text)
  runs = expand(experiment, args.workdir, config=args.config, extra=extra, only=args.only)
  workdir = args.workdir.rstrip("/") if _is_remote(args.workdir) else os.path.abspath(args.workdir)
  rel_experiment = os.path.relpath(experiment.path, REPO_ROOT)

  if args.launcher != "local":
    if args.launcher == "slurm" and not _is_remote(workdir):
      finished = [r.name for r in runs if r.is_finished()]
      runs = [r for r in runs if not r.is_finished()]
      if finished:
        print(f"[sweep] left out {len(finished)} finished run(s): {finished}", file=sys.stderr)
      if not runs:
        print("[sweep] every run is finished; no script written", file=sys.stderr)
        return 0
    if args.launcher == "tpu":
      if not _is_remote(args.workdir):
        print(f"[sweep] warning: workdir {args.workdir} is not a gs:// path; on a multi-host "
              "slice every host must reach it", file=sys.stderr)
      text = tpu_script(runs, experiment=rel_experiment,
                        remote_dir=args.remote_dir or "llama_jax", python=args.python)
    else:
      text = slurm_script(runs, experiment=rel_experiment, repo_dir=args.remote_dir or REPO_ROOT,
                          python=args.python, nodes=args.nodes,
                          parallel=args.parallel if args.parallel > 1 else None,
                          log_dir=None if _is_remote(workdir) else workdir,
                          sbatch_options=args.sbatch)
    if args.dry:
      print(text)
      return 0
    script = args.script or (None if _is_remote(workdir)
                             else os.path.join(workdir, f"launch_{args.launcher}.sh"))
    if script is None:
      p.error("a remote workdir needs --script PATH for the launch script")
    if args.launcher == "slurm" and not _is_remote(workdir):
      os.makedirs(workdir, exist_ok=True)  # sbatch's --output directory must exist
    os.makedirs(os.path.dirname(os.path.abspath(script)), exist_ok=True)
    with open(script, "w") as f:
      f.write(text)
    os.chmod(script, 0o755)
    print(script)
    return 0

  if _is_remote(args.workdir):
    p.error("the local launcher needs a local --workdir")
  train_cmd = default_train_cmd()
  if args.dry:
    print(dry_listing(runs, train_cmd), end="")
    return 0
  results = os.path.join(workdir, "results.csv")
  if args.collect:
    collect_results(runs, results)
    print(results)
    return 0
  statuses = {}

  def on_term(signum, frame):  # `kill` / a scheduler's SIGTERM: stop the runs like Ctrl-C
    raise KeyboardInterrupt

  previous = signal.signal(signal.SIGTERM, on_term)
  try:
    statuses = run_local(runs, parallel=args.parallel, train_cmd=train_cmd)
  finally:
    signal.signal(signal.SIGTERM, previous)
    collect_results(runs, results)
    print(f"[sweep] wrote {results}")
  bad = sorted(n for n, s in statuses.items() if s != "done")
  if bad:
    print(f"[sweep] not finished: {bad}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
