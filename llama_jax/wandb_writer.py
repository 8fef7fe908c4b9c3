"""Optional Weights & Biases logging: the scalars of metrics.jsonl, at the same steps.

Off unless config.train.wandb_project names a project; TensorBoard stays the default. wandb is
imported only then (a missing package is a one-line error naming `pip install wandb`).
WANDB_MODE=offline logs to local files with no network (`wandb sync DIR` uploads them later).

The W&B run id is a hash of the workdir, so a resumed run continues the same W&B run. Its name
is the workdir's last folder unless WANDB_NAME says otherwise; group and tags come from W&B's
own WANDB_RUN_GROUP / WANDB_TAGS, which the sweep sets to the sweep's name and the run's
overrides (llama_jax.sweep.local). W&B's local files go to the workdir when it is local, and to
WANDB_DIR (default: the current directory) when the workdir is a bucket.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from llama_jax import storage
from llama_jax.errors import UserError


class WandbError(UserError):
  """train.wandb_project is set but W&B cannot be used."""


def run_id(workdir: str) -> str:
  return "lj-" + hashlib.sha256(storage.resolve(workdir).encode()).hexdigest()[:16]


class WandbWriter:

  def __init__(self, project: str, workdir: str, config):
    try:
      import wandb
    except ImportError:
      raise WandbError(f"train.wandb_project={project!r} needs the wandb package: pip install "
                       "wandb (or leave train.wandb_project empty to log to TensorBoard "
                       "only)") from None
    workdir = storage.resolve(workdir)
    local = None if storage.is_remote(workdir) else workdir
    self._run = wandb.init(
        project=project, id=run_id(workdir), resume="allow",
        name=os.environ.get("WANDB_NAME") or os.path.basename(workdir),
        config=config.to_dict(), dir=local or os.environ.get("WANDB_DIR") or None,
        notes=f"workdir {workdir}")

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    numbers = {k: v for k, v in scalars.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numbers:
      self._run.log(numbers, step=step)

  def close(self) -> None:
    self._run.finish()
