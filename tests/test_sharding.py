"""Meshes, logical-axis rules and sharded training on 8 CPU devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from llama_jax import config as config_lib
from llama_jax import sharding, train
from llama_jax.errors import UserError
from tests import training_process
from tests.test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 1, 4)]


def _config(mesh, **kw):
  # Sizes every mesh above divides: heads 8, kv heads 4, ffn 96, vocab 128, dim 64.
  c = tiny_config(**kw)
  c.model.update(dict(dim=64, n_heads=8, n_kv_heads=4, ffn_dim=96, vocab_size=128))
  c.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
  return c


def _losses(mesh, steps=3):
  c = _config(mesh)
  setup = train.make_setup(c)
  state = train.init_state(setup, seed=0)
  step_fn = train.make_train_step(setup)
  x = np.random.default_rng(0).integers(0, 128, (8, 25)).astype(np.int32)
  out = []
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    for _ in range(steps):  # the same batch each step, so the loss must fall
      batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
      batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in batch.items()}
      state, stats = step_fn(state, batch)
      out.append(float(stats["loss"]))
  return out


@pytest.mark.slow
def test_losses_equal_across_mesh_shapes():
  ref = _losses(MESHES[0])
  assert ref[-1] < ref[0]
  for mesh in MESHES[1:]:
    np.testing.assert_allclose(_losses(mesh), ref, rtol=1e-5, err_msg=str(mesh))


@pytest.mark.parametrize("mesh", [(1, 8, 1), (1, 4, 2)])
def test_param_and_optimizer_bytes_are_split_evenly(mesh):
  setup = train.make_setup(_config(mesh))
  total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(setup.abstract_state["params"]))
  p = sharding.bytes_per_device(setup.abstract_state["params"], setup.state_shardings["params"])
  o = sharding.bytes_per_device(setup.abstract_state["opt_state"],
                                setup.state_shardings["opt_state"])
  # AdamW keeps two moments per parameter: (params + opt) per device ~ 3 * total / 8.
  assert abs((p + o) - 3 * total / 8) <= 0.05 * 3 * total / 8


def test_state_is_created_sharded_and_follows_the_rules():
  setup = train.make_setup(_config((1, 4, 2)))
  state = train.init_state(setup, seed=0)
  names = nnx.to_pure_dict(nnx.get_partition_spec(
      nnx.state(nnx.eval_shape(lambda: train.Llama(setup.model_cfg, rngs=nnx.Rngs(0))))))
  # Logical names of each parameter, as declared in model.py (no rules applied).
  flat_state = dict(jax.tree_util.tree_flatten_with_path(state["params"])[0])
  for path, arr in flat_state.items():
    logical = _get(names, path)
    expected = sharding.logical_to_spec(logical, setup.rules)
    assert arr.sharding.spec == expected, (path, arr.sharding.spec, expected)
    n_split = np.prod([setup.mesh.shape[a] for axes in expected if axes
                       for a in ((axes,) if isinstance(axes, str) else axes)])
    assert arr.addressable_shards[0].data.size * n_split == arr.size
  wq = state["params"]["layers"]["attn"]["wq"]
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert wq.addressable_shards[0].data.size == wq.size // 8  # no device holds it all


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tuple(tree)


@pytest.mark.parametrize("mesh, match", [
    ((3, 1, 1), r"data\*fsdp\*tensor = 3\*1\*1 = 3 but there are 8 devices"),
    ((3, -1, 1), "multiply to 3, which does not divide the 8 devices"),
])
def test_meshes_that_do_not_fit_the_devices(mesh, match):
  """What needs the device count is checked where the devices are: the config alone is valid."""
  c = _config(mesh)
  config_lib.validate(c)
  with pytest.raises(sharding.ShardingError, match=match):
    train.make_setup(c)
  assert isinstance(sharding.ShardingError("x"), UserError)


def test_a_mesh_wrong_on_any_devices_is_a_config_error():
  """Two -1 axes are wrong whatever the devices: config.validate's to refuse, before a mesh."""
  with pytest.raises(config_lib.ConfigError, match="only one mesh axis may be -1"):
    config_lib.validate(_config((-1, -1, 1)))
  config_lib.validate(_config((-1, 1, 1)))  # the control: one -1 is fine


def test_indivisible_sizes_name_field_and_axis():
  c = _config((1, 1, 8))
  c.model.ffn_dim = 100
  with pytest.raises(sharding.ShardingError, match="model.ffn_dim=100 is not divisible by 8"):
    train.make_setup(c)
  c = _config((1, 1, 8))
  c.model.update(dict(n_heads=12, dim=96))
  with pytest.raises(sharding.ShardingError, match=r"model.n_heads=12 is not divisible by 8.*'heads'"):
    train.make_setup(c)
  c = _config((1, 1, 8))
  c.model.vocab_size = 100
  with pytest.raises(sharding.ShardingError, match="model.vocab_size=100"):
    train.make_setup(c)
  c = _config((1, 8, 1))
  c.data.batch_size = 12
  with pytest.raises(sharding.ShardingError, match="data.batch_size=12"):
    train.make_setup(c)
  c = _config((1, 8, 1))
  c.model.update(dict(dim=60, n_heads=6, n_kv_heads=2, ffn_dim=96))
  with pytest.raises(sharding.ShardingError, match="model.dim=60"):
    train.make_setup(c)


def test_kv_heads_fall_back_to_replication_with_a_warning():
  c = _config((1, 1, 8))
  c.model.n_kv_heads = 2
  warnings = []
  setup = train.make_setup(c, log=warnings.append)
  assert any("replicating kv heads" in w for w in warnings)
  wk = setup.state_shardings["params"]["layers"]["attn"]["wk"]
  assert wk.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


ARGS = ["--config=configs/base.py:tiny", "--config.data.name=synthetic",
        "--config.data.seq_len=24", "--config.data.batch_size=8", "--config.model.dim=64",
        "--config.model.n_heads=8", "--config.model.n_kv_heads=4", "--config.model.ffn_dim=96",
        "--config.model.vocab_size=128", "--config.train.steps=4",
        "--config.train.log_every=1", "--config.train.eval_every=4",
        "--config.train.eval_steps=1", "--config.train.checkpoint_every=4",
        "--config.train.sample_tokens=0", "--config.mesh.data=2", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2"]


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _loss_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {d["step"]: d["loss"] for d in map(json.loads, f) if "loss" in d}


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  """2 processes x 4 CPU devices (gloo collectives) train the same losses as 1 x 8."""
  one = tmp_path / "one"
  subprocess.run([sys.executable, "run_train.py", f"--workdir={one}", *ARGS], cwd=ROOT,
                 env=_env(8), check=True, capture_output=True, timeout=600)
  two = tmp_path / "two"
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "run_train.py", f"--workdir={two}", *ARGS,
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  training_process.finish(*procs)  # both processes' pipes read at once
  a, b = _loss_lines(one), _loss_lines(two)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  for s in a:
    assert b[s] == pytest.approx(a[s], rel=1e-5)
  assert os.path.isdir(two / "checkpoints" / "4")
