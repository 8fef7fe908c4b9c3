"""Launch scripts for a sweep on a cluster: a bash script running each run on every host of a
Cloud TPU slice (tpu_script), or an sbatch job array (slurm_script). See llama_jax.sweep.

Each run is `python -m llama_jax ...` started in a checkout on the cluster (remote_dir /
repo_dir); config paths inside the current directory are written relative to it, so that a
sweep started at the root of a checkout names the same files in the cluster's checkout.
"""

from __future__ import annotations

import os
import re
import shlex
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
      "# on every host, installed (pip install -e .), and a workdir every host can reach",
      "# (gs://...). A run that stops is resumed from its checkpoints by running this again.",
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


def slurm_script(runs: Sequence[Run], *, experiment: str = "", repo_dir: str | None = None,
                 python: str = "python", nodes: int = 1, parallel: int | None = None,
                 log_dir: str | None = None, sbatch_options: Sequence[str] = ()) -> str:
  """An sbatch job array: task i runs run i with `srun` on `nodes` nodes, one task per node,
  in repo_dir (default: the current directory, for a cluster whose nodes share it)."""
  repo_dir = repo_dir or os.getcwd()
  for value in (log_dir or "",) + tuple(sbatch_options):
    if any(c.isspace() for c in value):
      raise SweepError(f"#SBATCH lines cannot hold whitespace: {value!r}; use a path or "
                       "option without spaces")
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
    argv = ["srun", python, *TRAINER] + run.train_args(config_file=_remote_config(run))
    lines.append(f"  {i}) # {run.name}")
    lines.append(f"    {shlex.join(argv)} ;;")
  lines += [
      '  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;',
      "esac",
      "",
  ]
  return "\n".join(lines)

