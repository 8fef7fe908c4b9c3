"""The training loop, optimizer, metrics and config checks (in process, on 8 CPU devices)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import base
from llama_jax import config as config_lib
from llama_jax import metrics, optim, train
from llama_jax.model import sizes
from llama_jax.model.llama import Llama, abstract_model
from llama_jax.model.config import ModelConfig


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """A tiny synthetic-data run with distinct sizes: dim 48, 3 heads... every shape differs."""
  c = base.get_config("tiny")
  c.model.update(dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=88, vocab_size=104,
                      max_seq_len=32))
  c.data.update(dict(name="synthetic", seq_len=24, batch_size=8))
  c.train.update(dict(steps=6, log_every=1, eval_every=3, eval_steps=2, checkpoint_every=3,
                      sample_tokens=0))
  c.optim.update(dict(lr=1e-2, warmup_steps=2))
  c.mesh.update(dict(data=2, fsdp=2, tensor=2))
  for k, v in overrides.items():
    section, key = k.split(".")
    c[section][key] = v
  return c


# ---------------------------------------------------------------------------- optimizer


def test_schedules_values():
  o = base.get_config().optim
  o.update(dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2))
  o.schedule = "cosine"
  s = optim.make_schedule(o, 110)
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # cosine half-way
  assert float(s(110)) == pytest.approx(0.1, rel=1e-5)
  o.schedule = "linear"
  s = optim.make_schedule(o, 110)
  assert float(s(60)) == pytest.approx(0.55, rel=1e-5) and float(s(110)) == pytest.approx(0.1)
  o.schedule = "constant"
  assert float(optim.make_schedule(o, 110)(100)) == pytest.approx(1.0)
  o.schedule = "wsd"  # stable until step 88 (= 110 - 20% of 110), then linear to 0.1
  s = optim.make_schedule(o, 110)
  assert float(s(50)) == pytest.approx(1.0) and float(s(88)) == pytest.approx(1.0)
  assert float(s(99)) == pytest.approx(0.55, rel=1e-5) and float(s(110)) == pytest.approx(0.1)
  # An unknown name is config.validate's to refuse (test_config_errors); unvalidated, it is a
  # bug, never a silent fallback to one of the schedules.
  o.schedule = "bogus"
  with pytest.raises(AssertionError, match="unvalidated optim.schedule='bogus'"):
    optim.make_schedule(o, 10)


@pytest.mark.slow
def test_decay_mask_skips_norms_and_embeddings():
  cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, vocab_size=50,
                    norm="layer")
  params = nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(0))))
  mask = optim.decay_mask(params, decay_embeddings=False)
  assert mask["layers"]["attn"]["wq"] and mask["layers"]["mlp"]["w_down"] and mask["lm_head"]
  assert not mask["layers"]["attn_norm"]["scale"] and not mask["layers"]["attn_norm"]["bias"]
  assert not mask["final_norm"]["scale"] and not mask["embed"]
  assert optim.decay_mask(params, decay_embeddings=True)["embed"]
  # Decay applied through the optimizer: a zero gradient shrinks only masked-in weights.
  o = base.get_config().optim
  o.update(dict(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, clip_norm=0.0))
  tx = optim.make_optimizer(o, 10)
  zero = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.abs(upd["final_norm"]["scale"]).max()) == 0.0
  assert float(jnp.abs(upd["embed"]).max()) == 0.0
  np.testing.assert_allclose(upd["lm_head"], -0.1 * 0.5 * params["lm_head"], rtol=1e-6)


def test_global_norm_clipping():
  """Clipped to norm 1, gradients [300,400] then [3,4] are the same direction and size, so
  Adam's second update is exactly -lr*sign; unclipped, the large first gradient dominates the
  second moment and the update is smaller."""
  o = base.get_config().optim
  o.update(dict(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, eps=1e-12,
                b1=0.9, b2=0.999))
  p = {"w": jnp.ones((3,))}
  grads = [{"w": jnp.array([300.0, 400.0, 0.0])}, {"w": jnp.array([3.0, 4.0, 0.0])}]

  def second_update(clip):
    o.clip_norm = clip
    tx = optim.make_optimizer(o, 10)
    s = tx.init(p)
    for g in grads:
      upd, s = tx.update(g, s, p)
    return np.asarray(upd["w"])

  np.testing.assert_allclose(second_update(1.0), [-1.0, -1.0, 0.0], atol=1e-5)
  # Unclipped, first coordinate: m = (0.09*300 + 0.1*3) / (1 - 0.9^2) = 143.68,
  # v = (0.999*0.001*300^2 + 0.001*3^2) / (1 - 0.999^2) = 44982, update = -m/sqrt(v).
  expected = -(27.3 / 0.19) / np.sqrt(89.919 / (1 - 0.999**2))
  np.testing.assert_allclose(second_update(0.0)[0], expected, rtol=1e-4)


# ---------------------------------------------------------------------------- train step


def _grads_and_update(config, batch):
  setup = train.make_setup(config)
  state = train.init_state(setup, seed=0)
  step = train.make_train_step(setup)
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in batch.items()}
    new_state, stats = step(state, batch)
  return jax.device_get(new_state["params"]), jax.device_get(stats)


@pytest.mark.slow
def test_grad_accumulation_equals_large_batch():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 104, (8, 25)).astype(np.int32)
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
  c1 = tiny_config(**{"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1})
  c4 = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 4, "optim.grad_accum": 4})
  p1, s1 = _grads_and_update(c1, batch)
  p4, s4 = _grads_and_update(c4, batch)
  assert s1["loss"] == pytest.approx(s4["loss"], rel=1e-5)
  assert s1["grad_norm"] == pytest.approx(s4["grad_norm"], rel=1e-4)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_train_in_process_writes_metrics_and_checkpoints(tmp_path):
  summary = train.train(tiny_config(), str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  steps = [l for l in lines if "loss" in l]
  assert [l["step"] for l in steps] == [1, 2, 3, 4, 5, 6]
  for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mfu_causal_half"):
    assert all(np.isfinite(l[key]) for l in steps), key
  # The causal-half convention counts fewer FLOPs per token (model.sizes), so reads lower.
  assert all(0 < l["mfu_causal_half"] < l["mfu"] for l in steps if l["tokens_per_s"] > 0)
  assert [l["step"] for l in lines if "eval_loss" in l] == [0, 3, 6]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
  assert json.load(open(tmp_path / "config.json"))["model"]["dim"] == 48
  assert summary["step"] == 6 and np.isfinite(summary["eval_loss"])
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  # lr 1e30 without clipping: step 1's loss is finite (initial params), its update blows the
  # params up, so the loss of step 2 is NaN/Inf.
  c = tiny_config(**{"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.clip_norm": 0.0,
                     "optim.schedule": "constant", "train.checkpoint_every": 1})
  with pytest.raises(train.NonFiniteLossError, match="at step 2"):
    train.train(c, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == ["1"]


@pytest.mark.slow
def test_resume_onto_a_different_mesh(tmp_path):
  """Checkpoint on 2x2x2, restore on 1x8x1 (Orbax reshards): training continues identically
  to an uninterrupted run on the first mesh."""
  full = tmp_path / "full"
  train.train(tiny_config(), str(full))
  part = tmp_path / "part"
  train.train(tiny_config(**{"train.steps": 3}), str(part))
  train.train(tiny_config(**{"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1}), str(part))
  a = {l["step"]: l["loss"] for l in map(json.loads, open(full / "metrics.jsonl")) if "loss" in l}
  b = {l["step"]: l["loss"] for l in map(json.loads, open(part / "metrics.jsonl")) if "loss" in l}
  assert sorted(b) == sorted(a)
  for s in a:
    assert b[s] == pytest.approx(a[s], rel=1e-5), s


@pytest.mark.slow
def test_refuses_resuming_a_different_model(tmp_path):
  train.train(tiny_config(**{"train.steps": 1}), str(tmp_path))
  c = tiny_config()
  c.model.dim = 64
  with pytest.raises(config_lib.ConfigError, match="model.dim"):
    train.train(c, str(tmp_path))


# ---------------------------------------------------------------------------- dropout


def test_dropout_masks_come_from_seed_and_step_and_are_off_without_a_key():
  """model.dropout's masks: the train step's key is a pure function of (train.seed, step); the
  model without a key (eval, generate, lm_eval) is the dropout-free model exactly."""
  from llama_jax.model.llama import dropout
  c = tiny_config(**{"model.dropout": 0.5})
  same = jax.random.key_data(train.dropout_key(c, 3))
  assert np.array_equal(same, jax.random.key_data(train.dropout_key(c, 3)))
  assert not np.array_equal(same, jax.random.key_data(train.dropout_key(c, 4)))
  assert train.dropout_key(tiny_config(), 3) is None  # dropout 0: no key, no masks
  x = dropout(jnp.ones((100_000,)), 0.1, train.dropout_key(c, 0))
  assert abs(float(jnp.mean(x == 0)) - 0.1) < 0.005 and abs(float(jnp.mean(x)) - 1) < 0.01
  cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=48, vocab_size=64,
                    max_seq_len=16, dropout=0.5)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  off = nnx.merge(nnx.graphdef(abstract_model(dataclasses.replace(cfg, dropout=0.0))),
                  nnx.state(model))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
  assert np.array_equal(model(tokens), off(tokens))
  on = model(tokens, dropout_rng=train.dropout_key(c, 1))
  assert np.array_equal(on, model(tokens, dropout_rng=train.dropout_key(c, 1)))
  assert np.abs(on - off(tokens)).max() > 0.1  # the control: the masks do change the logits


@pytest.mark.slow
def test_dropout_run_resumes_bitwise(tmp_path):
  """With dropout 0.1 and 2 microbatches, a run stopped at step 3 and resumed logs the losses
  (training and eval) of the uninterrupted run exactly and ends on the same parameters."""
  c = lambda **o: tiny_config(**{"model.dropout": 0.1, "optim.grad_accum": 2, **o})
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  train.train(c(), full)
  train.train(c(**{"train.steps": 3}), part)
  train.train(c(), part)
  logs = [[json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))] for d in (full, part)]
  by_step = [{(l["step"], k): l[k] for l in log for k in ("loss", "eval_loss") if k in l}
             for log in logs]
  assert len(by_step[0]) == 9 and by_step[0] == by_step[1]
  params = [_checkpointed_params(d, c()) for d in (full, part)]
  assert jax.tree.all(jax.tree.map(np.array_equal, *params))


def _checkpointed_params(workdir, config):
  from llama_jax import checkpoint
  setup = train.make_setup(config)
  ckpt = checkpoint.Checkpointer(workdir, keep=10, async_save=False)
  state = ckpt.restore(6, setup.abstract_state)
  ckpt.close()
  return jax.device_get(state["params"])


# ---------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.model.__setitem__("n_heads", 5), "model.dim=48 is not divisible by model.n_heads=5"),
    (lambda c: c.model.__setitem__("norm", "batch"), "model.norm"),
    (lambda c: c.data.__setitem__("seq_len", 64), "data.seq_len=64 exceeds model.max_seq_len"),
    (lambda c: c.data.__setitem__("batch_size", 0), "data.batch_size=0 must be positive"),
    (lambda c: c.data.__setitem__("seed", -1), "data.seed=-1 must be >= 0"),
    (lambda c: c.optim.__setitem__("grad_accum", 3), "optim.grad_accum=3"),
    (lambda c: c.train.__setitem__("stepz", 3),
     r"unknown config key 'train.stepz'; did you mean 'train.steps'\?"),
    (lambda c: c.optim.__setitem__("schedule", "cosin"), "optim.schedule"),
    (lambda c: c.optim.__setitem__("name", "sgd"), "optim.name='sgd'"),
    (lambda c: c.mesh.update(dict(data=-1, fsdp=-1)), "only one mesh axis may be -1"),
    (lambda c: c.mesh.__setitem__("tensor", 0), "mesh.tensor=0 must be positive or -1"),
    (lambda c: c.__setitem__("sharding_rules", (("embed", "fdsp"),)),
     "names mesh axis 'fdsp', which is not one of"),
])
def test_config_errors(mutate, match):
  c = tiny_config()
  config_lib.validate(c)  # the control: valid before the change
  with c.unlocked():
    mutate(c)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c)


def test_itstime_at_multiples_and_the_last_step():
  assert [s for s in range(1, 11) if train.itstime(s, 3, 10)] == [3, 6, 9, 10]
  assert [s for s in range(1, 11) if train.itstime(s, 100, 10)] == [10]
  assert [s for s in range(1, 5) if train.itstime(s, 1, 4)] == [1, 2, 3, 4]


def test_throughput_leaves_out_the_first_step_and_restarts():
  now = [100.0]  # a clock the test moves: wall time on a loaded machine is not exact
  t = metrics.Throughput(tokens_per_step=1000, clock=lambda: now[0])
  t.step(jnp.zeros(()))  # the first step (compilation): starts the clock, is not counted
  assert t.steps == 0 and t.read() == 0.0  # nothing timed yet
  for _ in range(3):
    t.step(jnp.zeros(()))
  assert t.steps == 3
  now[0] += 2.0  # the three steps took 2 s: 3 * 1000 tokens / 2 s
  assert t.read() == 1500.0
  assert t.steps == 0  # a reading restarts the count
  t.step(jnp.zeros(()))
  t.restart()  # e.g. after an eval: the step before it is not counted
  assert t.steps == 0 and t.read() == 0.0


def test_config_json_round_trip(tmp_path):
  c = tiny_config()
  c.model.rope_scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=16)
  config_lib.write(c, str(tmp_path))
  back = config_lib.read(str(tmp_path))
  assert json.loads(config_lib.to_json(back)) == json.loads(config_lib.to_json(c))
  assert back.model.rope_scaling["factor"] == 8.0
  assert tuple(back.sharding_rules) == tuple(c.sharding_rules)
  config_lib.validate(back)


# ---------------------------------------------------------------------------- metrics


def test_flops_per_token_matches_xla_count():
  """The analytic matmul count against XLA's own FLOP count of the compiled forward pass."""
  # Unrolled layers: XLA's cost analysis counts a scanned loop body once, not n_layers times.
  cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=256,
                    max_seq_len=64, scan_layers=False)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jnp.zeros((2, 64), jnp.int32)
  f = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  cost = f.lower(state, tokens).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = sizes.forward_flops_per_token(cfg, 64) * tokens.size
  # XLA also counts elementwise work (norms, softmax, rope), so it is a little higher.
  assert analytic <= cost["flops"] <= 1.25 * analytic
  assert sizes.flops_per_token(cfg, 64) == 3 * sizes.forward_flops_per_token(cfg, 64)


def test_mfu_arithmetic():
  assert metrics.mfu(1000.0, 1e9, 1e12, 2) == pytest.approx(0.5)
  assert metrics.human(1234567) == "1.23M"
