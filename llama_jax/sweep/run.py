"""One run of a sweep: its name, overrides and resolved config, its sizes (params, tokens,
FLOPs), its trainer arguments, and its state on disk (metrics.jsonl, sweep.json, DONE).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_collections

from llama_jax import storage
from llama_jax.model.config import ModelConfig
from llama_jax.model.sizes import (active_params, count_params, flops_per_token,
                                   kaplan_flops_per_token)
from llama_jax.sweep.overrides import format_value

# diverged: stopped with a non-finite loss or its rollbacks spent (train.max_rollbacks),
# which a retry would only repeat; failed: any other error (a crash: --retries re-launches it).
STATUSES = ("done", "incomplete", "failed", "diverged", "pending")


@dataclasses.dataclass
class Run:
  """One point of a sweep: a name, its overrides (BASE first), the resolved config."""

  name: str
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict
  workdir: str
  config_file: str           # 'path.py[:arg]', the path absolute
  tags: dict[str, Any] = dataclasses.field(default_factory=dict)
  sweep: str = ""            # the sweep's name (its experiment file's): the W&B group
  _sizes: dict[str, float] | None = dataclasses.field(default=None, repr=False)

  # -- sizes
  @property
  def model_config(self):
    return ModelConfig.from_dict(self.config.model)

  def sizes(self) -> dict[str, float]:
    """params (all of them, an MoE's every expert), active_params (those a token goes
    through: an MoE layer's top_k routed experts, its router and shared experts), non-embedding
    params, tokens, exact FLOPs (the active ones: llama_jax.model.sizes, as the MFU counts) and
    Kaplan's 6 N D (cached)."""
    if self._sizes is None:
      cfg = self.model_config
      seq_len = int(self.config.data.seq_len)
      tokens = int(self.config.train.steps) * int(self.config.data.batch_size) * seq_len
      non_embed = count_params(cfg, non_embedding=True)
      self._sizes = dict(
          params=count_params(cfg),
          active_params=active_params(cfg),
          nonembedding_params=non_embed,
          tokens=tokens,
          flops=flops_per_token(cfg, seq_len) * tokens,
          # 6 N D with N the parameters a token goes through (an MoE model's active ones)
          kaplan_flops=kaplan_flops_per_token(active_params(cfg, non_embedding=True)) * tokens,
      )
    return self._sizes

  # -- command
  def train_args(self, *, config_file: str | None = None, workdir: str | None = None) -> list[str]:
    """The trainer's arguments (no program): --config, --workdir, one --config.k=v each."""
    args = [f"--config={config_file or self.config_file}",
            f"--workdir={workdir or self.workdir}"]
    args += [f"--config.{k}={format_value(v)}" for k, v in self.overrides.items()]
    return args

  # -- state on disk
  @property
  def steps(self) -> int:
    return int(self.config.train.steps)

  def wandb_env(self) -> dict[str, str]:
    """W&B's own variables for this run: named as the run, grouped by the sweep, tagged with
    its overrides (a W&B tag holds at most 64 characters)."""
    tags = [f"{k}={format_value(v)}"[:64] for k, v in self.overrides.items()]
    env = {"WANDB_NAME": self.name, "WANDB_TAGS": ",".join(t.replace(",", ";") for t in tags)}
    if self.sweep:
      env["WANDB_RUN_GROUP"] = self.sweep
    return env

  def checkpoint_step(self) -> int:
    """The newest checkpoint's step in the workdir (-1: none): runs of a population resume
    together only from one step."""
    if not storage.exists(os.path.join(self.workdir, "checkpoints")):
      return -1
    from llama_jax.checkpoint import Checkpointer
    checkpointer = Checkpointer(self.workdir, read_only=True)
    try:
      return max(checkpointer.steps(), default=-1)
    finally:
      checkpointer.close()

  def metrics(self) -> list[dict[str, Any]]:
    return read_jsonl(os.path.join(self.workdir, "metrics.jsonl"))

  def record(self) -> dict[str, Any]:
    path = os.path.join(self.workdir, "sweep.json")
    if storage.exists(path):
      return json.loads(storage.read_text(path))
    return {}

  def is_finished(self, metrics: list[dict[str, Any]] | None = None) -> bool:
    """DONE written for at least train.steps, or metrics.jsonl reaching train.steps."""
    done = os.path.join(self.workdir, "DONE")
    if storage.exists(done):
      try:
        if int(json.loads(storage.read_text(done))["steps"]) >= self.steps:
          return True
      except (ValueError, KeyError, TypeError):  # a DONE without steps (made by hand): trusted
        return True
    metrics = self.metrics() if metrics is None else metrics
    return last_step(metrics) >= self.steps

  def status(self) -> str:
    metrics = self.metrics()
    if self.is_finished(metrics):
      return "done"
    attempts = self.record().get("attempts", [])
    if (attempts and attempts[-1].get("returncode") not in (0, None)
        and not attempts[-1].get("interrupted")):
      return "diverged" if attempts[-1].get("diverged") else "failed"
    if metrics or attempts:
      return "incomplete"
    return "pending"


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Lines of a JSONL file; a torn last line (a killed writer) is ignored."""
  if not storage.exists(path):
    return []
  out = []
  for line in storage.read_text(path).splitlines():
    line = line.strip()
    if not line:
      continue
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return out


def last_step(metrics: list[dict[str, Any]]) -> int:
  return max((int(m["step"]) for m in metrics if "step" in m), default=-1)


def final_value(metrics: list[dict[str, Any]], key: str) -> float:
  """The value of `key` at the largest step that logged it (nan if never logged)."""
  best_step, value = -math.inf, math.nan
  for m in metrics:
    if key in m and m[key] is not None and m.get("step", 0) >= best_step:
      best_step, value = m.get("step", 0), float(m[key])
  return value
