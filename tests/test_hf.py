"""llama_jax.hf against transformers' LlamaForCausalLM (PyTorch, fp32, eager attention), the
independent reference: logit parity, export round trips, Meta-layout import, error messages."""

import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llama_jax import hf
from llama_jax.model.llama import Llama, abstract_model, rope_frequencies
from llama_jax.model.config import ModelConfig, RopeScaling

TOL = 1e-4


def _params(model) -> dict[str, np.ndarray]:
  return {".".join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _hf_model(seed=0, rope=None, **kw) -> transformers.LlamaForCausalLM:
  """A random fp32 HF Llama with every weight perturbed: linears ~ N(0, 1/fan_in), norm weights
  1 + N(0, 0.3^2), so neither a transposed/swapped matrix nor a misplaced norm can hide behind
  HF's all-ones norm init."""
  config = transformers.LlamaConfig(
      attn_implementation="eager", max_position_embeddings=128, rms_norm_eps=1e-5,
      rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0}, **kw)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(1 + 0.3 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
  return model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens)).logits.numpy()


def _tokens(vocab, b=2, t=12, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (b, t)).astype(np.int64)


# Distinct prime-ish sizes per case so a transposed or mis-split axis changes a shape.
CASES = {
    "mha": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=80, vocab_size=101, num_hidden_layers=2),
    "gqa": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=96, vocab_size=131, num_hidden_layers=2),
    "mqa": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=1,
                intermediate_size=72, vocab_size=113, num_hidden_layers=2),
    "tied": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=88, vocab_size=107, num_hidden_layers=2,
                 tie_word_embeddings=True),
    # dim 60 = 10 heads x 6, 5 kv heads (G=2), odd ffn and vocab, 3 layers.
    "odd": dict(hidden_size=60, num_attention_heads=10, num_key_value_heads=5,
                intermediate_size=92, vocab_size=257, num_hidden_layers=3),
}

# Llama-3.1 scaling with original context 64 and head_dim 16 at theta 5e5: the RoPE wavelengths
# 2*pi*5e5^(k/8) = 6.3, 32.5, 168, ... fall in all three bands (kept < 16 <= interpolated <= 64
# < scaled), and the test sequence (80) is longer than the original context.
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}


@pytest.mark.parametrize("case", [*CASES, "llama31_rope"])
def test_logit_parity_with_transformers(case, tmp_path):
  if case == "llama31_rope":
    kw, rope, t = dict(CASES["gqa"], num_attention_heads=4), LLAMA31_ROPE, 80  # head_dim 16
  else:
    kw, rope, t = CASES[case], None, 12
  ref = _hf_model(rope=rope, **kw)
  ref.save_pretrained(tmp_path)
  model, cfg = hf.load_hf(str(tmp_path))
  mem_model, mem_cfg = hf.load_hf(ref)

  assert cfg == mem_cfg
  assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers) == (
      kw["hidden_size"], kw["num_attention_heads"], kw["num_key_value_heads"],
      kw["intermediate_size"], kw["vocab_size"], kw["num_hidden_layers"])
  assert cfg.tie_embeddings == kw.get("tie_word_embeddings", False)
  assert cfg.max_seq_len == 128 and cfg.norm_eps == 1e-5
  if case == "llama31_rope":
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    # The premise above: some frequencies kept, some divided by the factor, some in between.
    scaled = np.asarray(rope_frequencies(cfg))
    plain = np.asarray(rope_frequencies(dataclasses.replace(cfg, rope_scaling=None)))
    kept, slowed = np.isclose(scaled, plain), np.isclose(scaled, plain / 8)
    assert kept.any() and slowed.any() and (~kept & ~slowed).any()
  else:
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
  # The directory and the in-memory model give bit-identical parameters.
  p_dir, p_mem = _params(model), _params(mem_model)
  assert p_dir.keys() == p_mem.keys()
  assert ("lm_head" in p_dir) != cfg.tie_embeddings
  for k in p_dir:
    np.testing.assert_array_equal(p_dir[k], p_mem[k], err_msg=k)

  tokens = _tokens(kw["vocab_size"], t=t)
  want = _hf_logits(ref, tokens)
  got = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  assert got.shape == want.shape == (2, t, kw["vocab_size"])
  assert np.abs(got - want).max() <= TOL


def test_bf16_checkpoint(tmp_path):
  # numpy has no bf16: safetensors reads it through ml_dtypes, torch tensors are bit-cast.
  ref = _hf_model(**CASES["mha"]).to(torch.bfloat16)
  ref.save_pretrained(tmp_path)
  want = ref.model.layers[1].self_attn.k_proj.weight.detach().float().numpy().T.reshape(48, 4, 12)
  for source in (str(tmp_path), ref):
    model, cfg = hf.load_hf(source, param_dtype="bfloat16", dtype="bfloat16")
    assert (cfg.param_dtype, cfg.dtype) == ("bfloat16", "bfloat16")
    wk = model.layers.attn.wk[...]
    assert wk.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(wk[1], np.float32), want)
  model, cfg = hf.load_hf(str(tmp_path))  # fp32 params by default, upcast exactly
  assert cfg.param_dtype == "float32"
  np.testing.assert_array_equal(np.asarray(model.layers.attn.wk[1]), want)


def _our_model(cfg: ModelConfig, seed=0) -> Llama:
  """A random Llama with norm scales perturbed away from their all-ones init."""
  model = Llama(cfg, rngs=nnx.Rngs(seed))
  rng = np.random.RandomState(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == "scale":
      var[...] = var[...] + jnp.asarray(0.3 * rng.randn(*var.shape), var.dtype)
  return model


@pytest.mark.parametrize("tied,rope_scaling,shard", [
    (False, RopeScaling(4.0, 1.0, 4.0, 32), False),
    (True, None, True),
])
def test_save_hf_round_trip(tied, rope_scaling, shard, tmp_path):
  # test_model.py's sizes (GQA 6/2), so a shared process reuses its compiled init ops.
  cfg = ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=76, vocab_size=139,
                    max_seq_len=96, rope_theta=500000.0, rope_scaling=rope_scaling,
                    tie_embeddings=tied, norm_eps=1e-6)
  model = _our_model(cfg)
  # A 20 kB shard limit splits this ~0.1 MB model into several files, exercising the index.
  hf.save_hf(model, cfg, str(tmp_path), **({"max_shard_bytes": 20_000} if shard else {}))
  index = tmp_path / "model.safetensors.index.json"
  assert index.exists() == shard
  if shard:
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 2

  # transformers (independently) reads the export and computes the same logits.
  ref = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
  assert ref.config.num_key_value_heads == 2 and ref.config.tie_word_embeddings == tied
  if rope_scaling is not None:
    assert ref.config.rope_parameters["rope_type"] == "llama3"
    assert ref.config.rope_parameters["factor"] == 4.0
  tokens = _tokens(cfg.vocab_size, t=40)  # longer than original_max_position_embeddings
  want = _hf_logits(ref, tokens)
  got = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  assert np.abs(got - want).max() <= TOL

  # And our own import restores every parameter bit for bit.
  back, back_cfg = hf.load_hf(str(tmp_path))
  assert back_cfg == cfg
  p, q = _params(model), _params(back)
  assert p.keys() == q.keys()
  for k in p:
    np.testing.assert_array_equal(p[k], q[k], err_msg=k)


def test_legacy_rope_config_keys(tmp_path):
  """transformers < 5 wrote rope_theta + rope_scaling at top level, no rope_parameters."""
  ref = _hf_model(**CASES["gqa"])
  ref.save_pretrained(tmp_path)
  c = json.loads((tmp_path / "config.json").read_text())
  c.pop("rope_parameters")
  c["rope_theta"] = 500000.0
  c["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
  cfg = hf.config_from_hf(c)
  assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
  c["rope_scaling"] = None
  cfg = hf.config_from_hf(c)
  assert cfg.rope_theta == 500000.0 and cfg.rope_scaling is None


@pytest.mark.parametrize("field,value", [("norm", "layer"), ("mlp", "gelu"),
                                         ("position", "learned")])
def test_save_hf_rejects_non_llama_variants(field, value, tmp_path):
  cfg = ModelConfig(dim=48, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=97,
                    **{field: value})
  with pytest.raises(ValueError, match=f"model.{field}='{value}'"):
    hf.save_hf(abstract_model(cfg), cfg, str(tmp_path))  # refused before any tensor is read
  assert not (tmp_path / "model.safetensors").exists()


# ---------------------------------------------------------------------------- Meta layout

def _hf_to_meta(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of convert_llama_weights_to_hf's permute: HF half-split rows -> Meta interleaved."""
  out, d = w.shape
  return w.reshape(n_heads, 2, out // n_heads // 2, d).transpose(0, 2, 1, 3).reshape(out, d)


# Llama 2 splits tok_embeddings along the embedding dim (ParallelEmbedding) and gives
# vocab_size -1 in params.json; Llama 3 splits the vocabulary (VocabParallelEmbedding).
@pytest.mark.parametrize("embed_axis,params_vocab", [(1, -1), (0, 122)])
def test_load_meta_matches_hf(embed_axis, params_vocab, tmp_path):
  # Meta's rule for dim 48, multiple_of 16, multiplier 1.3: int(2*192/3) = 128,
  # int(1.3*128) = 166, rounded up to a multiple of 16 = 176.
  assert hf.meta_ffn_dim(48, 16, 1.3) == 176
  assert hf.meta_ffn_dim(4096, 256, None) == 11008  # Llama-2 7B
  assert hf.meta_ffn_dim(4096, 1024, 1.3) == 14336  # Llama-3 8B
  n_heads, n_kv, dim, n_layers, vocab = 6, 2, 48, 2, 122
  rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  ref = _hf_model(rope=rope, hidden_size=dim, num_attention_heads=n_heads,
                  num_key_value_heads=n_kv, intermediate_size=176, vocab_size=vocab,
                  num_hidden_layers=n_layers)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}

  # Two model-parallel shards, split the way Meta's fairscale layers split them.
  full = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], embed_axis),
          "norm.weight": (sd["model.norm.weight"], None),
          "output.weight": (sd["lm_head.weight"], 0)}
  for i in range(n_layers):
    h = lambda n: sd[f"model.layers.{i}.{n}.weight"]  # noqa: E731
    full.update({
        f"layers.{i}.attention.wq.weight": (_hf_to_meta(h("self_attn.q_proj"), n_heads), 0),
        f"layers.{i}.attention.wk.weight": (_hf_to_meta(h("self_attn.k_proj"), n_kv), 0),
        f"layers.{i}.attention.wv.weight": (h("self_attn.v_proj"), 0),
        f"layers.{i}.attention.wo.weight": (h("self_attn.o_proj"), 1),
        f"layers.{i}.feed_forward.w1.weight": (h("mlp.gate_proj"), 0),
        f"layers.{i}.feed_forward.w3.weight": (h("mlp.up_proj"), 0),
        f"layers.{i}.feed_forward.w2.weight": (h("mlp.down_proj"), 1),
        f"layers.{i}.attention_norm.weight": (h("input_layernorm"), None),
        f"layers.{i}.ffn_norm.weight": (h("post_attention_layernorm"), None),
    })
  for r in range(2):
    shard = {k: torch.from_numpy(np.ascontiguousarray(
        w if axis is None else np.split(w, 2, axis=axis)[r])) for k, (w, axis) in full.items()}
    shard["rope.freqs"] = torch.zeros(4)  # Llama 2 ships this buffer; it must be ignored.
    torch.save(shard, tmp_path / f"consolidated.{r:02d}.pth")
  (tmp_path / "params.json").write_text(json.dumps(dict(
      dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=params_vocab,
      multiple_of=16, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
      use_scaled_rope=True)))

  model, cfg = hf.load_meta(str(tmp_path))
  assert (cfg.ffn_dim, cfg.n_kv_heads, cfg.vocab_size, cfg.tie_embeddings) == (176, 2, vocab, False)
  assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192) and cfg.max_seq_len == 131072
  tokens = _tokens(vocab, t=16)
  got = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  assert np.abs(got - _hf_logits(ref, tokens)).max() <= TOL


# ---------------------------------------------------------------------------- errors

def test_rejects_other_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64}))
  with pytest.raises(ValueError, match="model_type is 'gpt2'"):
    hf.load_hf(str(tmp_path))


def test_rejects_missing_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file
  _hf_model(**CASES["mha"]).save_pretrained(tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
    hf.load_hf(str(tmp_path))


@pytest.mark.parametrize("key,value,message", [
    ("attention_bias", True, "attention_bias=True"),
    ("head_dim", 16, "head_dim=16"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
])
def test_rejects_unsupported_llama_features(key, value, message):
  c = transformers.LlamaConfig(**CASES["mha"]).to_dict()  # head_dim 12
  c[key] = value
  with pytest.raises(ValueError, match=message):
    hf.config_from_hf(c)
