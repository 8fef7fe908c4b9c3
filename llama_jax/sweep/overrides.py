"""Config files and dotted overrides for sweeps (see llama_jax.sweep).

load_config reads a config file given as 'path.py' or 'path.py:arg', as run_train does;
set_override / get_value address its leaves by dotted keys ("model.dim"), rejecting unknown
keys (with suggestions) and values of the wrong type; format_value and parse_value convert
values to and from their command-line spelling (`--config.k=v`, `--set k=v`).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any

import ml_collections

from llama_jax.sweep.errors import SweepError

DEFAULT_CONFIG = "configs/default.py"


def resolve_path(path: str, what: str = "file") -> str:
  """`path` made absolute against the current directory (an absolute path is kept as it is);
  a path that is not there is a SweepError naming the directory it was looked for in."""
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(full):
    raise SweepError(f"{what} {path!r} not found in {os.getcwd()}: run the sweep from the "
                     "directory the path is relative to (the repository root for configs/ and "
                     "experiments/), or give an absolute path")
  return full


def import_file(path: str, module_name: str):
  """A Python file as a module. Config files that import `configs.base` find it as an
  installed package (setup.cfg installs configs/), so nothing here locates the repository."""
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(config: str) -> ml_collections.ConfigDict:
  """get_config(arg) of a config file given as 'path.py' or 'path.py:arg', like run_train."""
  path, _, arg = config.partition(":")
  path = resolve_path(path, "config file")
  module = import_file(path, f"_sweep_config_{abs(hash(path))}")
  if not callable(getattr(module, "get_config", None)):
    raise SweepError(f"config file {path} defines no get_config(arg=None) function")
  try:
    return module.get_config(arg or None)
  except ValueError as e:  # how config files refuse an argument (configs/base.py: a size name)
    raise SweepError(f"config {config!r}: {e}") from None


def canonical_key(key: str) -> str:
  return key.replace("__", ".")


def _parent(config: ml_collections.ConfigDict, key: str) -> ml_collections.ConfigDict:
  """The section holding a dotted leaf key; an unknown key is a SweepError with suggestions."""
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts):
    where = ".".join(parts[:i]) or "config"
    if not isinstance(node, ml_collections.ConfigDict):
      raise SweepError(f"config key {key!r}: {where} is a value, not a section")
    if part not in node:
      close = difflib.get_close_matches(part, list(node.keys()), n=3)
      hint = (f"; did you mean {', '.join('.'.join(parts[:i] + [c]) for c in close)}?"
              if close else "")
      raise SweepError(f"unknown config key {key!r}: {where} has no field {part!r}{hint} "
                     f"(fields: {sorted(node.keys())})")
    if i < len(parts) - 1:
      node = node[part]
  if isinstance(node[parts[-1]], ml_collections.ConfigDict):
    raise SweepError(f"config key {key!r} is a section; override its fields one by one")
  return node


def set_override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """config.<key> = value for a dotted leaf key; unknown keys and wrong types are errors."""
  node = _parent(config, key)
  try:
    node[key.split(".")[-1]] = value
  except TypeError as e:  # ml_collections refuses a value of another type than the field's
    raise SweepError(f"config key {key!r}: {e}") from None


def get_value(config: ml_collections.ConfigDict, key: str) -> Any:
  return _parent(config, key)[key.split(".")[-1]]


def format_value(value: Any) -> str:
  """A value as ml_collections' config_flags parses it back (`--config.k=<this>`)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return value
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (int, tuple, list, dict)) or value is None:
    return repr(value)
  return str(value)


def parse_value(config: ml_collections.ConfigDict, key: str, text: str) -> Any:
  """A command-line string for `--set key=text`, typed like the field it overrides."""
  current = get_value(config, canonical_key(key))
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise SweepError(f"--set {key}: expected true/false, got {text!r}")
    return text.lower() in ("true", "1")
  if isinstance(current, str):
    return text
  cast = (int if isinstance(current, int) else float if isinstance(current, float)
          else ast.literal_eval)
  try:
    return cast(text)
  except (ValueError, SyntaxError):
    kind = ("an integer" if cast is int else "a number" if cast is float
            else "a Python literal")
    raise SweepError(f"--set {key}: expected {kind} (the field holds "
                     f"{format_value(current)}), got {text!r}") from None
