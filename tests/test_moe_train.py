"""Training MoE models on 8 CPU devices: the losses equal across expert-parallel meshes, one run
through the whole loop (metrics, checkpoints, an exact resume of the router bias, evaluate and
generate on its workdir), and the TPU compiler's plan of an expert-parallel megablox step."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from llama_jax import checkpoint as ckpt_lib
from llama_jax import config as config_lib
from llama_jax import data, dry_run, tpu_topology, train
from llama_jax.checkpoint import restore_params
from llama_jax.evaluate import evaluate
from llama_jax.generate.decode import sample_text
from llama_jax.model import moe, sizes
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
  mlp = state["params"]["layers"]["mlp"]
  return np.asarray(losses), np.asarray(mlp[moe.BIAS]), mlp["w_gate"].sharding.spec


@pytest.mark.slow
def test_moe_losses_equal_across_expert_meshes():
  """(data, fsdp, expert, tensor) on 8 devices: expert 1, 4 and 2 beside data, fsdp and tensor
  give the same losses, balancing losses and router bias within 1e-5 (the all-gather /
  reduce-scatter dispatch of llama_jax.model.expert_parallel, the shared experts, the bias
  update from the global load). The checks are not vacuous: the loss falls, the bias leaves 0
  and the experts are split over the expert axis (a control run would cost a compile;
  tests/test_moe.py's controls show the layer's checks can fail)."""
  ref, ref_bias, _ = _run((8, 1, 1, 1))
  assert ref[-1, 0] < ref[0, 0]  # the same batch each step: the loss falls
  assert np.abs(ref_bias).max() > 0  # the bias moved
  for mesh in [(2, 1, 4, 1), (1, 2, 2, 2)]:
    got, bias, spec = _run(mesh)
    assert spec[1] == "expert"  # [L, E, D, F]: the experts were split, the dispatch ran
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=str(mesh))
    np.testing.assert_allclose(bias, ref_bias, atol=1e-7, err_msg=str(mesh))


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
  c.train.update(dict(steps=4, checkpoint_every=2, eval_every=4, keep_checkpoints=5))
  summary = train.train(c, workdir, log=lambda *a: None)
  assert summary["step"] == 4
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


@pytest.mark.slow
@pytest.mark.skipif(not tpu_topology.have_libtpu(),
                    reason=f"libtpu (the TPU compiler) is not installed: {tpu_topology.INSTALL}")
def test_the_tpu_compiler_plans_an_expert_parallel_megablox_step():
  """The train step of an MoE model with the Pallas TPU grouped matmul (compiled, not
  interpreted) and the expert axis inside a v5p-8 slice (4 chips: fsdp 2 x expert 2): the TPU
  compiler lowers and plans it, and the dry-run record counts active parameters and FLOPs."""
  c = tiny_config()
  c.model.update(dict(dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=256,
                      max_seq_len=64, moe_experts=4, moe_top_k=2, moe_ffn_dim=128,
                      moe_impl="megablox", moe_bias_rate=1e-3))
  c.data.update(dict(seq_len=64, batch_size=8))
  c.mesh.update(dict(data=1, fsdp=2, tensor=1, expert=2))
  cfg = config_lib.validate(c)
  record = dry_run.topology_plan(c, tpu_topology.parse("v5p-8"))
  assert record["mesh"] == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 1}
  assert record["fits"] and record["device_kind"] == "TPU v5"
  assert record["params"] == sizes.count_params(cfg) > record["active_params"] == (
      sizes.active_params(cfg))
  assert record["flops_per_step"] == sizes.flops_per_token(cfg, 64) * 8 * 64
  # Experts split over expert, their embed axis over fsdp: a quarter of them on each chip.
  experts = 2 * 4 * 3 * 128 * 128 * 4  # 2 layers x 4 experts x 3 matrices, fp32
  assert record["param_bytes_per_device"] < (record["params"] * 4 - experts) + experts / 4 + 1e5


@pytest.mark.slow
def test_moe_benchmark_prints_a_record_per_implementation():
  """benchmarks/moe_step.py on a tiny MoE, one implementation (each costs a compile; that they
  agree is tests/test_moe.py's): its record, MFU on the model's active FLOPs, which exceed the
  dense model's of the same config (--dense_baseline) by the router's alone."""
  import importlib
  import sys
  folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks")
  sys.path.insert(0, folder)
  try:
    moe_step = importlib.import_module("moe_step")
  finally:
    sys.path.remove(folder)
  c = _config((8, 1, 1, 1), moe_shared_experts=0, moe_ffn_dim=48)  # 2 x 48 = ffn_dim 96
  c.data.seq_len = 16
  (r,) = moe_step.records(c, ["ragged"], steps=1, warmup=0)
  assert r["moe_impl"] == "ragged" and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
  assert r["active_params"] < r["params"] and r["moe"]["moe_experts"] == 8
  cfg = config_lib.validate(c)
  dense_model = dataclasses.replace(cfg, **{f.name: f.default for f in dataclasses.fields(cfg)
                                           if f.name.startswith("moe_")})
  # The router: 2 * 64 * 8 FLOPs a layer and token forward, x3 for training, 2 layers.
  assert r["flops_per_token"] - sizes.flops_per_token(dense_model, 16) == 3 * 2 * 2 * 64 * 8
