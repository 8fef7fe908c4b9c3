"""Launch scripts for a sweep on a cluster: a bash script running each run on every host of a
Cloud TPU slice (tpu_script), or an sbatch job array (slurm_script). See llama_jax.sweep.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Sequence

from llama_jax.sweep.overrides import REPO_ROOT
from llama_jax.sweep.run import Run


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

