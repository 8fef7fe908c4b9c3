"""mesh.context: one row's sequence split over devices in the load-balanced order, on 8 CPU
devices (llama_jax/model/context_parallel.py).

The order and its inverse; the attention of every implementation and strategy under context
2 / 4 against the unsplit attention, values and gradients (with a control: the same inputs
not put in the load-balanced order give another result); the causal blocks each device
computes, read from the compiled program; training losses of context 1 / 2 / 4 beside data,
fsdp and tensor, with and without packed documents, within 1e-5 of the unsplit run; the bad
inputs' one-line errors; rows of 131,072 tokens from the loader. The two-process case: 2
processes x 4 devices, the context axis across them.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import config as config_lib
from llama_jax import sharding, train
from llama_jax.model import attention
from llama_jax.model import context_parallel as cp
from tests.test_train import tiny_config


def _mesh(n, fsdp=1, tensor=1, data=1):
  mesh = sharding.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor, expert=1, context=n),
                            jax.devices()[:data * fsdp * tensor * n])
  return mesh, sharding.rules_on_mesh(config_lib.SHARDING_RULES, mesh)


def _qkv(t, b=2, n_heads=4, n_kv=2, h=8, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32)
             for heads in (n_heads, n_kv, n_kv))
  seg = jnp.asarray(np.cumsum(rng.random((b, t)) < 8 / t, axis=1) + 1, jnp.int32)
  return q, k, v, seg


def _split(mesh, rules, n, impl, strategy="all_gather", block=128, balanced=True, chunk=0):
  """Attention under the context mesh on inputs in their natural order (reordered in and out
  unless `balanced` is False: the control), and its q/k/v gradient of sum(out^2), each a
  function jitted under the mesh."""
  def f(q, k, v, seg):
    lb = (lambda x: cp.load_balance(x, n)) if balanced else (lambda x: x)
    nat = (lambda x: cp.natural_order(x, n)) if balanced else (lambda x: x)
    out = attention.attend(lb(q), lb(k), lb(v), segment_ids=None if seg is None else lb(seg),
                           is_causal=True, implementation=impl, block=block,
                           context_strategy=strategy, chunk=chunk)
    return nat(out)

  def under_mesh(fn):
    def run(*args):
      with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return jax.jit(fn)(*args)
    return run
  return under_mesh(f), under_mesh(_grad(f))


def _grad(f):
  return jax.grad(lambda q, k, v, s: jnp.sum(f(q, k, v, s) ** 2), argnums=(0, 1, 2))


def _ref(q, k, v, seg, chunk=0):
  return attention.attend(q, k, v, segment_ids=seg, is_causal=True, implementation="xla",
                          chunk=chunk)


def test_the_load_balanced_order_and_its_inverse():
  """Device i holds chunks i and 2n-1-i; natural_order undoes load_balance on any axis."""
  np.testing.assert_array_equal(cp.order(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
  x = np.arange(2 * 3 * 16).reshape(2, 3, 16)
  for n in (1, 4):
    y = cp.load_balance(x, n, axis=2)
    np.testing.assert_array_equal(np.asarray(y)[0, 0], cp.order(16, n) if n > 1 else np.arange(16))
    np.testing.assert_array_equal(cp.natural_order(y, n, axis=2), x)
  with pytest.raises(sharding.ShardingError, match="does not split into 2 x 4 equal chunks"):
    cp.order(12, 4)


@pytest.mark.slow
def test_attention_under_context_equals_the_unsplit_attention():
  """Blockwise with the all-gather under context 2 beside fsdp 2 x tensor 2 and the ring under
  context 4 beside tensor 2, with segment ids, and xla under context 2 without: values within
  2e-6 of the unsplit attention (4 query heads on 2 kv heads; the gradients are checked
  through the training losses below). The control: inputs not put in the load-balanced order
  give another result. Llama 4's chunked attention (chunks of 12 positions, which the
  context's chunks of 8 do not nest in) follows the same order."""
  q, k, v, seg = _qkv(32)
  for n, fsdp, tensor, impl, strategy, s, chunk in [
      (2, 2, 2, "blockwise", "all_gather", seg, 0),
      (4, 1, 2, "blockwise", "ring", seg, 0),
      (2, 2, 1, "xla", "all_gather", None, 0),
      (2, 1, 2, "blockwise", "all_gather", seg, 12)]:
    mesh, rules = _mesh(n, fsdp, tensor)
    f = _split(mesh, rules, n, impl, strategy, chunk=chunk)[0]
    what = f"context {n} {impl} {strategy} segments={s is not None} chunk={chunk}"
    np.testing.assert_allclose(f(q, k, v, s), _ref(q, k, v, s, chunk), atol=2e-6, err_msg=what)
    if chunk:  # the control: the chunks change the result
      assert float(jnp.max(jnp.abs(_ref(q, k, v, s) - _ref(q, k, v, s, chunk)))) > 0.1
  wrong = _split(mesh, rules, n, "xla", balanced=False)[0](q, k, v, None)
  assert float(jnp.max(jnp.abs(wrong - _ref(q, k, v, None)))) > 0.1


def test_each_device_computes_2n_plus_1_causal_blocks():
  """Read from the compiled program: the blockwise attention's FLOPs per device (XLA's cost
  analysis of the SPMD program) are 2n + 1 blocks of C x C (C = T / 2n) with n = 2, 4: 1/n of
  the n (2n + 1) blocks of the whole causal sequence. The splash kernel's block mask gives
  every shard 2n + 1 blocks, where a contiguous split would give the last shard 4n - 1."""
  b, heads, kv, h, c = 1, 4, 2, 64, 128
  block_flops = 4 * c * c * heads * h  # q k^T and p v of one C x C block
  found = {}
  for n in (2, 4):
    t = 2 * n * c
    mesh, rules = _mesh(n)
    q = jax.ShapeDtypeStruct((b, t, heads, h), jnp.float32)
    kvs = jax.ShapeDtypeStruct((b, t, kv, h), jnp.float32)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      compiled = jax.jit(lambda q, k, v: attention.attend(
          q, k, v, is_causal=True, implementation="blockwise", block=c))
      compiled = compiled.lower(q, kvs, kvs).compile()
    found[n] = compiled.cost_analysis()["flops"] / block_flops
  # The softmax's elementwise work adds a few percent to the matmuls' count.
  assert 5 <= found[2] < 5 * 1.05 and 9 <= found[4] < 9 * 1.05, found
  for n in (2, 4):
    t = 2 * n * c
    kernel = attention._splash_kernel(t, 1, c, 0, cp.order(t, n), n, interpret=True)
    blocks = np.asarray(kernel.fwd_mask_info.block_mask)[0].reshape(n, -1, 2 * n) > 0
    assert blocks.sum(axis=(1, 2)).tolist() == [2 * n + 1] * n
    contiguous = attention._splash_kernel(t, 1, c, 0, None, n, interpret=True)
    rows = np.asarray(contiguous.fwd_mask_info.block_mask)[0].reshape(n, -1, 2 * n) > 0
    assert rows.sum(axis=(1, 2)).tolist()[-1] == 4 * n - 1


@pytest.mark.slow
def test_splash_under_context_in_interpret_mode():
  """jax's splash kernel on each device's rows (q_seq_shards = 2, the load-balanced mask),
  interpreted on CPU: 512 tokens (its 128-lane blocks, two chunks of 128 a device), values and
  gradients against the unsplit attention, with segment ids."""
  q, k, v, seg = _qkv(512, b=1, n_heads=2, n_kv=1)
  mesh, rules = _mesh(2)
  f, df = _split(mesh, rules, 2, "splash")
  np.testing.assert_allclose(f(q, k, v, seg), _ref(q, k, v, seg), atol=2e-6)
  for a, b in zip(df(q, k, v, seg), jax.jit(_grad(_ref))(q, k, v, seg)):
    np.testing.assert_allclose(a, b, atol=2e-5)


# ---------------------------------------------------------------------------- training


T = 24  # 2 x 4 chunks of 3 at context 4


def _batches(packing: bool, steps: int):
  rng = np.random.default_rng(1)
  out = []
  for _ in range(steps):
    x = rng.integers(0, 104, (8, T + 1)).astype(np.int32)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
    if packing:  # 1-4 documents a row, positions restarting at each
      seg = np.sort(rng.integers(1, 5, (8, T)), axis=1).astype(np.int32)
      starts = np.maximum.accumulate(np.where(np.diff(seg, prepend=0, axis=1) != 0,
                                              np.arange(T), 0), axis=1)
      batch.update(segment_ids=seg, positions=(np.arange(T) - starts).astype(np.int32))
    out.append(batch)
  return out


def _losses(mesh: dict, packing: bool, steps=2, **model):
  """The losses of `steps` training steps of a tiny model on 8-row batches of T tokens."""
  c = tiny_config(**{"data.seq_len": T, "model.max_seq_len": T})
  c.model.update(model)
  c.mesh.update(mesh)
  config_lib.validate(c)
  devices = int(np.prod([mesh.get(a, 1) for a in ("data", "fsdp", "tensor", "context")]))
  setup = train.make_setup(c, devices=jax.devices()[:devices])
  state = train.init_state(setup, seed=0)
  step_fn = train.make_train_step(setup)
  losses = []
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    for batch in _batches(packing, steps):
      batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in batch.items()}
      state, stats = step_fn(state, batch)
      losses.append(float(stats["loss"]))
  return losses, setup


@pytest.mark.slow
def test_training_losses_under_context_equal_the_unsplit_run():
  """Two steps of a tiny model on packed documents (the second's loss reads the first's
  gradients): context 2 beside data 2 and tensor 2 (blockwise, all-gather) and context 4
  beside fsdp 2 (blockwise, ring): every loss within 1e-5 of one device's. (Rows without
  packing: the two-process test below; xla and the other pairings: docs/long_context.md.)"""
  ref, _ = _losses(dict(data=1, fsdp=1, tensor=1), packing=True)
  assert ref[1] < ref[0]
  for mesh, model in [(dict(data=2, fsdp=1, context=2, tensor=2), {}),
                      (dict(data=1, fsdp=2, context=4, tensor=1), {"context_strategy": "ring"})]:
    losses, setup = _losses(mesh, True, **model)
    assert setup.mesh.shape["context"] == mesh["context"]
    assert dict(setup.rules)["act_seq"] == "context"
    np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=f"{mesh} {model}")


# ---------------------------------------------------------------------------- long rows


def test_the_loader_packs_rows_of_131072_tokens():
  """Rows of 131,072 tokens with packing: a segment per BOS, positions restarting at each, as
  computed from the token file here; the loader's peak heap bytes per token at 131,072 within
  20% of 8,192's (benchmarks/long_rows.py's measure, on a smaller file)."""
  import os
  import sys
  from llama_jax.data import cache, loader
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
  import long_rows
  n, t = 600_000, 131_072
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, 30_000, n).astype(np.uint16)
  tokens[rng.choice(n, 100, replace=False)] = long_rows.BOS
  f = cache.TokenFile("memory", tokens, n_docs=100, n_tokens=n, n_bytes=n)
  ld = loader.TokenLoader(f, seed=0, shuffle=True, bos_id=long_rows.BOS, seq_len=t,
                          batch_size=2, packing=True)
  batch = ld.local_batch(3)
  for row, start in zip(range(2), ld.window_ids(3) * t):
    window = tokens[start:start + t]
    np.testing.assert_array_equal(batch["inputs"][row], window)
    bos = np.flatnonzero(window == long_rows.BOS)
    assert batch["segment_ids"][row].max() == 1 + len(bos[bos > 0])
    for a in bos[bos > 0]:
      assert batch["positions"][row, a] == 0 and batch["positions"][row, a - 1] > 0
      assert batch["segment_ids"][row, a] == batch["segment_ids"][row, a - 1] + 1
  short, long = (long_rows.measure(f, s, t, steps=1) for s in (8_192, t))
  assert long["rows"] == 1 and short["rows"] == 16
  assert abs(long["peak_bytes_per_token"] / short["peak_bytes_per_token"] - 1) < 0.2, (short, long)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("updates, match", [
    (dict(context=4), r"data.seq_len=36 is not divisible by 2 x mesh.context = 8"),
    (dict(context=-1), r"mesh.context=-1: give the context axis its size"),
    (dict(context=2, attention="splash", seq_len=256),
     r"splash.*chunks of 64 tokens, which must be whole blocks"),
    (dict(context=2, attention="splash", seq_len=512, context_strategy="ring"),
     r"model.context_strategy='ring' runs the 'blockwise' attention"),
    (dict(context=2, seq_len=32, context_strategy="rings"), r"model.context_strategy='rings'"),
])
def test_bad_context_configs_are_one_line_errors(updates, match):
  c = tiny_config(**{"data.seq_len": updates.pop("seq_len", 36), "model.max_seq_len": 512})
  c.mesh.context = updates.pop("context")
  c.model.update(updates)
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_context_degree_the_devices_cannot_hold_and_decoding_under_context():
  """mesh.context=16 on 8 devices is a ShardingError naming the axes; so is decoding with a KV
  cache under a context split, while the natural-order forward pass under it is the model's."""
  c = tiny_config(**{"data.seq_len": 32})
  c.mesh.update(dict(data=1, fsdp=1, tensor=1, context=16))
  config_lib.validate(c)
  with pytest.raises(sharding.ShardingError, match=re.escape("data*fsdp*context*tensor = "
                                                             "1*1*16*1 = 16 but there are 8")):
    train.make_setup(c)
  c.mesh.update(dict(context=2, data=-1))
  setup = train.make_setup(c)
  assert setup.mesh.axis_names == ("data", "fsdp", "context", "tensor")
  params = train.init_state(setup, 0)["params"]
  from llama_jax.model.llama import init_cache
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 104, (4, 8)), jnp.int32)
  forward = jax.jit(lambda p, t, **kw: nnx.merge(setup.graphdef, p)(t, **kw))
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    with pytest.raises(sharding.ShardingError, match="decoding with a KV cache does not run"):
      jax.eval_shape(forward, params, tokens, cache=init_cache(setup.model_cfg, 4, 8))
    split = forward(params, tokens)
  np.testing.assert_allclose(split, forward(params, tokens), atol=1e-5)


# ---------------------------------------------------------------------------- two processes


CP_STEPS = 2


@pytest.mark.slow
def test_context_axis_across_two_processes_equals_one_process(tmp_path, monkeypatch):
  """2 processes x 4 devices on mesh context 2 x tensor 4: the context axis's two shards sit
  in different processes (device = context x 4 + tensor), so the keys' all-gather and the
  batch's reorder cross them (gloo). Losses and the eval loss equal one process's context-1
  run (fsdp 8, in this process) within 1e-5."""
  from tests import test_multihost as mh
  monkeypatch.setenv("JAX_DEFAULT_PRNG_IMPL", "unsafe_rbg")
  monkeypatch.setenv("JAX_DEFAULT_MATMUL_PRECISION", "highest")
  common = [a for a in mh.ARGS if not a.startswith(("--config.train.", "--config.mesh."))] + [
      f"--config.train.steps={CP_STEPS}", "--config.train.log_every=1",
      f"--config.train.eval_every={CP_STEPS}", "--config.train.eval_steps=1",
      f"--config.train.checkpoint_every={CP_STEPS}", "--config.train.sample_tokens=0",
      "--config.optim.warmup_steps=1", "--config.mesh.data=1"]
  split = common + ["--config.mesh.fsdp=1", "--config.mesh.context=2", "--config.mesh.tensor=4"]
  # The mesh the processes build puts devices 0-3 (process 0's) in context shard 0.
  grid = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, context=2, tensor=4)).devices
  assert [[d.id for d in row] for row in grid.reshape(2, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  job = mh.Job(str(tmp_path / "hosts"), str(tmp_path / "two"), "context", args=split)
  # The reference, fsdp over this process's 8 devices, trains while the job starts.
  config = mh._config_of(common + ["--config.mesh.fsdp=-1", "--config.mesh.tensor=1"])
  config_lib.validate(config)
  train.train(config, str(tmp_path / "one"), log=lambda *a: None)
  assert job.wait(timeout=300) == [0, 0], job.tail()
  two, one = mh._lines(str(tmp_path / "two")), mh._lines(str(tmp_path / "one"))
  assert [d["step"] for d in one if "loss" in d] == list(range(1, CP_STEPS + 1))
  assert [d["step"] for d in two] == [d["step"] for d in one]
  for a, b in zip(two, one):
    for k in ("loss", "grad_norm", "eval_loss"):
      if k in b:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
