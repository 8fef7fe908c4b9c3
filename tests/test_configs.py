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
  with pytest.raises(config_lib.ConfigError, match="unknown size 'llama9_1b'"):
    base.get_config("llama9_1b")
  with pytest.raises(ValueError, match="unknown size 'llama9_1b'"):  # still a ValueError
    config_lib.defaults("llama9_1b")


def test_the_schema_lives_in_the_package_and_base_returns_it():
  """configs/base.py is a user config over llama_jax.config.defaults, not the schema's home."""
  from configs import base
  assert base.get_config().to_dict() == config_lib.defaults().to_dict()
  assert base.get_config("tiny").to_dict() == config_lib.defaults("tiny").to_dict()
  assert config_lib.defaults("tiny").to_dict() != config_lib.defaults().to_dict()  # control
  assert config_lib.defaults().sharding_rules == config_lib.SHARDING_RULES
  for key, value in SIZES["llama2_7b"].items():
    assert config_lib.defaults("llama2_7b").model[key] == value, key


def test_command_line_overrides_are_checked_against_the_schema():
  check = config_lib.check_overrides
  check(["prog", "--config.model.dim=64", "--config.optim.lr=1e-3", "--config.data.name=c4",
         "--noconfig.model.scan_layers", "--config.model.scan_layers=false", "--workdir=x",
         "--config.train.steps", "10"])  # the control: valid keys and values pass
  with pytest.raises(config_lib.ConfigError,
                     match=r"^unknown config key 'model.dimm'; did you mean 'model.dim'\?$"):
    check(["prog", "--config.model.dimm=3"])
  with pytest.raises(config_lib.ConfigError, match="did you mean 'optim.warmup_steps'"):
    check(["prog", "--config.optim.warmup_step=3"])
  with pytest.raises(config_lib.ConfigError,
                     match=r"config key 'model.dim' takes an int, got 'abc'"):
    check(["prog", "--config.model.dim=abc"])
  with pytest.raises(config_lib.ConfigError, match=r"'optim.lr' takes a float, got 'fast'"):
    check(["prog", "--config.optim.lr=fast"])
  with pytest.raises(config_lib.ConfigError, match=r"'data.packing' takes a bool"):
    check(["prog", "--config.data.packing=maybe"])
  check(["prog", "--", "--config.model.dimm=3"])  # after `--` nothing is a flag
