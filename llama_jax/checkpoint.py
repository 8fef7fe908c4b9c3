"""Orbax checkpoints of the whole train state (params, optimizer state, step) plus the config.

Saves are asynchronous: the step loop goes on while the arrays are written; Orbax only makes a
step visible once it is complete, so a run killed mid-save leaves the previous checkpoint as
the newest. A newest checkpoint that is complete on disk but unreadable (truncated, corrupted)
is skipped with a warning, moved aside (never deleted) and the one before it restored.

The workdir may be a bucket (gs://...): Orbax gets the bucket path itself (on GCS it marks a
finished step with commit_success.txt instead of a rename), and moving an unreadable step
aside is a copy and a delete there.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from llama_jax import config as config_lib
from llama_jax import storage
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
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict())), force=True)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """The state at `step`, laid out as `abstract_state`'s shardings (any mesh shape)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def restore_latest(self, abstract_state: Any, log=print) -> tuple[int, Any] | None:
    """(step, state) from the newest readable checkpoint, or None when there is none."""
    for step in reversed(self.steps()):
      try:
        return step, self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 — any read failure means "unreadable"
        if jax.process_index() == 0:
          log(f"warning: checkpoint {step} is unreadable ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]}); moved to {self.quarantine}, trying the "
              "previous one")
          storage.move_tree(storage.join(self.directory, str(step)),
                            storage.join(self.quarantine, f"{step}"))
        self.manager.reload()
    return None

  def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_lib.from_dict(restored["config"])

  def close(self) -> None:
    self.manager.wait_until_finished()
    # The manager starts deleting unfinished steps in a thread when it is made, and only a
    # save waits for that; a process that exits without saving (an error on the first steps)
    # would have the thread die at interpreter shutdown with a traceback on stderr. Orbax
    # 0.12.8's close() does not wait for it, hence the private call.
    wait_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
    if wait_cleanup is not None:
      wait_cleanup()
    self.manager.close()


def restore_params(workdir: str, step: int | None = None):
  """(model, config, step) from a workdir's newest (or given) checkpoint, params only, on the
  default device; for generation and evaluation."""
  from flax import nnx
  from llama_jax.model.llama import Llama
  from llama_jax.model.config import ModelConfig

  storage.check_bucket(workdir)
  none = CheckpointError(f"no checkpoint under {storage.join(workdir, 'checkpoints')}; train "
                         f"first with run_train.py --workdir={workdir}")
  if not storage.isdir(storage.join(workdir, "checkpoints")):
    raise none  # before Orbax, which would create the directory
  ckpt = Checkpointer(workdir, async_save=False, read_only=True)
  try:  # closing the manager on every path stops its background threads cleanly
    steps = ckpt.steps()
    if not steps:
      raise none
    if step is not None and step not in steps:
      raise CheckpointError(f"no checkpoint of step {step} in {ckpt.directory}; it holds steps "
                            f"{steps}: pick one of them or leave the step out for the newest")
    step = steps[-1] if step is None else step
    config = ckpt.restore_config(step)
    model_cfg = ModelConfig.from_dict(config.model)
    abstract = nnx.eval_shape(lambda: Llama(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abs_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                              nnx.to_pure_dict(abs_state))
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={"params": abs_params},
            restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                                      {"params": abs_params}),
            partial_restore=True)))
  finally:
    ckpt.close()
  return nnx.merge(graphdef, restored["state"]["params"]), config, step
