"""An experiment file (experiments/*.py) expanded into its runs, each resolved against the base
config and checked before anything runs (the file format: llama_jax.sweep)."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import os
import re
from typing import Any, Callable, Sequence

from llama_jax.config import ConfigError, validate
from llama_jax.sweep.errors import SweepError
from llama_jax.sweep.overrides import (DEFAULT_CONFIG, canonical_key, import_file, load_config,
                                       resolve_path, set_override)
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
  """An experiment file; a relative path is relative to the current directory."""
  path = resolve_path(path, "experiment file")
  module = import_file(path, f"_sweep_experiment_{os.path.splitext(os.path.basename(path))[0]}")
  if not callable(getattr(module, "sweep", None)):
    raise SweepError(f"{path} defines no sweep(add) function; add one that calls "
                     "add(name=..., **overrides) per run")
  config = getattr(module, "CONFIG", DEFAULT_CONFIG)
  base = getattr(module, "BASE", None) or {}
  if not isinstance(config, str) or not isinstance(base, dict):
    raise SweepError(f"{path}: CONFIG must be a path string ('configs/x.py[:arg]') and BASE a "
                     f"dict of overrides, got {type(config).__name__} and {type(base).__name__}")
  base = {canonical_key(k): v for k, v in base.items()}
  return Experiment(path=path, config_file=config, base=base, doc=module.__doc__ or "",
                    sweep_fn=module.sweep)


def absolute_config(config: str) -> str:
  """'path.py[:arg]' with the path made absolute against the current directory."""
  path, sep, arg = config.partition(":")
  return resolve_path(path, "config file") + sep + arg


def expand(experiment: Experiment | str, workdir: str, *, config: str | None = None,
           extra: dict[str, Any] | None = None, only: Sequence[str] | None = None) -> list[Run]:
  """The experiment's runs, each resolved and checked against the base config.

  config replaces the file's CONFIG; extra are overrides applied after BASE and each run's own
  (a smoke test: {'train.steps': 5}); only keeps the runs named or matched by a shell pattern
  (a name or pattern matching nothing is an error). Relative config and experiment paths are
  relative to the current directory. Every mistake is a SweepError naming the run.
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
      raise SweepError(f"add() needs name='...', got {name!r}")
    if not _NAME_RE.match(name):
      raise SweepError(f"run name {name!r}: use letters, digits and _ . + = - "
                       "(it becomes a directory and a shell word)")
    if name in names:
      raise SweepError(f"duplicate run name {name!r} in {experiment.path}")
    if tags is not None and not isinstance(tags, dict):
      raise SweepError(f"run {name!r}: tags must be a dict of extra results.csv columns, "
                       f"got {tags!r}")
    names.add(name)
    own: dict[str, Any] = {}
    for k, v in overrides.items():
      key = canonical_key(k)
      if key in own:
        raise SweepError(f"run {name!r}: {key!r} given twice")
      own[key] = v.item() if hasattr(v, "item") and hasattr(v, "dtype") else v  # numpy scalars
    merged = dict(experiment.base)
    merged.update(own)
    merged.update({canonical_key(k): v for k, v in (extra or {}).items()})
    cfg = copy.deepcopy(base_config)
    try:
      for k, v in merged.items():
        set_override(cfg, k, v)
      validate(cfg)  # what run_train would refuse at its start, refused before any run starts
    except (SweepError, ConfigError) as e:
      raise SweepError(f"run {name!r} of {experiment.path}: {e}") from None
    runs.append(Run(name=name, overrides=merged, config=cfg,
                    workdir=_join(workdir, name), config_file=config_file,
                    tags=dict(tags or {}), sweep=experiment.name))

  experiment.sweep_fn(add)
  if not runs:
    raise SweepError(f"{experiment.path}: sweep(add) added no runs")
  if only:
    # Names or shell-style patterns ('C2e11_*').
    unmatched = [pat for pat in only if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
    if unmatched:
      raise SweepError(f"--only names not in the sweep: {unmatched}; runs: {sorted(names)}")
    runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, pat) for pat in only)]
  return runs


def is_remote(path: str) -> bool:
  return "://" in path


def _join(workdir: str, name: str) -> str:
  return f"{workdir.rstrip('/')}/{name}" if is_remote(workdir) else os.path.join(workdir, name)
