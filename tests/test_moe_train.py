"""Training MoE models on 8 CPU devices: the losses equal across expert-parallel meshes, and one
run through the whole loop (metrics, checkpoints, an exact resume of the router bias, evaluate
and generate on its workdir)."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from llama_jax import checkpoint as ckpt_lib
from llama_jax import config as config_lib
from llama_jax import data, train
from llama_jax.checkpoint import restore_params
from llama_jax.evaluate import evaluate
from llama_jax.generate.decode import sample_text
from llama_jax.model import moe
from tests.test_train import tiny_config

MOE = dict(dim=64, n_heads=8, n_kv_heads=4, ffn_dim=96, vocab_size=128, moe_experts=8,
           moe_top_k=2, moe_ffn_dim=32, moe_shared_experts=1, moe_z_loss=1e-3,
           moe_bias_rate=1e-3)


def _config(mesh, **model):
  c = tiny_config()
  c.model.update({**MOE, **model})
  c.mesh.update(dict(zip(("data", "fsdp", "expert", "tensor"), mesh)))
  config_lib.validate(c)
  return c


def _run(mesh, steps=3, **model):
  """(losses, aux losses, final router bias) of `steps` steps on one fixed batch."""
  setup = train.make_setup(_config(mesh, **model))
  state = train.init_state(setup, seed=0)
  step_fn = train.make_train_step(setup)
  x = np.random.default_rng(0).integers(0, 128, (8, 25)).astype(np.int32)
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
  losses = []
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in batch.items()}
    for _ in range(steps):
      state, stats = step_fn(state, batch)
      losses.append((float(stats["loss"]), float(stats["moe_aux_loss"]),
                     float(stats["moe_z_loss"]), float(stats["moe_load_imbalance"])))
  return np.asarray(losses), np.asarray(state["params"]["layers"]["mlp"][moe.BIAS])


@pytest.mark.slow
def test_moe_losses_equal_across_expert_meshes():
  """(data, fsdp, expert, tensor) on 8 devices: expert 1, 4 and 2 beside data, fsdp and tensor
  give the same losses, balancing losses and router bias within 1e-5 (the all-gather /
  reduce-scatter dispatch of llama_jax.model.expert_parallel, the shared experts, the bias
  update from the global load); top-1 routing is the control that the check can fail."""
  ref, ref_bias = _run((8, 1, 1, 1))
  assert ref[-1, 0] < ref[0, 0]  # the same batch each step: the loss falls
  assert np.abs(ref_bias).max() > 0  # the bias moved
  for mesh in [(2, 1, 4, 1), (1, 2, 2, 2)]:
    got, bias = _run(mesh)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=str(mesh))
    np.testing.assert_allclose(bias, ref_bias, atol=1e-7, err_msg=str(mesh))
  control, _ = _run((2, 1, 4, 1), moe_top_k=1)
  assert np.abs(control[:, 0] - ref[:, 0]).max() > 1e-3


def _events_text(workdir) -> bytes:
  folder = os.path.join(workdir, "tensorboard")
  return b"".join(open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder))


@pytest.mark.slow
def test_moe_run_resumes_exactly_and_its_workdir_evaluates_and_generates(tmp_path):
  """One MoE run (experts over expert=2 beside data=4, capacity 1.25, the router bias on):
  metrics.jsonl and TensorBoard carry the balancing losses, the load imbalance and the dropped
  fraction; the step-2 checkpoint trained on for two steps is bitwise the step-4 one (params,
  router bias, optimizer state); evaluate and generate read the workdir."""
  workdir = str(tmp_path / "run")
  c = _config((4, 1, 2, 1), moe_capacity_factor=1.25)
  c.train.update(dict(steps=4, checkpoint_every=2, eval_every=4, keep_checkpoints=5,
                      sample_tokens=6))
  summary = train.train(c, workdir, log=lambda *a: None)
  assert summary["step"] == 4 and summary["sample"]
  lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  logged = [x for x in lines if "loss" in x]
  assert [x["step"] for x in logged] == [1, 2, 3, 4]
  for x in logged:
    assert x["moe_load_imbalance"] >= 1.0 and x["moe_aux_loss"] > 0 and x["moe_z_loss"] > 0
    assert 0 < x["moe_dropped_frac"] < 1 and x["moe_load_imbalance_max"] >= 1.0
  events = _events_text(workdir)
  assert b"moe_load_imbalance" in events and b"moe_dropped_frac" in events

  setup = train.make_setup(c)
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  try:
    state2, state4 = (ckpt.restore(s, setup.abstract_state) for s in (2, 4))
  finally:
    ckpt.close()
  assert np.abs(np.asarray(state4["params"]["layers"]["mlp"][moe.BIAS])).max() > 0
  assert not moe.has_bias(state4["opt_state"])  # outside the optimizer
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    _, loader, _ = data.make_loaders(c, setup.batch_sharding,
                                     tokenizer=data.tokenizer_from_path(workdir))
    step_fn = train.make_train_step(setup)
    state, batches = state2, loader.iterate(2)
    for _ in range(2):
      state, _ = step_fn(state, next(batches)[1])
    batches.close()
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state4)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  model, config, step = restore_params(workdir)
  assert step == 4 and config.model.moe_experts == 8
  _, _, eval_loader = data.make_loaders(config, tokenizer=data.tokenizer_from_path(workdir))
  result = evaluate(model, eval_loader, c.train.eval_steps)  # the run's last eval, off the mesh
  assert result["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
  text = sample_text(model, data.tokenizer_from_path(workdir), "ab", max_new_tokens=5)
  assert text.startswith("ab")
