"""Mixture-of-experts layers (llama_jax.model.moe) on one device: the three grouped-matmul
implementations against each other, routing, capacity, the balancing bias, the layer placement,
sizes, decoding, and the one-line errors of bad MoE configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import config as config_lib
from llama_jax.model import moe, sizes
from llama_jax.model.config import ModelConfig
from llama_jax.model.llama import Llama, abstract_model, init_cache
from tests.test_train import tiny_config

# Distinct sizes: 5 experts (3 of them used below), dim 24, expert hidden 20.
N, K, D, F, G = 13, 2, 24, 20, 5
CFG = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=88, vocab_size=104,
                  max_seq_len=32, moe_experts=6, moe_top_k=2, moe_ffn_dim=40)


def _experts_inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
  # Distinct experts per token, as top-k picks them. Experts 2 and 4 get no token; id 7 is
  # another shard's (outside [0, G)) and adds nothing.
  ids = jnp.asarray([rng.choice([0, 1, 3, 7], K, replace=False) for _ in range(N)], jnp.int32)
  in_scale = jnp.asarray(rng.uniform(0.5, 1.5, (N, K)), jnp.float32)
  combine = jnp.asarray(rng.uniform(0.1, 1.0, (N, K)), jnp.float32)
  w = [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), jnp.float32)
       for s in ((G, D, F), (G, D, F), (G, F, D))]
  return x, ids, in_scale, combine, w


def _ffn(impl):
  def f(x, in_scale, combine, wg, wu, wd, ids):
    return moe.expert_ffn(x, ids, in_scale, combine, wg, wu, wd, impl)
  return f


def _ground_truth(x, ids, in_scale, combine, wg, wu, wd):
  """Token by token: sum_j c_j * down(silu(s_j x W_g) * (s_j x W_u)) over the local experts."""
  x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
  out = np.zeros_like(x)
  for n in range(x.shape[0]):
    for j in range(ids.shape[1]):
      e = int(ids[n, j])
      if e < wg.shape[0]:
        xin = x[n] * float(in_scale[n, j])
        gate = xin @ wg[e]
        out[n] += float(combine[n, j]) * ((gate / (1 + np.exp(-gate)) * (xin @ wu[e])) @ wd[e])
  return out


def test_grouped_matmul_implementations_agree_forward_and_backward():
  """ragged (jax.lax.ragged_dot) and megablox (the Pallas TPU kernel, interpret mode here)
  equal the dense reference within fp32 tolerance, outputs and gradients of every input, with
  experts that get no token and ids of another shard; a loop over tokens is the ground truth.
  With one local expert of k = 2 the sorted rows are cut to N (a shard's own rows only)."""
  x, ids, in_scale, combine, (wg, wu, wd) = _experts_inputs()
  args = (x, in_scale, combine, wg, wu, wd, ids)
  want = _ground_truth(x, ids, in_scale, combine, wg, wu, wd)
  loss = lambda impl: lambda *a: jnp.sum(jnp.sin(_ffn(impl)(*a)))  # noqa: E731
  grads = {}
  for impl in ("dense", "ragged", "megablox"):
    out = np.asarray(jax.jit(_ffn(impl))(*args))
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=0, err_msg=impl)
    grads[impl] = jax.jit(jax.grad(loss(impl), argnums=tuple(range(6))))(*args)
  for impl in ("ragged", "megablox"):
    for i, (g, ref) in enumerate(zip(grads[impl], grads["dense"])):
      np.testing.assert_allclose(g, ref, atol=2e-5, rtol=1e-5, err_msg=f"{impl} grad {i}")
  # Empty experts get exactly zero gradient; the used ones do not.
  for g in grads["ragged"][3:]:
    assert np.all(np.asarray(g)[[2, 4]] == 0) and np.abs(np.asarray(g)[[0, 1, 3]]).min() > 0
  one = (x, in_scale, combine, wg[:1], wu[:1], wd[:1], ids)  # expert 0 here, the rest away
  np.testing.assert_allclose(jax.jit(_ffn("ragged"))(*one), _ground_truth(
      x, ids, in_scale, combine, wg[:1], wu[:1], wd[:1]), atol=2e-5, rtol=0)
  # The control: the check sees a wrong input (gate and up swapped).
  wrong = np.asarray(_ffn("ragged")(x, in_scale, combine, wu, wg, wd, ids))
  assert np.abs(wrong - want).max() > 1e-2


route = jax.jit(moe.route, static_argnames=("cfg", "drop"))


def test_routing_softmax_and_sigmoid():
  """softmax: top-k of the probabilities, renormalised weights on the outputs (Mixtral);
  sigmoid: top-k of the logits, the sigmoid of each chosen one on the input (Llama 4). The bias
  changes which experts are chosen, never their weights. Switch loss 1 when balanced."""
  cfg = dataclasses.replace(CFG, moe_experts=4, moe_top_k=2)
  # Two tokens, the router an identity: logits = x.
  x = jnp.asarray([[[3.0, 1.0, 0.0, -1.0], [0.0, 0.0, 2.0, 1.0]]], jnp.float32)
  w = jnp.eye(4)
  ids, in_scale, combine, partial = route(x, w, jnp.zeros(4), cfg=cfg, drop=False)
  np.testing.assert_array_equal(ids[0], [[0, 1], [2, 3]])
  p = jax.nn.softmax(x[0], axis=-1)
  np.testing.assert_allclose(combine[0, 0], p[0, :2] / p[0, :2].sum(), rtol=1e-6)
  np.testing.assert_array_equal(in_scale, 1.0)
  np.testing.assert_allclose(partial["z"], jnp.sum(jax.nn.logsumexp(x[0], -1) ** 2), rtol=1e-6)
  np.testing.assert_array_equal(partial["load"], [1, 1, 1, 1])
  stats = moe.finalize(partial, cfg)  # f_e = 1/4 each: E * sum f P = sum P / 1 ... = 1
  np.testing.assert_allclose(stats["aux"], 1.0, rtol=1e-6)

  biased, _, combine_b, _ = route(x, w, jnp.asarray([0.0, 0.0, 10.0, 0.0]), cfg=cfg,
                                     drop=False)
  np.testing.assert_array_equal(biased[0, 0], [2, 0])  # expert 2 now chosen first ...
  np.testing.assert_allclose(combine_b[0, 0], p[0, [2, 0]] / p[0, [2, 0]].sum(), rtol=1e-6)

  sig = dataclasses.replace(cfg, moe_router="sigmoid", moe_top_k=1)
  ids, in_scale, combine, _ = route(x, w, jnp.zeros(4), cfg=sig, drop=False)
  np.testing.assert_array_equal(ids[0, :, 0], [0, 2])
  np.testing.assert_allclose(in_scale[0, :, 0], jax.nn.sigmoid(jnp.asarray([3.0, 2.0])), rtol=1e-6)
  np.testing.assert_array_equal(combine, 1.0)


def test_capacity_drops_later_positions_per_sequence():
  """All 6 tokens of each sequence pick experts 0 and 1; capacity ceil(1.0 * 6 * 2 / 4) = 3
  keeps positions 0-2 and drops 3-5 in every row, whatever the other rows do."""
  cfg = dataclasses.replace(CFG, moe_experts=4, moe_top_k=2, moe_capacity_factor=1.0)
  assert moe.capacity(cfg, 6) == 3
  x = jnp.tile(jnp.asarray([2.0, 1.0, 0.0, 0.0]), (2, 6, 1))
  ids, _, combine, partial = route(x, jnp.eye(4), jnp.zeros(4), cfg=cfg, drop=True)
  kept = np.asarray(combine > 0)
  assert kept[:, :3].all() and not kept[:, 3:].any()
  assert moe.finalize(partial, cfg)["dropped"] == pytest.approx(0.5)
  _, _, combine, _ = route(x, jnp.eye(4), jnp.zeros(4), cfg=cfg, drop=False)
  assert np.all(np.asarray(combine) > 0)  # the control: dropless keeps everything


def test_bias_update_and_the_trainable_split():
  params = {"layers": {"mlp": {"w_gate": jnp.ones(3), moe.BIAS: jnp.zeros((2, 4))}},
            "embed": jnp.ones(2)}
  trained = moe.trainable(params)
  assert moe.BIAS not in trained["layers"]["mlp"] and "w_gate" in trained["layers"]["mlp"]
  back = moe.with_trainable(params, jax.tree.map(lambda a: a + 1, trained))
  np.testing.assert_array_equal(back["layers"]["mlp"][moe.BIAS], 0.0)
  np.testing.assert_array_equal(back["embed"], 2.0)
  load = jnp.asarray([[5.0, 1.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]])  # means 3 and 3
  out = moe.update_bias(params, {"load": load}, dataclasses.replace(CFG, moe_bias_rate=0.5))
  np.testing.assert_array_equal(out["layers"]["mlp"][moe.BIAS],
                                [[-0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  assert moe.update_bias(params, {"load": load}, CFG) is params  # rate 0: untouched
  dense = {"a": jnp.ones(2)}
  assert moe.trainable(dense) is dense


def _count(cfg):
  return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(
      nnx.state(abstract_model(cfg), nnx.Param)))


@pytest.mark.slow
def test_layer_placement_sizes_scan_and_decode():
  """moe_every=2 makes layers 1 and 3 MoE (the later of each pair, as HF's Llama 4); the
  analytic counts equal the traced model's; scan equals loop; a cached decode equals the full
  forward (dropless, shared experts and the sigmoid router included)."""
  cfg = dataclasses.replace(CFG, n_layers=4, moe_every=2, moe_shared_experts=1,
                            moe_router="sigmoid", moe_top_k=1)
  assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
  assert sizes.count_params(cfg) == _count(cfg)
  d, e, f, v = 48, 6, 40, 104
  attn = 2 * d * 48 + 2 * d * 24  # q, o [48 x 48]; k, v [48 x 24]
  active = 4 * (attn + 2 * d) + 2 * 3 * d * 88 + 2 * (d * e + 3 * d * f * 2) + d + 2 * v * d
  assert sizes.active_params(cfg) == active
  assert sizes.count_params(cfg) == active + 2 * 3 * d * f * (e - 1)
  flops = sizes.forward_flops_per_token(cfg, 16)
  assert flops == 4 * (2 * attn + 2 * 2 * 48 * 16) + 2 * 2 * 3 * d * 88 + 2 * (
      2 * d * e + 2 * 3 * d * f * 2) + 2 * d * v
  every = dataclasses.replace(CFG, moe_experts=8, moe_top_k=2)
  assert sizes.count_params(every) == _count(every)

  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 104, (2, 8)), jnp.int32)
  model = nnx.jit(lambda: Llama(cfg, rngs=nnx.Rngs(0)))()  # one compile, not one per op
  full, stats = nnx.jit(lambda m, t: m(t, return_moe_stats=True))(model, tokens)
  assert stats["load"].shape == (2, 6) and float(stats["load"].sum()) == 2 * 16
  # The same parameters run as a Python loop over the layers (scan_layers only changes that).
  loop = nnx.merge(nnx.split(abstract_model(dataclasses.replace(cfg, scan_layers=False)))[0],
                   nnx.state(model))

  @nnx.jit
  def loop_and_decode(model, loop, tokens):  # the loop; a 6-token prefill, 2 single steps
    logits, cache = model(tokens[:, :6], cache=init_cache(cfg, 2, 8))
    steps = [logits]
    for t in range(6, 8):
      logits, cache = model(tokens[:, t:t + 1], cache=cache)
      steps.append(logits)
    return loop(tokens), jnp.concatenate(steps, axis=1)
  looped, decoded = loop_and_decode(model, loop, tokens)
  np.testing.assert_allclose(looped, full, atol=1e-5, rtol=0)
  np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("updates,match", [
    (dict(moe_experts=4, moe_top_k=5), "model.moe_top_k=5 must be between 1 and"),
    (dict(moe_experts=4, moe_router="topk"), "model.moe_router='topk' is not one of"),
    (dict(moe_experts=4, moe_impl="triton"), "model.moe_impl='triton' is not one of"),
    (dict(moe_experts=4, moe_capacity_factor=-1.0), "model.moe_capacity_factor=-1.0 must be"),
    (dict(moe_experts=4, moe_aux_loss=-0.1), "model.moe_aux_loss=-0.1 must be >= 0"),
    (dict(moe_experts=4, moe_bias_rate=-1e-3), "model.moe_bias_rate=-0.001 must be >= 0"),
    (dict(moe_top_k=1), "model.moe_top_k=1 is set on a dense model"),
    (dict(moe_impl="dense"), "model.moe_impl='dense' is set on a dense model"),
    (dict(moe_experts=4, moe_every=3), "model.moe_every=3 must be a positive divisor"),
    (dict(moe_experts=4, moe_impl="megablox", dim=128, n_heads=4, n_kv_heads=2),
     "moe_impl='megablox' tiles model.moe_ffn_dim (or ffn_dim)=88 by 128"),
    (dict(moe_experts=4, mlp="gelu"), "the experts of an MoE model are SwiGLU"),
    (dict(moe_experts=6, mesh_expert=4), "model.moe_experts=6 is not divisible by mesh.expert=4"),
    (dict(mesh_expert=2), "mesh.expert=2 splits the experts of an MoE model"),
    (dict(moe_experts=4, lora_rank=4), "lora.rank > 0 on an MoE model"),
])
def test_bad_moe_config_is_one_line(updates, match):
  c = tiny_config()
  c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  if "mesh_expert" in updates:
    c.mesh.expert = updates.pop("mesh_expert")
  if "lora_rank" in updates:
    c.lora.rank = updates.pop("lora_rank")
  c.model.update(updates)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert match in str(e.value) and "\n" not in str(e.value), str(e.value)
  c = tiny_config(**{"model.moe_experts": 4})  # the control: a valid MoE config passes
  c.mesh.update(dict(data=-1, fsdp=1, tensor=1, expert=2))
  config_lib.validate(c)


def test_a_population_refuses_moe_in_one_line():
  from llama_jax.population.members import PopulationError, check_members
  c = tiny_config(**{"model.moe_experts": 4})
  with pytest.raises(PopulationError, match="MoE runs .* cannot train as a population"):
    check_members([c, c], ["a", "b"])


def test_mixtral_preset_has_the_published_size():
  """configs/mixtral_8x7b.py: Mistral's 46.7B parameters, 12.9B active (two of eight experts):
  32 x (attention 2*4096^2 + 2*4096*1024, router 4096*8, experts 8 x 3*4096*14336, 2 norms)
  + 2 x 32000*4096 + 4096 = 46,702,792,704; active with 2 experts = 12,879,925,248."""
  from configs import mixtral_8x7b
  from llama_jax.model.config import SIZES
  config = mixtral_8x7b.get_config()
  config_lib.validate(config)
  for key, value in SIZES["mixtral_8x7b"].items():
    assert config.model[key] == value, key
  cfg = ModelConfig.from_dict(config.model)
  assert sizes.count_params(cfg) == 46_702_792_704
  assert sizes.active_params(cfg) == 12_879_925_248
  assert config.mesh.expert == 8 and cfg.moe_impl == "megablox"


def test_expert_parallel_plan_follows_the_mesh_and_rules():
  """Where an MoE layer's operands are split comes from the active mesh and the resolved rules
  (nothing compiled): experts over expert, rows over the batch axes, hidden over tensor; a
  batch the axes do not divide (a decoding row) stays whole; no mesh, no split."""
  from llama_jax import sharding, train
  from llama_jax.model import expert_parallel
  c = tiny_config(**{"model.moe_experts": 4})
  c.mesh.update(dict(data=1, fsdp=2, expert=2, tensor=2))
  mesh = sharding.make_mesh(c.mesh)
  assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
  rules = sharding.resolve_rules(c, ModelConfig.from_dict(c.model), mesh)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    plan = expert_parallel.plan_for(8)
    assert (plan.batch, plan.expert, plan.mlp) == (("fsdp", "expert"), ("expert",), ("tensor",))
    assert plan.split_tokens and plan.platform == "cpu"
    one = expert_parallel.plan_for(1)
    assert one.batch == () and not one.split_tokens and one.expert == ("expert",)
  assert expert_parallel.plan_for(8).is_local
  dense = tiny_config()  # the control: at mesh.expert=1 there is no expert axis at all
  assert "expert" not in sharding.make_mesh(dense.mesh).axis_names
  assert train.make_setup(dense).batch_sharding.spec == jax.sharding.PartitionSpec(
      ("data", "fsdp"), None)
