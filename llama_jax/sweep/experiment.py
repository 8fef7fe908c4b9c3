"""An experiment file (experiments/*.py) expanded into its runs, each resolved against the base
config and checked before anything runs (the file format: llama_jax.sweep)."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import os
import re
from typing import Any, Callable, Sequence

import ml_collections

from llama_jax.sweep.overrides import (DEFAULT_CONFIG, canonical_key, import_file, get_value,
                                       load_config, resolve_path, set_override)
from llama_jax.sweep.run import Run

# A run name is a directory name and a shell word: no quoting needed, no path tricks.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


# ---------------------------------------------------------------------------- experiments


@dataclasses.dataclass
class Experiment:
  path: str
  config_file: str
  base: dict[str, Any]
  doc: str
  sweep_fn: Callable[[Callable[..., None]], None]

  @property
  def name(self) -> str:
    return os.path.splitext(os.path.basename(self.path))[0]


def load_experiment(path: str) -> Experiment:
  path = resolve_path(path)
  module = import_file(path, f"_sweep_experiment_{os.path.splitext(os.path.basename(path))[0]}")
  if not callable(getattr(module, "sweep", None)):
    raise ValueError(f"{path} defines no sweep(add) function")
  config = getattr(module, "CONFIG", DEFAULT_CONFIG)
  base = {canonical_key(k): v for k, v in dict(getattr(module, "BASE", {}) or {}).items()}
  return Experiment(path=path, config_file=config, base=base, doc=module.__doc__ or "",
                    sweep_fn=module.sweep)


def absolute_config(config: str) -> str:
  path, sep, arg = config.partition(":")
  return resolve_path(path) + sep + arg


def expand(experiment: Experiment | str, workdir: str, *, config: str | None = None,
           extra: dict[str, Any] | None = None, only: Sequence[str] | None = None) -> list[Run]:
  """The experiment's runs, each resolved and checked against the base config.

  config replaces the file's CONFIG; extra are overrides applied after BASE and each run's own
  (a smoke test: {'train.steps': 5}); only keeps the runs named or matched by a shell pattern
  (a name or pattern matching nothing is an error).
  """
  if isinstance(experiment, str):
    experiment = load_experiment(experiment)
  config_file = absolute_config(config or experiment.config_file)
  base_config = load_config(config_file)
  workdir = workdir if is_remote(workdir) else os.path.abspath(workdir)
  runs: list[Run] = []
  names: set[str] = set()

  def add(name: str | None = None, *, tags: dict[str, Any] | None = None, **overrides) -> None:
    if not name or not isinstance(name, str):
      raise ValueError(f"add() needs name='...', got {name!r}")
    if not _NAME_RE.match(name):
      raise ValueError(f"run name {name!r}: use letters, digits and _ . + = - "
                       "(it becomes a directory and a shell word)")
    if name in names:
      raise ValueError(f"duplicate run name {name!r} in {experiment.path}")
    names.add(name)
    own: dict[str, Any] = {}
    for k, v in overrides.items():
      key = canonical_key(k)
      if key in own:
        raise ValueError(f"run {name!r}: {key!r} given twice")
      own[key] = v.item() if hasattr(v, "item") and hasattr(v, "dtype") else v  # numpy scalars
    merged = dict(experiment.base)
    merged.update(own)
    merged.update({canonical_key(k): v for k, v in (extra or {}).items()})
    cfg = copy.deepcopy(base_config)
    try:
      for k, v in merged.items():
        set_override(cfg, k, v)
      _validate(cfg)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"run {name!r} of {experiment.path}: {e.args[0] if e.args else e}") from None
    runs.append(Run(name=name, overrides=merged, config=cfg,
                    workdir=_join(workdir, name), config_file=config_file,
                    tags=dict(tags or {}), sweep=experiment.name))

  experiment.sweep_fn(add)
  if not runs:
    raise ValueError(f"{experiment.path}: sweep(add) added no runs")
  if only:
    # Names or shell-style patterns ('C2e11_*').
    unmatched = [pat for pat in only if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
    if unmatched:
      raise ValueError(f"--only names not in the sweep: {unmatched}; runs: {sorted(names)}")
    runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, pat) for pat in only)]
  return runs


def _validate(cfg: ml_collections.ConfigDict) -> None:
  """What can be checked without building anything: the model shape and basic sizes."""
  from llama_jax.model.config import ModelConfig
  ModelConfig.from_dict(cfg.model)
  for key in ("train.steps", "data.batch_size", "data.seq_len"):
    if int(get_value(cfg, key)) <= 0:
      raise ValueError(f"{key} must be positive, got {get_value(cfg, key)}")


def is_remote(path: str) -> bool:
  return "://" in path


def _join(workdir: str, name: str) -> str:
  return f"{workdir.rstrip('/')}/{name}" if is_remote(workdir) else os.path.join(workdir, name)
