"""Launch scripts for a sweep on a cluster: a bash script giving each run its own Cloud TPU slice
through a queued resource, with retries after a preemption (tpu_script), or an sbatch job
array that saves and requeues a run stopped by its time limit (slurm_script, submit). See
llama_jax.sweep.

Each run is `python -m llama_jax ...` started in a checkout on the cluster (remote_dir /
repo_dir); config paths inside the current directory are written relative to it, so that a
sweep started at the root of a checkout names the same files in the cluster's checkout.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import textwrap
from typing import Sequence

from llama_jax.sweep.errors import SweepError
from llama_jax.sweep.run import Run

TRAINER = ["-m", "llama_jax"]  # after the hosts' python: the package's training program


def relative_to_cwd(path: str) -> str:
  """A path inside the current directory relative to it (it resolves the same in the
  cluster's checkout), any other path as it is."""
  rel = os.path.relpath(path)
  return path if rel == ".." or rel.startswith(".." + os.sep) else rel


def _remote_config(run: Run) -> str:
  path, sep, arg = run.config_file.partition(":")
  return relative_to_cwd(path) + sep + arg


def remote_command(run: Run, *, repo_dir: str, python: str = "python",
                   workdir: str | None = None) -> str:
  """`cd REPO && python -m llama_jax ...` as one shell string, every word quoted."""
  argv = [python, *TRAINER] + run.train_args(config_file=_remote_config(run), workdir=workdir)
  return f"cd {shlex.quote(repo_dir)} && {shlex.join(argv)}"


def _qr_name(prefix: str, i: int) -> str:
  """A queued resource / TPU VM name: lower-case letters, digits and '-', from a letter."""
  base = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-") or "sweep"
  return f"{'' if base[0].isalpha() else 'r-'}{base}"[:50].rstrip("-") + f"-{i}"


def tpu_script(runs: Sequence[Run], *, experiment: str = "", remote_dir: str = "llama_jax",
               python: str = "python", tpu_type: str = "v5p-8",
               runtime: str = "v2-alpha-tpuv5", retries: int = 5, parallel: int = 1) -> str:
  """A bash script giving each run its own Cloud TPU slice through a queued resource, asked
  for again after a preemption, with the runs that are finished left out."""
  name = os.path.splitext(os.path.basename(experiment))[0] if experiment else "sweep"
  lines = [
      "#!/usr/bin/env bash",
      f"# {len(runs)} run(s) of {experiment or 'a sweep'} on Cloud TPU slices: one queued resource",
      "# (a slice of $TPU_TYPE) per run, at most $PARALLEL at once. Each run's command runs on",
      "# every host of its slice (--worker=all), where jax.distributed.initialize() finds the",
      "# other hosts through the TPU metadata server. A preempted slice (the queued resource",
      "# SUSPENDED or FAILED, or the hosts lost mid-run) is deleted and asked for again, up to",
      "# $RETRIES attempts per run; the run resumes from its checkpoints in the bucket. Before",
      "# each attempt a run whose workdir says it is finished (DONE, or a metrics.jsonl line at",
      "# train.steps, as the local launcher checks) is skipped, so running this again only",
      "# does what is left.",
      "#   ZONE=us-east5-a [PROJECT=my-project] [TPU_TYPE=v5p-128] [RUNTIME=...] [SPOT=1]",
      "#   [PARALLEL=2] [RETRIES=5] [SETUP='git clone ... llama_jax && pip install -e llama_jax']",
      "#   bash THIS_SCRIPT",
      "# SETUP runs on every host of a new slice first: each attempt gets a fresh slice, so it",
      f"# must put this checkout at ~/{remote_dir} (or that absolute path), installed.",
      "set -uo pipefail",
      ': "${ZONE:?set ZONE to the zone to ask for the slices in}"',
      f'TPU_TYPE="${{TPU_TYPE:-{tpu_type}}}" RUNTIME="${{RUNTIME:-{runtime}}}"',
      f'PARALLEL="${{PARALLEL:-{max(1, parallel)}}}" RETRIES="${{RETRIES:-{retries}}}" '
      'POLL_S="${POLL_S:-30}" SETUP="${SETUP:-}"',
      "",
      'gc() { gcloud "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}; }',
      'state() { gc compute tpus queued-resources describe "$1" --format="value(state.state)" '
      "2>/dev/null; }",
      "finished() {  # WORKDIR STEPS",
      '  gcloud storage ls "$1/DONE" >/dev/null 2>&1 ||',
      '    gcloud storage cat "$1/metrics.jsonl" 2>/dev/null | grep -q "^{\\"step\\": $2[,}]"',
      "}",
      "",
      "run_on_slice() {  # NAME SLICE WORKDIR STEPS COMMAND",
      '  local name=$1 qr=$2 workdir=$3 steps=$4 cmd=$5 attempt s',
      "  for (( attempt = 1; attempt <= RETRIES; attempt++ )); do",
      '    if finished "$workdir" "$steps"; then break; fi',
      '    s=$(state "$qr")',
      '    if [[ $s != ACTIVE ]]; then',
      '      [[ -z $s ]] || gc compute tpus queued-resources delete "$qr" --force --quiet',
      '      echo "[$name] attempt $attempt: asking for a $TPU_TYPE slice ($qr)"',
      '      gc compute tpus queued-resources create "$qr" --node-id="$qr" '
      '--accelerator-type="$TPU_TYPE" --runtime-version="$RUNTIME" ${SPOT:+--spot} || continue',
      '      until s=$(state "$qr"); [[ $s == ACTIVE || $s == FAILED || $s == SUSPENDED ]]; do',
      '        sleep "$POLL_S"',
      "      done",
      '      [[ $s == ACTIVE ]] || continue',
      "    fi",
      '    echo "[$name] attempt $attempt: on every host of $qr"',
      '    gc compute tpus tpu-vm ssh "$qr" --worker=all --command="${SETUP:+$SETUP && }$cmd"',
      '    echo "[$name] attempt $attempt ended (exit $?); slice $(state "$qr")"',
      "  done",
      '  [[ -z $(state "$qr") ]] || gc compute tpus queued-resources delete "$qr" --force --quiet',
      '  if finished "$workdir" "$steps"; then echo "[$name] finished"; return 0; fi',
      '  echo "[$name] not finished after $RETRIES attempt(s)" >&2; return 1',
      "}",
      "",
      'failed=$(mktemp)',
      "launch() {  # at most $PARALLEL slices at once",
      '  while (( $(jobs -rp | wc -l) >= PARALLEL )); do wait -n; done',
      '  { run_on_slice "$@" || echo "$1" >>"$failed"; } &',
      "}",
  ]
  for i, run in enumerate(runs):
    cmd = remote_command(run, repo_dir=remote_dir, python=python)
    lines.append(f"launch {shlex.quote(run.name)} {_qr_name(name, i)} "
                 f"{shlex.quote(run.workdir)} {run.steps} {shlex.quote(cmd)}")
  lines += [
      "wait",
      'if [[ -s $failed ]]; then echo "not finished: $(tr "\\n" " " <"$failed")" >&2; exit 1; fi',
      f'echo "all {len(runs)} run(s) finished"',
      "",
  ]
  return "\n".join(lines)


# The SLURM layout: one process (task) per GPU, every task seeing every GPU of its node. jax's
# SLURM detection gives each task the one GPU SLURM_LOCALID (so one task per node would train
# on 1 GPU of 8), and it is how GPU clusters are usually run (srun --ntasks-per-node=8
# --gpus-per-node=8, NCCL between the tasks). --gpus-per-task would hide the other GPUs and
# break that numbering. Without GPUs (CPU or TPU hosts) the default is one process per node
# with all its devices.


def slurm_script(runs: Sequence[Run], *, experiment: str = "", repo_dir: str | None = None,
                 python: str = "python", nodes: int = 1, parallel: int | None = None,
                 log_dir: str | None = None, sbatch_options: Sequence[str] = (),
                 gpus_per_node: int = 0, tasks_per_node: int = 1,
                 signal_s: int = 120) -> str:
  """An sbatch job array: task i runs run i with `srun` on `nodes` nodes, one process per GPU
  (`gpus_per_node`) or `tasks_per_node` processes per node, in repo_dir (default: the current
  directory, for a cluster whose nodes share it). The job is requeued when stopped: SIGTERM
  `signal_s` seconds before the time limit lets the run save, then the script requeues it."""
  repo_dir = repo_dir or os.getcwd()
  for value in (log_dir or "",) + tuple(sbatch_options):
    if any(c.isspace() for c in value):
      raise SweepError(f"#SBATCH lines cannot hold whitespace: {value!r}; use a path or "
                       "option without spaces")
  tasks = gpus_per_node or tasks_per_node
  name = job_name(experiment)
  array = f"0-{len(runs) - 1}" + (f"%{parallel}" if parallel else "")
  lines = [
      "#!/usr/bin/env bash",
      f"#SBATCH --job-name={name}",
      f"#SBATCH --nodes={nodes}",
      f"#SBATCH --ntasks-per-node={tasks}",
  ]
  if gpus_per_node:
    lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
  lines += [
      f"#SBATCH --array={array}",
      "#SBATCH --requeue",
      f"#SBATCH --signal=B:TERM@{signal_s}",
      "#SBATCH --open-mode=append",
  ]
  if log_dir:
    lines.append(f"#SBATCH --output={log_dir.rstrip('/')}/{name}-%A_%a.out")
  lines += [f"#SBATCH {opt}" for opt in sbatch_options]
  per_node = (f"one process per GPU ({gpus_per_node} per node, each on GPU SLURM_LOCALID)"
              if gpus_per_node else f"{tasks} process(es) per node")
  about = (f"{len(runs)} run(s) of {experiment or 'a sweep'}: one array task per run, each on "
           f"{nodes} node(s) with {per_node}; jax.distributed.initialize() reads the SLURM "
           "environment. Submit with: sbatch THIS_SCRIPT (or the sweep's --submit). Stopped "
           f"near its time limit (SIGTERM to this script {signal_s} s before), a run saves its "
           "step on every process and the script requeues it; requeued or preempted, it "
           "resumes from its checkpoints. A new script leaves out the runs that are finished.")
  lines += ["# " + line for line in textwrap.wrap(about, 90)]
  lines += [
      "# The stop notice (SIGTERM to this script: --signal=B:TERM@N, a preemption) is caught from",
      "# the first line on: a notice before the trap would kill the script and end the job FAILED.",
      "stop=0 signalled=0 interrupted=0 pid=",
      "trap 'stop=1; interrupted=1; signal_step' TERM",
      "set -uo pipefail",
      f"cd {shlex.quote(repo_dir)}",
      "# srun: each line labelled with its task; a task that fails ends the others (no process",
      "# waits for a peer at a collective for ever).",
      "export SLURM_LABELIO=1 SLURM_KILL_BAD_EXIT=1",
      'echo "=== $(date +%FT%T) job ${SLURM_JOB_ID:-?} start $(( ${SLURM_RESTART_COUNT:-0} + 1 ))"',
      "# SIGTERM to this script goes on, once, to every task of the training step (a SIGTERM to",
      "# srun itself would cancel the step and kill the tasks before they save). The notice may",
      "# come before srun has made its step, where scancel reaches nothing: it is handed on once",
      "# the step exists (the wait loop below).",
      "signal_step() {",
      '  (( signalled )) || [ -z "$pid" ] && return 0',
      '  if squeue -h -s -j "$SLURM_JOB_ID" -o %i 2>/dev/null | grep -q "\\.[0-9]"; then',
      '    scancel --signal=TERM "$SLURM_JOB_ID" && signalled=1',
      "  fi",
      "}",
      "requeue() {  # a requeue in a transitional state is refused with 'try again later'",
      "  local out",
      "  for _ in 1 2 3 4 5; do",
      '    out=$(scontrol requeue "$SLURM_JOB_ID" 2>&1) && return 0',
      '    case "$out" in *"try again"*) sleep 2 ;; *) break ;; esac',
      "  done",
      '  echo "scontrol requeue $SLURM_JOB_ID failed: $out (nothing to do if a requeue from outside is on)" >&2',
      "}",
      "if (( stop )); then requeue; exit 0; fi  # stopped before anything started",
      'case "${SLURM_ARRAY_TASK_ID:?not inside a SLURM array job}" in',
  ]
  for i, run in enumerate(runs):
    argv = ["srun", python, *TRAINER] + run.train_args(config_file=_remote_config(run))
    lines.append(f"  {i}) # {run.name}")
    lines.append(f"    {shlex.join(argv)} & ;;")
  lines += [
      '  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;',
      "esac",
      "pid=$!",
      "# srun's exit status: a wait cut short by the trap returns early without it, so wait",
      "# again; while a notice waits for the step to exist, poll instead.",
      'rc=""',
      'while [ -z "$rc" ]; do',
      '  if (( stop && !signalled )) && kill -0 "$pid" 2>/dev/null; then',
      "    signal_step; (( signalled )) || sleep 1; continue",
      "  fi",
      '  interrupted=0; wait "$pid"; status=$?',
      '  (( interrupted )) || rc=$status',
      "done",
      "if (( stop )); then requeue; fi  # saved before the time limit: go on in a new allocation",
      'exit "$rc"',
      "",
  ]
  return "\n".join(lines)


def job_name(experiment: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]", "_",
                os.path.splitext(os.path.basename(experiment))[0] if experiment else "sweep")


def submit(script: str, collect_cmd: str, *, name: str, log_dir: str | None = None,
           run=subprocess.run) -> tuple[str, str]:
  """Submits the array with sbatch, then a job that writes results.csv once every array task
  has ended (afterany: a requeued task has not); returns both job ids."""
  if shutil.which("sbatch") is None:
    raise SweepError("sbatch is not on PATH: --submit needs a SLURM login node (or write the "
                     "script without --submit and run `sbatch SCRIPT` there)")

  def sbatch(*args):
    r = run(["sbatch", "--parsable", *args], capture_output=True, text=True)
    if r.returncode:
      raise SweepError(f"sbatch {' '.join(args)} failed: {(r.stderr or r.stdout).strip()}")
    return r.stdout.strip().split(";")[0]

  array = sbatch(script)
  output = [f"--output={log_dir.rstrip('/')}/{name}-collect-%j.out"] if log_dir else []
  collect = sbatch(f"--dependency=afterany:{array}", f"--job-name={name}-collect", "--ntasks=1",
                   *output, f"--wrap={collect_cmd}")
  return array, collect
