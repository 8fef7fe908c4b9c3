"""The sweep's command line: python -m llama_jax.sweep experiments/X.py --workdir DIR ...
(the experiment file format and the launchers: llama_jax.sweep). A mistake in the experiment
file or the flags is one line `error: ...` and exit status 2 (llama_jax.errors.cli).
Guide: docs/experiments.md (Sweeps); TPU and SLURM: docs/multi_host.md."""

from __future__ import annotations

import argparse
import io
import os
import shlex
import signal
import sys
from typing import Sequence

from llama_jax import storage
from llama_jax.errors import cli
from llama_jax.sweep.cluster import job_name, relative_to_cwd, slurm_script, submit, tpu_script
from llama_jax.sweep.errors import SweepError
from llama_jax.sweep.experiment import absolute_config, expand, is_remote, load_experiment
from llama_jax.sweep.local import (default_train_cmd, population_groups, population_name,
                                   run_local)
from llama_jax.sweep.overrides import canonical_key, load_config, parse_value
from llama_jax.sweep.results import collect_results
from llama_jax.sweep.run import Run


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


def _train_cmd(text: str | None) -> list[str]:
  if text is None:
    return default_train_cmd()
  try:
    argv = shlex.split(text)
  except ValueError as e:  # an unclosed quote
    raise SweepError(f"--train_cmd {text!r}: {e}; quote it as a shell command") from None
  if not argv:
    raise SweepError("--train_cmd is empty; give the trainer's command, e.g. "
                     "'python -m llama_jax'")
  return argv


def _collect_cmd(args: argparse.Namespace, experiment: str, workdir: str) -> str:
  """This sweep's `--collect`, run on the cluster in its checkout once the array has ended."""
  argv = [args.python, "-m", "llama_jax.sweep", experiment, "--workdir", workdir, "--collect"]
  if args.config:
    argv += ["--config", relative_to_cwd(args.config)]
  argv += [f"--set={item}" for item in args.set]
  if args.only:
    argv += ["--only", *args.only]
  return f"cd {shlex.quote(args.remote_dir or os.getcwd())} && {shlex.join(argv)}"


@cli
def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m llama_jax.sweep",
      description="Run an experiment file's sweep locally, or write a TPU / SLURM launch script.")
  p.add_argument("experiment", help="experiments/NAME.py defining sweep(add); relative paths "
                 "here and in its CONFIG are relative to the current directory")
  p.add_argument("--workdir", required=True, help="parent directory of the runs' workdirs")
  p.add_argument("--parallel", type=int, default=1,
                 help="local: runs at once; slurm: array throttle (%%N); tpu: slices at once")
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
                 "relative to home); slurm: the checkout on the cluster (default: the current "
                 "directory)")
  p.add_argument("--python", default="python", help="tpu/slurm: the Python on the hosts")
  p.add_argument("--train_cmd", help="local: the trainer, a shell-quoted command to which each "
                 "run's --config, --workdir and --config.k=v flags are appended (default: this "
                 "Python's `-m llama_jax`); the way to run a different trainer or a wrapper, "
                 "e.g. 'nice -n 10 python -m llama_jax'")
  p.add_argument("--nodes", type=int, default=1, help="slurm: nodes per run")
  p.add_argument("--gpus_per_node", type=int, default=0,
                 help="slurm: GPUs per node; one process per GPU (what jax's SLURM start-up "
                 "expects: each task takes GPU SLURM_LOCALID)")
  p.add_argument("--ntasks_per_node", type=int, default=1,
                 help="slurm without --gpus_per_node: processes per node (default 1, with all "
                 "the node's devices)")
  p.add_argument("--signal_s", type=int, default=120,
                 help="slurm: SIGTERM this many seconds before the time limit, so the run "
                 "saves and the job requeues (--signal=B:TERM@N)")
  p.add_argument("--submit", action="store_true",
                 help="slurm: submit the script with sbatch, and a job that writes "
                 "results.csv after every run has ended")
  p.add_argument("--tpu_type", default="v5p-8", help="tpu: the slice each run gets")
  p.add_argument("--tpu_runtime", default="v2-alpha-tpuv5", help="tpu: the TPU VM runtime")
  p.add_argument("--retries", type=int, default=5,
                 help="tpu: attempts per run (a preempted slice is asked for again)")
  p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                 help="slurm: extra #SBATCH line, e.g. --sbatch=--gpus-per-node=8")
  p.add_argument("--population", action="store_true",
                 help="local: train runs that differ only in lr, weight decay, warmup, seed and "
                 "init scale as one program each (llama_jax.population)")
  p.add_argument("--population_size", type=int, default=0,
                 help="with --population: at most this many runs per program (0: no limit)")
  p.add_argument("--population_devices", type=int, default=1,
                 help="with --population: groups of devices on the runs axis (must divide "
                 "the group's size and the device count)")
  args = p.parse_args(argv)

  try:
    return _main(args)
  except KeyboardInterrupt:
    print("[sweep] stopped; run the same command again to resume", file=sys.stderr)
    return 130


def _main(args: argparse.Namespace) -> int:
  experiment = load_experiment(args.experiment)
  extra = {}
  if args.set:
    base_config = load_config(absolute_config(args.config or experiment.config_file))
    for item in args.set:
      key, sep, text = item.partition("=")
      if not sep:
        raise SweepError(f"--set needs KEY=VALUE, got {item!r}")
      extra[canonical_key(key)] = parse_value(base_config, key, text)
  runs = expand(experiment, args.workdir, config=args.config, extra=extra, only=args.only)
  workdir = args.workdir.rstrip("/") if is_remote(args.workdir) else os.path.abspath(args.workdir)
  rel_experiment = relative_to_cwd(experiment.path)

  if args.population and args.launcher != "local":
    raise SweepError("--population goes with the local launcher (--launcher local); a TPU or "
                     "SLURM script runs each run as its own job")
  if args.population_size < 0 or args.population_devices < 1:
    raise SweepError(f"--population_size={args.population_size} must be >= 0 and "
                     f"--population_devices={args.population_devices} >= 1")
  if args.submit and args.launcher != "slurm":
    raise SweepError("--submit goes with --launcher slurm (a TPU script runs with bash)")
  if args.launcher != "local":
    # Finished runs are left out here for a local workdir; the TPU script checks a bucket's
    # runs itself before each attempt (the machine writing it may have no credentials).
    if not is_remote(workdir):
      finished = [r.name for r in runs if r.is_finished()]
      runs = [r for r in runs if not r.is_finished()]
      if finished:
        print(f"[sweep] left out {len(finished)} finished run(s): {finished}", file=sys.stderr)
      if not runs:
        print("[sweep] every run is finished; no script written", file=sys.stderr)
        return 0
    if args.launcher == "tpu":
      if not is_remote(args.workdir):
        print(f"[sweep] warning: workdir {args.workdir} is not a gs:// path; on a multi-host "
              "slice every host must reach it", file=sys.stderr)
      text = tpu_script(runs, experiment=rel_experiment,
                        remote_dir=args.remote_dir or "llama_jax", python=args.python,
                        tpu_type=args.tpu_type, runtime=args.tpu_runtime,
                        retries=args.retries, parallel=args.parallel)
    else:
      text = slurm_script(runs, experiment=rel_experiment, repo_dir=args.remote_dir or os.getcwd(),
                          python=args.python, nodes=args.nodes,
                          parallel=args.parallel if args.parallel > 1 else None,
                          log_dir=None if is_remote(workdir) else workdir,
                          sbatch_options=args.sbatch, gpus_per_node=args.gpus_per_node,
                          tasks_per_node=args.ntasks_per_node, signal_s=args.signal_s)
    if args.dry:
      print(text)
      return 0
    script = args.script or (None if is_remote(workdir)
                             else os.path.join(workdir, f"launch_{args.launcher}.sh"))
    if script is None:
      raise SweepError("a remote workdir needs --script PATH for the launch script")
    if args.launcher == "slurm" and not is_remote(workdir):
      os.makedirs(workdir, exist_ok=True)  # sbatch's --output directory must exist
    os.makedirs(os.path.dirname(os.path.abspath(script)), exist_ok=True)
    with open(script, "w") as f:
      f.write(text)
    os.chmod(script, 0o755)
    print(script)
    if args.submit:
      array, collect = submit(script, _collect_cmd(args, rel_experiment, workdir),
                              name=job_name(rel_experiment),
                              log_dir=None if is_remote(workdir) else workdir)
      print(f"[sweep] submitted job array {array}; job {collect} writes "
            f"{workdir}/results.csv when every run has ended", file=sys.stderr)
    return 0

  if is_remote(args.workdir) and not args.dry:
    storage.check_writable(workdir, "--workdir")  # a missing bucket: one line, nothing run
  train_cmd = _train_cmd(args.train_cmd)
  population = None
  if args.population:
    population = {"dir": storage.join(workdir, "populations"), "max_size": args.population_size,
                  "runs_devices": args.population_devices}
  if args.dry:
    print(dry_listing(runs, train_cmd), end="")
    if population:
      for group in population_groups(runs, args.population_size):
        print(f"population {population_name(group)}: {[r.name for r in group]}")
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
    statuses = run_local(runs, parallel=args.parallel, train_cmd=train_cmd,
                         population=population)
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
