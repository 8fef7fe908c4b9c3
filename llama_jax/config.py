"""Config checks and (de)serialisation: every config has exactly the schema of configs/base.py.

ml_collections already rejects an unknown `--config.a.b` key and a wrongly typed value at
flag-parsing time; `validate` additionally catches keys a preset file added by mistake (a
typo in a config file is not silently accepted) and values outside their allowed sets, before
anything expensive starts.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from llama_jax import storage
from llama_jax.model.config import ModelConfig


class ConfigError(ValueError):
  """A config problem, reported as one line naming the key."""


def base_config() -> ml_collections.ConfigDict:
  from configs import base  # configs/ sits beside the package in the repo
  return base.get_config()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and k != "rope_scaling":
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
  """Checks the whole config; returns the ModelConfig. Raises ConfigError naming the key."""
  schema = _flatten(base_config().to_dict())
  given = _flatten(config.to_dict())
  unknown = sorted(set(given) - set(schema))
  if unknown:
    raise ConfigError(f"unknown config key {unknown[0]!r} (all unknown: {unknown}); "
                      "check the spelling against configs/base.py")
  missing = sorted(set(schema) - set(given))
  if missing:
    raise ConfigError(f"config is missing key(s) {missing}; build it from configs/base.py")
  try:
    model = ModelConfig.from_dict(config.model)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None
  d, t = config.data, config.train
  if d.seq_len > model.max_seq_len:
    raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
  for key, value in (("data.seq_len", d.seq_len), ("data.batch_size", d.batch_size),
                     ("train.steps", t.steps), ("train.log_every", t.log_every),
                     ("train.eval_every", t.eval_every), ("train.eval_steps", t.eval_steps),
                     ("train.checkpoint_every", t.checkpoint_every),
                     ("train.keep_checkpoints", t.keep_checkpoints),
                     ("optim.grad_accum", config.optim.grad_accum)):
    if value <= 0:
      raise ConfigError(f"{key}={value} must be positive")
  if d.batch_size % config.optim.grad_accum:
    raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by "
                      f"optim.grad_accum={config.optim.grad_accum}")
  from llama_jax.optim import SCHEDULES
  if config.optim.schedule not in SCHEDULES:
    raise ConfigError(f"optim.schedule={config.optim.schedule!r} is not one of {SCHEDULES}")
  if config.optim.name != "adamw":
    raise ConfigError(f"optim.name={config.optim.name!r}: only 'adamw' is implemented")
  return model


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def write(config: ml_collections.ConfigDict, workdir: str) -> None:
  storage.write_text(storage.join(workdir, "config.json"), to_json(config))  # whole, atomically


def from_dict(d: dict) -> ml_collections.ConfigDict:
  """Rebuilds a config from its JSON form on top of base (so types come from the schema)."""
  config = base_config()
  d = dict(d)
  rules = d.pop("sharding_rules", None)
  config.update_from_flattened_dict(_flatten(d))
  if rules is not None:
    config.sharding_rules = tuple((name, tuple(m) if isinstance(m, list) else m)
                                  for name, m in rules)
  return config


def read(workdir: str) -> ml_collections.ConfigDict:
  path = storage.join(workdir, "config.json")
  if not storage.exists(path):
    raise ConfigError(f"{path} not found: is {workdir} a llama_jax workdir?")
  return from_dict(json.loads(storage.read_text(path)))
