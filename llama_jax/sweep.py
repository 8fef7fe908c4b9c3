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

Modules: this one holds the CLI and the expansion of an experiment file into runs;
llama_jax.sweep_config (config files, dotted overrides), llama_jax.sweep_run (Run: sizes,
command, state on disk), llama_jax.sweep_local (the local launcher), llama_jax.sweep_results
(results.csv) and llama_jax.sweep_cluster (the TPU / SLURM scripts). Their public names are
importable from here as well.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fnmatch
import io
import os
import re
import shlex
import signal
import sys
from typing import Any, Callable, Sequence

import ml_collections

# The pieces of a sweep, re-exported so that `from llama_jax.sweep import X` keeps working.
from llama_jax.sweep_cluster import remote_command, slurm_script, tpu_script
from llama_jax.sweep_config import (DEFAULT_CONFIG, REPO_ROOT, _canonical_key, _import_file,
                                    format_value, get_value, load_config, parse_value,
                                    resolve_path, set_override)
from llama_jax.sweep_local import (RUN_TRAIN, TRAIN_CMD_ENV, default_train_cmd, run_local,
                                   run_one)
from llama_jax.sweep_results import collect_results, read_results, result_row
from llama_jax.sweep_run import STATUSES, Run, final_value, last_step, read_jsonl

# A run name is a directory name and a shell word: no quoting needed, no path tricks.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


# ---------------------------------------------------------------------------- experiments


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
              f"non_embed={_fmt_count(s['nonembedding_params'])} steps={run.steps} "
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
