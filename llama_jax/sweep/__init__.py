"""Sweeps: an experiment file expands into runs; run them here, or emit a TPU / SLURM script.

An experiment file (experiments/*.py) is plain Python:

    '''What it studies, how to launch it, what it found.'''
    CONFIG = "configs/default.py"              # base config file (optionally "path.py:arg")
    BASE = {"data.seq_len": 128}               # overrides common to every run (optional)

    def sweep(add):
      for seed in (0, 1):
        add(name=f"rope_s{seed}", **{"model.position": "rope", "train.seed": seed})

`add(name=..., tags=None, **overrides)` adds one run. Overrides are dotted config keys exactly
as on the trainer's command line (`"model.dim": 128` is `--config.model.dim=128`); as a
keyword-friendly spelling a double underscore stands for the dot (`model__dim=128`). `tags` is
a dict of extra columns for results.csv that are not config values (e.g. the compute budget a
run belongs to). Every run is resolved against the base config and checked by
llama_jax.config.validate when the sweep is expanded, so a misspelt key, a value of the wrong
type or an invalid model shape fails before anything runs: a SweepError (a UserError), which
the CLI prints as one line `error: ...` with exit status 2.

    python -m llama_jax.sweep experiments/X.py --workdir DIR [--parallel N] [--dry]
        [--launcher local|tpu|slurm] [--only NAME|PATTERN ...] [--set KEY=VALUE ...] [--collect]

Paths. The experiment file, its CONFIG and --config are relative to the current directory
(absolute paths are kept): run the sweep from the root of a checkout for `configs/...` and
`experiments/...`. Config files importing `configs.base` work from anywhere, since setup.cfg
installs configs/ as a package.

Local launcher: each run is `python -m llama_jax --config=CONFIG --workdir=DIR/<name>
--config.k=v ...` (the program run_train.py runs) in its own subprocess, started in the current
directory (at most --parallel at once), stdout+stderr appended to DIR/<name>/log.txt (DIR may
be a bucket, gs://...: the log is then kept in a local copy and uploaded when the run ends; W&B
runs, with train.wandb_project set, are grouped by the sweep's name and tagged with their
overrides). A run is
finished when DIR/<name>/DONE exists or its metrics.jsonl has a line with step >= train.steps
(the trainer logs the number of completed updates as `step`); DONE records train.steps, so
raising train.steps makes a finished run unfinished again. Finished runs are skipped, and any
other run is started again, which resumes it from the checkpoints in its workdir. The sweep
writes DONE after a run exits 0 having reached train.steps, and DIR/<name>/sweep.json
(overrides, command, the directory it ran in, attempts with wall time and exit code).
Afterwards (and with --collect alone) it writes DIR/results.csv: one row per run with its
overrides and tags, params, non-embedding params, tokens (= steps * batch_size * seq_len), exact
FLOPs (llama_jax.model.sizes.flops_per_token * tokens), Kaplan FLOPs (6 N_nonembed tokens), final
train and eval loss, wall time and status (done | incomplete | failed | pending).

A different trainer (a wrapper such as `nice`, another Python, a stand-in in tests) is given as
`--train_cmd 'CMD ...'` (a shell-quoted prefix that replaces `python -m llama_jax`; each run's
flags follow it), or as the `train_cmd=[...]` argument of `run_local`.

TPU launcher: writes DIR/launch_tpu.sh (or --script): each run gets its own slice (a queued
resource of --tpu_type, at most --parallel at once, `ZONE=... bash launch_tpu.sh`) and runs
`cd REPO && python -m llama_jax ...` on every host of it (`--worker=all`; jax.distributed
finds the hosts through the TPU metadata server). A preempted slice is deleted and asked for
again, up to --retries attempts; before each attempt a run finished in its workdir (DONE, or
a metrics.jsonl line at train.steps) is skipped. The workdir must be reachable from every
host (gs://bucket/...); REPO (--remote_dir) is the checkout on the TPU VMs, relative to the
home directory unless absolute, which the script's SETUP command puts on each new slice.

SLURM launcher: writes DIR/launch_slurm.sh, an sbatch job array (one array task per unfinished
run, at most --parallel at once) with `srun python -m llama_jax ...` in each task on --nodes
nodes: one process per GPU with --gpus_per_node (jax's SLURM start-up gives each task GPU
SLURM_LOCALID), else --ntasks_per_node processes per node. The array is `--requeue` with
`--signal=B:TERM@N` (--signal_s): SIGTERM near the time limit reaches every process, which
save the same step, and the script requeues the job to resume. `--submit` submits it with
sbatch, and a job (afterany) that writes DIR/results.csv once every run has ended; without
it, `sbatch DIR/launch_slurm.sh`.

In both scripts a config path inside the current directory is written relative to it, so that
it names the same file in the cluster's checkout.

Modules: experiment (an experiment file expanded into runs), overrides (config files, dotted
overrides), run (Run: sizes, command, state on disk), local (the local launcher), results
(results.csv), cluster (the TPU / SLURM scripts), errors (SweepError); the CLI is __main__.
Guide: docs/experiments.md (Sweeps).
"""
