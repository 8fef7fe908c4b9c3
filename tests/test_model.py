"""llama_jax.model: shapes, logical axes, sizes, causality, packing, KV cache, remat/scan
equivalence, variants that train, dtype handling and config validation. Parity with
transformers lives in test_hf.py."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llama_jax.model.config import SIZES, ModelConfig, RopeScaling
from llama_jax.model.llama import Llama, abstract_model, dense, init_cache, lm_head_logits
from llama_jax.model.sizes import count_params

# Distinct prime-ish sizes: a swapped axis changes a shape instead of hiding.
CFG = ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=76, vocab_size=139,
                  max_seq_len=64)


def _model(cfg=CFG, seed=0):
  return Llama(cfg, rngs=nnx.Rngs(seed))


def _tokens(b=2, t=11, vocab=CFG.vocab_size, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, (b, t)), jnp.int32)


def _params(model):
  return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# Jitted once per config and shape: eager mode would re-trace the layer scan on every call.
_fwd = nnx.jit(lambda model, tokens, **kw: model(tokens, **kw))


def _loss(model, tokens):
  logits = model(tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


# ---------------------------------------------------------------------------- structure

def test_shapes_and_logical_axes():
  model = _model()
  logits = _fwd(model, _tokens(b=2, t=11))
  assert logits.shape == (2, 11, 139) and logits.dtype == jnp.float32
  L, D, N, K, H, F, V = 3, 48, 6, 2, 8, 76, 139
  want = {
      "embed": ((V, D), ("vocab", "embed")),
      "lm_head": ((D, V), ("embed", "vocab")),
      "final_norm.scale": ((D,), ("norm",)),
      "layers.attn.wq": ((L, D, N, H), ("layers", "embed", "heads", "head_dim")),
      "layers.attn.wk": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
      "layers.attn.wv": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
      "layers.attn.wo": ((L, N, H, D), ("layers", "heads", "head_dim", "embed")),
      "layers.mlp.w_gate": ((L, D, F), ("layers", "embed", "mlp")),
      "layers.mlp.w_up": ((L, D, F), ("layers", "embed", "mlp")),
      "layers.mlp.w_down": ((L, F, D), ("layers", "mlp", "embed")),
      "layers.attn_norm.scale": ((L, D), ("layers", "norm")),
      "layers.mlp_norm.scale": ((L, D), ("layers", "norm")),
  }
  params = _params(model)
  specs = {".".join(map(str, p)): v.get_value()
           for p, v in nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param)))}
  assert set(params) == set(want)
  for name, (shape, axes) in want.items():
    assert params[name].shape == shape, name
    assert tuple(specs[name]) == axes, name
  assert count_params(CFG) == sum(np.prod(s) for s, _ in want.values())


def test_every_variant_param_has_logical_axes():
  # Variant-only params (LayerNorm bias, learned positions) must carry names too, or they
  # would silently be replicated on every device.
  cfg = dataclasses.replace(CFG, norm="layer", position="learned", mlp="gelu")
  specs = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(_model(cfg), nnx.Param)))
  names = {".".join(map(str, p)) for p, _ in specs}
  assert {"pos_embed", "layers.attn_norm.bias", "final_norm.bias"} <= names
  assert "layers.mlp.w_gate" not in names  # GELU MLP is not gated
  for path, spec in specs:
    spec = spec.get_value()
    assert spec is not None and any(a is not None for a in spec), path


# Published counts (HF model cards / `num_parameters()`), each re-derived here:
#   per layer = attn D*(2*N*H + 2*K*H) + mlp 3*D*F + 2 norms 2*D; total = L*layer + 2*V*D + D.
# llama2_7b:  32*(4*4096^2 + 3*4096*11008 + 8192) + 2*32000*4096 + 4096       = 6,738,415,616
# llama2_13b: 40*(4*5120^2 + 3*5120*13824 + 10240) + 2*32000*5120 + 5120      = 13,015,864,320
# llama2_70b: 80*(2*8192^2 + 2*8192*1024 + 3*8192*28672 + 16384) + 2*32000*8192 + 8192
#                                                                              = 68,976,648,192
# llama3_8b:  32*(2*4096^2 + 2*4096*1024 + 3*4096*14336 + 8192) + 2*128256*4096 + 4096
#                                                                              = 8,030,261,248
# llama3_70b: llama2_70b's layers + 2*128256*8192 + 8192                      = 70,553,706,496
PUBLISHED = {"llama2_7b": 6_738_415_616, "llama2_13b": 13_015_864_320,
             "llama2_70b": 68_976_648_192, "llama3_8b": 8_030_261_248,
             "llama3_70b": 70_553_706_496}


def _traced_count(cfg: ModelConfig, non_embedding: bool = False) -> int:
  """Parameters of the model as the layers build it (abstract shapes, nothing allocated)."""
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return sum(math.prod(leaf.shape) for path, leaf in nnx.to_flat_state(state)
             if not (non_embedding and path[0] in ("embed", "lm_head", "pos_embed")))


@pytest.mark.parametrize("fields", [
    dict(),
    dict(dim=48, n_layers=3, n_heads=3, n_kv_heads=1, ffn_dim=136, vocab_size=331),
    dict(dim=40, n_layers=2, n_heads=5, n_kv_heads=5, ffn_dim=160, mlp="gelu", norm="layer",
         position="learned", max_seq_len=37, vocab_size=257),
    dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=88, tie_embeddings=True,
         mlp="relu", vocab_size=101, position="sinusoidal"),
    dict(dim=24, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=56, position="none",
         scan_layers=False, vocab_size=67),
])
def test_analytic_param_count_equals_the_traced_model(fields):
  """llama_jax.model.sizes counts from the config alone; the layers create the parameters.
  The two must agree for every variant (norm, MLP, positions, tying, GQA)."""
  cfg = ModelConfig(**fields)
  assert count_params(cfg) == _traced_count(cfg)
  assert count_params(cfg, non_embedding=True) == _traced_count(cfg, non_embedding=True)
  assert count_params({f"model.{k}": v for k, v in fields.items()}) == _traced_count(cfg)


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_param_counts_of_named_sizes(size):
  cfg = ModelConfig(**SIZES[size])
  assert count_params(cfg) == PUBLISHED[size]
  # Non-embedding N drops the V*D embedding and the V*D head.
  assert count_params(cfg, non_embedding=True) == PUBLISHED[size] - 2 * cfg.vocab_size * cfg.dim


# ---------------------------------------------------------------------------- semantics

def test_causal():
  model = _model()
  tokens = _tokens(b=2, t=11)
  t = 6
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % CFG.vocab_size)
  a, b = np.asarray(_fwd(model, tokens)), np.asarray(_fwd(model, changed))
  np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
  assert (np.abs(a[:, t:] - b[:, t:]).max(axis=-1) > 1e-4).all()  # and does reach t onward


def test_scan_equals_loop():
  scanned = _model(CFG)
  looped = _model(dataclasses.replace(CFG, scan_layers=False))
  # Same seed, same stacked parameters: scan_layers changes only how the forward runs.
  for name, v in _params(scanned).items():
    np.testing.assert_array_equal(v[...], _params(looped)[name][...])
  tokens = _tokens()
  np.testing.assert_allclose(_fwd(scanned, tokens), _fwd(looped, tokens), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_remat_matches_no_remat():
  tokens = _tokens()

  def loss_and_logits(model, tokens):
    logits = model(tokens)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return loss.mean(), logits

  grad_fn = nnx.jit(nnx.value_and_grad(loss_and_logits, has_aux=True))
  (loss_ref, logits_ref), g_ref = grad_fn(_model(dataclasses.replace(CFG, remat="none")), tokens)
  g_ref = _params_of(g_ref)
  for k in g_ref:
    assert np.abs(g_ref[k]).max() > 0, k  # every parameter gets a gradient
  for remat in ("full", "dots", "dots_no_batch"):
    model = _model(dataclasses.replace(CFG, remat=remat))
    (loss, logits), g = grad_fn(model, tokens)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6, err_msg=remat)
    np.testing.assert_allclose(logits, logits_ref, atol=1e-5, rtol=0, err_msg=remat)
    g = _params_of(g)
    assert g.keys() == g_ref.keys()
    for k in g:
      np.testing.assert_allclose(g[k], g_ref[k], atol=1e-6, rtol=1e-4, err_msg=f"{remat} {k}")


def _params_of(state):
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def test_packed_segments_equal_separate_documents():
  model = _model()
  docs = _tokens(b=2, t=6, seed=1)  # two documents, run alone as a batch of two
  packed = docs.reshape(1, 12)
  positions = jnp.asarray([list(range(6)) * 2], jnp.int32)  # restart at each document
  out = np.asarray(_fwd(model, packed, positions=positions,
                        segment_ids=jnp.asarray([[1] * 6 + [2] * 6], jnp.int32)))
  alone = np.asarray(_fwd(model, docs))
  np.testing.assert_allclose(out[0, :6], alone[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[0, 6:], alone[1], atol=1e-5, rtol=0)
  # With one segment, doc 2 attends to doc 1: the mask is what makes them equal above.
  leaky = np.asarray(_fwd(model, packed, positions=positions,
                          segment_ids=jnp.ones((1, 12), jnp.int32)))
  np.testing.assert_allclose(leaky[0, :6], alone[0], atol=1e-5, rtol=0)
  assert np.abs(leaky[0, 6:] - alone[1]).max() > 1e-3


def test_kv_cache_decode_equals_full_forward():
  cfg = CFG  # scanned layers; the padded test below covers the Python layer loop
  model = _model(cfg)
  tokens = _tokens(b=2, t=10)
  full = np.asarray(_fwd(model, tokens))
  cache = init_cache(cfg, batch=2, length=13)  # longer than used: empty slots stay masked
  logits, cache = _fwd(model, tokens[:, :6], cache=cache)
  steps = [np.asarray(logits)]
  for t in range(6, 10):
    # No positions: with a cache they default to cache['index'] onward, i.e. t here.
    logits, cache = _fwd(model, tokens[:, t:t + 1], cache=cache)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=0)
  assert int(cache["index"]) == 10
  assert cache["k"].shape == (3, 2, 13, 2, 8)  # [L, B, S, K, H]: kv heads, not query heads


def test_kv_cache_with_left_padded_prompt():
  # Row 0: a 6-token prompt. Row 1: a 4-token prompt left-padded by 2 (positions -1).
  # Unscanned layers, so the cache path of the Python layer loop is covered too.
  cfg = dataclasses.replace(CFG, scan_layers=False)
  model = _model(cfg)
  seqs = _tokens(b=2, t=9, seed=3)  # row 1 uses its first 7 tokens
  prompt = seqs[:, :6].at[1].set(jnp.concatenate([jnp.zeros(2, jnp.int32), seqs[1, :4]]))
  positions = jnp.asarray([[0, 1, 2, 3, 4, 5], [-1, -1, 0, 1, 2, 3]], jnp.int32)
  cache = init_cache(cfg, batch=2, length=12)
  logits, cache = _fwd(model, prompt, positions=positions, cache=cache)
  out0, out1 = [np.asarray(logits[0])], [np.asarray(logits[1, 2:])]
  for step in range(3):
    pos = jnp.asarray([[6 + step], [4 + step]], jnp.int32)
    nxt = jnp.stack([seqs[0, 6 + step], seqs[1, 4 + step]])[:, None]
    logits, cache = _fwd(model, nxt, positions=pos, cache=cache)
    out0.append(np.asarray(logits[0]))
    out1.append(np.asarray(logits[1]))
  assert np.isfinite(np.asarray(cache["k"])).all()  # padded queries must not poison the cache
  # Causal, so row 1's trailing extra tokens do not change its first 7 logits.
  full = np.asarray(_fwd(model, seqs))
  np.testing.assert_allclose(np.concatenate(out0), full[0], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.concatenate(out1), full[1, :7], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- variants

# Every non-default choice appears in some config; grouping them keeps compiles (the cost) to
# three while each variant still builds, runs forward and backward, and trains. (The default
# LLaMA choices get their gradients checked in test_remat_matches_no_remat.)
VARIANTS = {
    "layernorm_gelu_learned": dict(norm="layer", mlp="gelu", position="learned"),
    "relu_sinusoidal_tied": dict(mlp="relu", position="sinusoidal", tie_embeddings=True),
    "no_position": dict(position="none"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trains(variant):
  kw = VARIANTS[variant]
  cfg = dataclasses.replace(CFG, **kw)
  model = _model(cfg)
  names = set(_params(model))
  assert ("lm_head" in names) == (not kw.get("tie_embeddings", False))
  assert ("pos_embed" in names) == (kw.get("position") == "learned")
  assert ("final_norm.bias" in names) == (kw.get("norm") == "layer")
  assert ("layers.mlp.w_gate" in names) == (kw.get("mlp", "swiglu") == "swiglu")

  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(_loss)(model, tokens)
    optimizer.update(model, grads)
    return loss

  tokens = _tokens(b=4, t=16)
  losses = [float(step(model, optimizer, tokens)) for _ in range(8)]
  assert np.isfinite(losses).all()
  # A real next-token loss at init: ln(139) = 4.93 plus about half the logit variance (the
  # fan-in head gives unit-variance logits, so ~5.4; a tied 0.02-std head gives ~4.93).
  assert 4.8 < losses[0] < 6.0, losses
  # Fitting one fixed batch must make clear progress in 8 Adam steps.
  assert losses[-1] < losses[0] - 0.3, losses


def test_bf16_compute_with_fp32_params():
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  model, ref = _model(cfg), _model()
  assert all(v[...].dtype == jnp.float32 for v in _params(model).values())
  tokens = _tokens()
  logits = _fwd(model, tokens)
  assert logits.dtype == jnp.float32
  want = np.asarray(_fwd(ref, tokens))
  # bf16 keeps ~3 significant digits: close to the fp32 model, but not equal to it.
  err = np.abs(np.asarray(logits) - want).max()
  assert 0 < err < 0.05 * np.abs(want).max()



def _head_grads(fn, x, head, weights):
  return jax.grad(lambda x, head: jnp.sum(fn(x, head) * weights), argnums=(0, 1))(x, head)


def test_lm_head_backward_gemms_run_in_the_compute_dtype():
  """bf16 x bf16 -> fp32 logits; the backward GEMMs take bf16 operands (jax's own transpose
  would upcast them to fp32), and the gradients stay close to the fp32 ones."""
  rng = np.random.default_rng(0)
  x32 = jnp.asarray(rng.standard_normal((2, 5, 48)), jnp.float32)
  head32 = jnp.asarray(rng.standard_normal((48, 139)) * 0.1, jnp.float32)
  weights = jnp.asarray(rng.standard_normal((2, 5, 139)), jnp.float32)
  x16, head16 = x32.astype(jnp.bfloat16), head32.astype(jnp.bfloat16)
  assert lm_head_logits(x16, head16).dtype == jnp.float32

  jaxpr = jax.make_jaxpr(lambda x, h: _head_grads(lm_head_logits, x, h, weights))(x16, head16)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  # The two backward GEMMs, and the product jax.vjp traces in the backward rule for its unused
  # primal (XLA drops it); the forward's own product is inside the custom_vjp_call.
  assert len(dots) == 3
  assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars), jaxpr
  plain = jax.make_jaxpr(lambda x, h: _head_grads(
      lambda x, h: dense(x, h, preferred_element_type=jnp.float32), x, h, weights))(x16, head16)
  assert any(v.aval.dtype == jnp.float32 for e in plain.eqns if e.primitive.name == "dot_general"
             for v in e.invars), "control: jax's own transpose upcasts to fp32"

  want = _head_grads(lambda x, h: dense(x, h, preferred_element_type=jnp.float32),
                     x32, head32, weights)
  got = _head_grads(lm_head_logits, x16, head16, weights)
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0, atol=0.02 * np.abs(w).max())
  # In fp32 it is the plain computation.
  for g, w in zip(_head_grads(lm_head_logits, x32, head32, weights), want):
    np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------- config

@pytest.mark.parametrize("kw,field", [
    (dict(dim=50, n_heads=4), "model.dim=50"),
    (dict(n_heads=6, n_kv_heads=4), "model.n_kv_heads=4"),
    (dict(norm="batch"), "model.norm='batch'"),
    (dict(mlp="swish"), "model.mlp='swish'"),
    (dict(position="alibi"), "model.position='alibi'"),
    (dict(remat="everything"), "model.remat='everything'"),
    (dict(n_layers=0), "model.n_layers"),
])
def test_bad_config_names_the_field(kw, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    dataclasses.replace(CFG, **kw)


def test_from_dict():
  cfg = dataclasses.replace(CFG, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32))
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # rope_scaling round-trips as a dict
  with pytest.raises(ValueError, match=r"\['n_layer'\]"):
    ModelConfig.from_dict(dict(CFG.to_dict(), n_layer=4))  # a typo of n_layers
