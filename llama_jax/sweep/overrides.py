"""Config files and dotted overrides for sweeps (see llama_jax.sweep).

load_config reads a config file given as 'path.py' or 'path.py:arg', as run_train does;
set_override / get_value address its leaves by dotted keys ("model.dim"), rejecting unknown
keys (with suggestions) and values of the wrong type; format_value and parse_value convert
values to and from their command-line spelling (`--config.k=v`, `--set k=v`).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = "configs/default.py"


def _ensure_importable() -> None:
  """Config files import `configs.base`, which lives at the repository root."""
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def resolve_path(path: str) -> str:
  """An existing file: as given (relative to the cwd), else relative to the repository root."""
  if os.path.isabs(path) or os.path.exists(path):
    return os.path.abspath(path)
  candidate = os.path.join(REPO_ROOT, path)
  if os.path.exists(candidate):
    return candidate
  raise FileNotFoundError(f"{path!r} not found (looked in {os.getcwd()} and {REPO_ROOT})")


def import_file(path: str, module_name: str):
  _ensure_importable()
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(config: str) -> ml_collections.ConfigDict:
  """get_config(arg) of a config file given as 'path.py' or 'path.py:arg', like run_train."""
  path, _, arg = config.partition(":")
  module = import_file(resolve_path(path), f"_sweep_config_{abs(hash(path))}")
  return module.get_config(arg or None)


def canonical_key(key: str) -> str:
  return key.replace("__", ".")


def _parent(config: ml_collections.ConfigDict, key: str) -> ml_collections.ConfigDict:
  """The section holding a dotted leaf key; an unknown key is a KeyError with suggestions."""
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts):
    where = ".".join(parts[:i]) or "config"
    if not isinstance(node, ml_collections.ConfigDict):
      raise KeyError(f"config key {key!r}: {where} is a value, not a section")
    if part not in node:
      close = difflib.get_close_matches(part, list(node.keys()), n=3)
      hint = (f"; did you mean {', '.join('.'.join(parts[:i] + [c]) for c in close)}?"
              if close else "")
      raise KeyError(f"unknown config key {key!r}: {where} has no field {part!r}{hint} "
                     f"(fields: {sorted(node.keys())})")
    if i < len(parts) - 1:
      node = node[part]
  if isinstance(node[parts[-1]], ml_collections.ConfigDict):
    raise KeyError(f"config key {key!r} is a section; override its fields one by one")
  return node


def set_override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """config.<key> = value for a dotted leaf key; unknown keys and wrong types are errors."""
  node = _parent(config, key)
  try:
    node[key.split(".")[-1]] = value
  except TypeError as e:
    raise TypeError(f"config key {key!r}: {e}") from None


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
  import ast
  current = get_value(config, canonical_key(key))
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{key}: expected true/false, got {text!r}")
    return text.lower() in ("true", "1")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  return ast.literal_eval(text)
