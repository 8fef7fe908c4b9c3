"""Orbax checkpoints of the whole train state (params, optimizer state, step) plus the config.

Saves are asynchronous: the step loop goes on while the arrays are written; Orbax only makes a
step visible once it is complete, so a run killed mid-save leaves the previous checkpoint as
the newest. A newest checkpoint that is complete on disk but unreadable (truncated, corrupted)
is skipped with a warning, moved aside (never deleted) and the one before it restored. With
several processes they agree on the step to restore, and the step is moved aside once, after
every process has stopped reading it (restore_latest).

The workdir may be a bucket (gs://...): Orbax gets the bucket path itself (on GCS it marks a
finished step with commit_success.txt instead of a rename), and moving an unreadable step
aside is a copy and a delete there.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from llama_jax import config as config_lib
from llama_jax import storage, waiting
from llama_jax.errors import UserError


class CheckpointError(UserError):
  """A workdir without the checkpoint asked for; the message names the directory and the fix."""


class Checkpointer:
  """DIR/checkpoints/<step>/{state,config}; keeps the newest `keep` steps."""

  def __init__(self, workdir: str, keep: int | None = None, *, async_save: bool = True,
               read_only: bool = False):
    """`read_only` is for readers (evaluate, generate) that may look at a workdir a run is
    still writing: they neither create it nor clean up its unfinished steps."""
    storage.check_scheme(workdir)  # Orbax would take s3://b/x for a relative local path
    self.directory = storage.resolve(storage.join(workdir, "checkpoints"))
    self.quarantine = storage.resolve(storage.join(workdir, "checkpoints_unreadable"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        # Orbax's own read_only=True logs a warning on every open, so a reader is a manager
        # that never saves, creates nothing and leaves unfinished steps to their writer.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only),
        item_names=("state", "config"),
    )

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict) -> None:
    if step in self.manager.all_steps():
      return  # already saved (e.g. final step == a periodic step)
    # Orbax waits for the previous save, on every process (its barriers), before this one.
    with waiting.announced(f"the checkpoints before step {step} to be committed"):
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          config=ocp.args.JsonSave(config.to_dict())), force=True)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """The state at `step`, laid out as `abstract_state`'s shardings (any mesh shape)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def restore_latest(self, abstract_state: Any, log=print) -> tuple[int, Any] | None:
    """(step, state) from the newest checkpoint every process can read, or None when there is
    none. `log` runs on every process (each one says what it could not read).

    One decision, shared: process 0 names the step to try (its listing, broadcast), every
    process reads its part of that step, and the step is taken only if every process could
    (an allgather of the outcomes: each process reads only the shards its devices hold, so
    one can fail where another succeeds). Otherwise the allgather is also the point where
    every process has stopped reading the step: only then does process 0 move it aside, once,
    and the next older step is tried. The reads skip Orbax's manager, whose restore ends in a
    barrier that a process whose read raised would never reach."""
    multi = jax.process_count() > 1
    below = None
    while True:
      steps = [s for s in self.steps() if below is None or s < below]
      step = max(steps, default=-1)
      if multi:
        with waiting.announced("process 0's choice of the checkpoint to restore"):
          step = int(multihost_utils.broadcast_one_to_all(np.int64(step)))
      if step < 0:
        return None
      try:
        state, error = self._read(step, abstract_state), None
      except Exception as e:  # noqa: BLE001 — any read failure means "unreadable"
        state, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      failed = [0] if error else []
      if multi:
        with waiting.announced(f"the other processes' reads of checkpoint {step}"):
          failed = np.flatnonzero(
              multihost_utils.process_allgather(np.int32(bool(error)))).tolist()
      if not failed:
        return step, state
      if error and multi:
        log(f"warning: process {jax.process_index()} cannot read checkpoint {step} ({error})")
      if jax.process_index() == 0:
        log(f"warning: checkpoint {step} is unreadable"
            + (f" by process(es) {failed}" if multi else f" ({error})")
            + f"; moved to {self.quarantine}, trying the previous one")
        storage.move_tree(storage.join(self.directory, str(step)),
                          storage.join(self.quarantine, f"{step}"))
      if multi:  # nobody lists the steps again before the move is done
        waiting.barrier(f"checkpoint {step} moved aside by process 0")
      self.manager.reload()
      below = step

  def _read(self, step: int, abstract_state: Any) -> Any:
    """This process's part of the state of `step`, read by Orbax's handler directly."""
    handler = ocp.StandardCheckpointHandler()
    try:
      return handler.restore(epath.Path(self.directory) / str(step) / "state",
                             args=ocp.args.StandardRestore(abstract_state))
    finally:
      handler.close()

  def state_metadata(self, step: int) -> Any:
    """The saved state's tree of array metadata (shapes, dtypes) at `step`, read without
    restoring it; None when it cannot be read (restore_latest then finds the step unreadable
    and moves it aside)."""
    handler = ocp.StandardCheckpointHandler()
    try:
      return handler.metadata(epath.Path(self.directory) / str(step) / "state")
    except Exception:  # noqa: BLE001 — any read failure: the restore says what it is
      return None
    finally:
      handler.close()

  def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_lib.from_dict(restored["config"])

  def close(self) -> None:
    with waiting.announced(f"the last checkpoint in {self.directory} to be committed"):
      self.manager.wait_until_finished()
    # The manager starts deleting unfinished steps in a thread when it is made, and only a
    # save waits for that; a process that exits without saving (an error on the first steps)
    # would have the thread die at interpreter shutdown with a traceback on stderr. Orbax
    # 0.12.8's close() does not wait for it, hence the private call.
    wait_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
    if wait_cleanup is not None:
      wait_cleanup()
    self.manager.close()


def _open_for_params(workdir: str, step: int | None, what: str) -> tuple["Checkpointer", int]:
  """A read-only Checkpointer of `workdir` and the step to read (its newest when None)."""
  storage.check_bucket(workdir)
  who = f"{what}: " if what else ""
  none = CheckpointError(f"{who}no checkpoint under {storage.join(workdir, 'checkpoints')}; "
                         f"train first with run_train.py --workdir={workdir}")
  if not storage.isdir(storage.join(workdir, "checkpoints")):
    raise none  # before Orbax, which would create the directory
  ckpt = Checkpointer(workdir, async_save=False, read_only=True)
  steps = ckpt.steps()
  if not steps or (step is not None and step not in steps):
    ckpt.close()
    if not steps:
      raise none
    raise CheckpointError(f"{who}no checkpoint of step {step} in {ckpt.directory}; it holds "
                          f"steps {steps}: pick one of them or leave the step out for the newest")
  return ckpt, steps[-1] if step is None else step


def _read_params(ckpt: "Checkpointer", step: int, abs_params: Any) -> Any:
  """The params of `step`, restored into abs_params' shardings and dtypes (the optimizer
  state is not read)."""
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item={"params": abs_params},
          restore_args=jax.tree.map(
              lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype),
              {"params": abs_params}),
          partial_restore=True)))
  return restored["state"]["params"]


def restore_params_into(workdir: str, step: int | None, abs_params: Any,
                        what: str = "") -> tuple[Any, int]:
  """(params, step): a workdir's newest (or given) checkpoint's params laid out as
  `abs_params` (ShapeDtypeStructs with shardings: a run's mesh), for train.init_from."""
  ckpt, step = _open_for_params(workdir, step, what)
  try:
    return _read_params(ckpt, step, abs_params), step
  finally:
    ckpt.close()


def restore_params(workdir: str, step: int | None = None):
  """(model, config, step) from a workdir's newest (or given) checkpoint, params only, on the
  default device; for generation and evaluation. A LoRA run's checkpoint holds its adapters:
  the model is its base (rebuilt as training made it) with them (lora.merged folds them)."""
  from flax import nnx
  from llama_jax.model import lora
  from llama_jax.model.config import ModelConfig

  ckpt, step = _open_for_params(workdir, step, "")
  try:  # closing the manager on every path stops its background threads cleanly
    config = ckpt.restore_config(step)
    model_cfg = ModelConfig.from_dict(config.model)
    spec = lora.spec_from_config(config.lora, model_cfg.mlp)
    abstract = nnx.eval_shape(lambda: lora.build(model_cfg, spec, nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abs_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                              nnx.to_pure_dict(abs_state))
    if spec is not None:
      abs_params = lora.adapters_of(abs_params)
    params = _read_params(ckpt, step, abs_params)
  finally:
    ckpt.close()
  if spec is not None:
    params = lora.with_adapters(_lora_base(config, model_cfg, spec, device), params)
  return nnx.merge(graphdef, params), config, step


def _lora_base(config, model_cfg, spec, device):
  """The base params (adapters included, at their init) a LoRA run trained its adapters on,
  from what config.json records: train.init_from (hf:DIR, or WORKDIR[@step]) when the run
  started from weights, else train.seed's init, made as train.init_state makes it."""
  from flax import nnx
  from llama_jax.model import lora

  source = config.train.get("init_from") or ""
  if source:
    if source.startswith("hf:"):
      from llama_jax.hf import load_hf
      base, _ = load_hf(source[3:], dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype)
    else:
      path, _, at = source.rpartition("@") if "@" in source else (source, "", "")
      base, _, _ = restore_params(path, int(at) if at else None)
      base = lora.merged(base)  # a LoRA run as the base: its adapters folded in
    params = nnx.to_pure_dict(nnx.state(base))
    fresh = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: lora.build(model_cfg, spec, nnx.Rngs(0)))))
    return lora.with_adapters(params, lora.adapters_of(fresh))  # shapes only: replaced

  def init():
    return nnx.to_pure_dict(nnx.state(lora.build(model_cfg, spec, nnx.Rngs(config.train.seed))))
  return jax.jit(init, out_shardings=device)()
