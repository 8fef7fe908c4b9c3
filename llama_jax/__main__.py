"""Trains a LLaMA model: python -m llama_jax --config=configs/default.py --workdir=DIR
(run_train.py at the repository root is the same program).

Overrides: --config.model.dim=512 --config.optim.lr=1e-3 (an unknown key or a value of the
wrong type stops the run at start, naming the closest key or the type). A DIR with checkpoints
is resumed from its newest complete one.
--dry_run compiles the train step for the configured mesh on fake CPU devices, allocating
nothing, and prints one JSON line with per-device memory and FLOPs. --dry_run --topology=v5p-128
[--num_slices=N] compiles it with the TPU compiler for that Cloud TPU slice (needs libtpu) and
adds its peak bytes, the chip's HBM and `fits`; --fit / --fit_batch search the settings that fit
(llama_jax.fit_search).
Multi-process: --coordinator_address=HOST:PORT --num_processes=N --process_id=I, or nothing
where jax detects the cluster (Cloud TPU VMs, GKE, SLURM, Open MPI); the first line says how
the processes were found.
A user's mistake (a bad config, data that is not there, a mesh that does not fit, a NaN loss)
is one line `error: ...` and exit status 2 (llama_jax.errors); anything else is a bug and
keeps its traceback.
Guides: docs/training.md (runs, resume), docs/memory_plans.md (--dry_run, --topology, --fit),
docs/multi_host.md (several processes), docs/errors.md (the one-line errors).
"""

import json

from absl import flags, logging
from ml_collections import config_flags

from llama_jax import config as config_lib
from llama_jax import errors

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the step only; print memory/FLOPs.")
_DRY_DEVICES = flags.DEFINE_integer(
    "dry_run_devices", 8, "With --dry_run and a mesh axis of -1: the device count to fake.",
    lower_bound=1)
_TOPOLOGY = flags.DEFINE_string(
    "topology", "", "With --dry_run: a Cloud TPU slice (v4-32, v5p-128, v5e-256, v6e-256) to "
    "compile for with the TPU compiler instead of fake CPU devices.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "With --topology: slices joined by DCN.")
_FIT = flags.DEFINE_bool("fit", False, "With --topology: search remat and grad_accum to fit.")
_FIT_BATCH = flags.DEFINE_bool(
    "fit_batch", False, "With --topology: search the largest global batch that fits.")
_FIT_REMAT = flags.DEFINE_list("fit_remat", [], "Remat policies --fit searches (default all).")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax and tfds log every file at INFO
  config = _CONFIG.value
  # The one validation, before anything is built (and before jax starts, which the dry run's
  # fake devices need): everything below trusts the config.
  config_lib.validate(config)
  if _TOPOLOGY.value or _FIT.value or _FIT_BATCH.value:
    if not (_DRY_RUN.value and _TOPOLOGY.value):
      raise errors.UserError("--topology, --fit and --fit_batch go with --dry_run "
                             "--topology=NAME (e.g. --dry_run --topology=v5p-128)")
    if _FIT.value and _FIT_BATCH.value:
      raise errors.UserError("--fit searches remat and grad_accum at the configured batch, "
                             "--fit_batch the largest batch; give one of them")
    from llama_jax import fit_search
    search = "fit" if _FIT.value else "fit_batch" if _FIT_BATCH.value else ""
    return fit_search.topology_main(config, _TOPOLOGY.value, _NUM_SLICES.value, search=search,
                                    remats=_FIT_REMAT.value)
  if _DRY_RUN.value:
    from llama_jax import dry_run
    n = dry_run.mesh_devices(config, _DRY_DEVICES.value)
    dry_run.fake_cpu_devices(n)
    print(json.dumps(dry_run.dry_run(config, n)))
    return
  if not _WORKDIR.value:
    raise errors.UserError("--workdir is required: the run's checkpoints and metrics go "
                           "there (a directory with checkpoints is resumed)")

  from llama_jax import sharding
  from llama_jax.train import train

  # The run's first line, on every process: how the processes found each other (or that
  # there is one), so a slice that came up as N separate runs shows it at once.
  print("processes: " + sharding.initialize_distributed(_COORD.value, _NPROC.value, _PID.value),
        flush=True)
  train(config, _WORKDIR.value)


def run():
  errors.run(main, config_lib.parse_flags)


if __name__ == "__main__":
  run()
