"""Every config file: valid against the schema, documented with its launch command."""

import glob
import importlib
import os

import pytest

from llama_jax import config as config_lib
from llama_jax.model.config import SIZES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if not p.endswith("__init__.py"))


@pytest.mark.parametrize("name", NAMES)
def test_config_validates_and_documents_its_launch(name):
  module = importlib.import_module(f"configs.{name}")
  config_lib.validate(module.get_config())
  doc = module.__doc__ or ""
  assert f"--config=configs/{name}.py" in doc, "docstring must give the launch command"
  assert "Should reach" in doc or "runnable" in doc.lower(), "docstring must say the result"


@pytest.mark.parametrize("size", [s for s in SIZES if s.startswith("llama")])
def test_presets_use_the_published_dimensions(size):
  config = importlib.import_module(f"configs.{size}").get_config()
  for key, value in SIZES[size].items():
    assert config.model[key] == value, (size, key)


def test_unknown_size_is_rejected():
  from configs import base
  with pytest.raises(ValueError, match="unknown size 'llama9_1b'"):
    base.get_config("llama9_1b")
