"""Llama 4 (docs/llama4.md) against transformers' Llama4ForCausalLM (PyTorch, fp32, eager
attention), the independent reference: logits both ways on configs whose sequence (20) is
longer than the chunk (8) and which have NoPE layers, greedy generate against transformers';
the published sizes of Scout and Maverick; the bad inputs, one line each."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from llama_jax import config as config_lib
from llama_jax import hf
from llama_jax.generate import decode as gen
from llama_jax.model import sizes
from llama_jax.model.config import SIZES, ModelConfig, RopeScaling
from llama_jax.model.llama import abstract_model
from tests.test_moe_hf import _logits

TOL = 1e-4
COMMON = dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
              intermediate_size=40, intermediate_size_mlp=56, num_hidden_layers=4,
              attention_chunk_size=8, attn_temperature_tuning=True, floor_scale=4,
              attn_scale=0.5, max_position_embeddings=64, rms_norm_eps=1e-5)
CASES = {
    # Maverick's pattern: MoE in every 2nd layer (dense SwiGLU of 56 between), NoPE every 4th,
    # no qk-norm, top 1 of 3 experts; read from a Llama4ForCausalLM directory.
    "maverick": dict(COMMON, vocab_size=101, interleave_moe_layer_step=2,
                     no_rope_layer_interval=4, use_qk_norm=False, num_local_experts=3,
                     num_experts_per_tok=1,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Scout's: MoE in every layer, NoPE every 2nd, L2 qk-norm, top 2 of 5, RoPE scaled as
    # Scout's (equal low and high frequency factors); read from the text part of a
    # Llama4ForConditionalGeneration directory.
    "scout": dict(COMMON, vocab_size=113, interleave_moe_layer_step=1,
                  no_rope_layer_interval=2, use_qk_norm=True, num_local_experts=5,
                  num_experts_per_tok=2,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                                   "original_max_position_embeddings": 16}),
}


def _llama4(case) -> transformers.Llama4ForCausalLM:
  """A random fp32 Llama 4 with every weight perturbed (norm weights 1 + N(0, 0.3^2), matrices
  N(0, 1/fan_in), the router too, so that routing is far from uniform)."""
  config = transformers.Llama4TextConfig(attn_implementation="eager", **CASES[case])
  torch.manual_seed(0)
  model = transformers.Llama4ForCausalLM(config).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      fan_in = p.shape[-2] if p.ndim == 3 else p.shape[-1]  # experts: [E, in, out]
      p.copy_(1 + 0.3 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / fan_in ** .5)
  return model




def _as_conditional_generation(directory):
  """Rewrites a saved Llama4ForCausalLM as the published checkpoints hold the text model: under
  `language_model.` in a Llama4ForConditionalGeneration, beside a vision tower."""
  tensors = {f"language_model.{k}": v
             for k, v in load_file(directory / "model.safetensors").items()}
  tensors["vision_model.patch_embedding.linear.weight"] = np.ones((4, 6), np.float32)
  save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  text = json.loads((directory / "config.json").read_text())
  (directory / "config.json").write_text(json.dumps(
      {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
       "text_config": text}))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_llama4_logits_match_transformers_both_ways(case, tmp_path):
  ref = _llama4(case)
  tokens = np.random.RandomState(0).randint(0, ref.config.vocab_size, (2, 20)).astype(np.int64)
  want = _logits(ref, tokens)
  model, cfg = hf.load_hf(ref)  # in memory
  moe_every, nope_every, qk = {"maverick": (2, 4, "none"), "scout": (1, 2, "l2")}[case]
  assert (cfg.moe_every, cfg.nope_every, cfg.qk_norm, cfg.attention_chunk, cfg.ffn_dim,
          cfg.moe_ffn_dim, cfg.moe_shared_experts, cfg.moe_router) == (
              moe_every, nope_every, qk, 8, 56, 40, 1, "sigmoid")
  assert np.abs(_logits(model, tokens) - want).max() <= TOL
  # On disk: as save_pretrained writes it, or (scout) as the published checkpoints hold it.
  ref.save_pretrained(tmp_path / "hf")
  if case == "scout":
    _as_conditional_generation(tmp_path / "hf")
  loaded, loaded_cfg = hf.load_hf(str(tmp_path / "hf"))
  assert loaded_cfg == cfg
  assert np.abs(_logits(loaded, tokens) - want).max() <= TOL
  # Our export, read by transformers; and back.
  hf.save_hf(model, cfg, str(tmp_path / "ours"))
  back = transformers.Llama4ForCausalLM.from_pretrained(str(tmp_path / "ours"),
                                                        attn_implementation="eager").eval()
  assert np.abs(_logits(back, tokens) - want).max() <= TOL
  assert hf.load_hf(str(tmp_path / "ours"))[1] == cfg
  if case == "scout":  # greedy decoding over three chunks, against transformers' generate
    prompt = tokens[0, :5].tolist()
    with torch.no_grad():
      out = ref.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=18,
                         min_new_tokens=18, pad_token_id=0, eos_token_id=None)
    assert gen.generate(model, [prompt], max_new_tokens=18, temperature=0.0)[0] == (
        out[0, 5:].tolist())
  # The control: the same weights without the chunks (maverick) or without the NoPE layers'
  # temperature (scout) give other logits, far beyond the tolerance.
  off = dict(attention_chunk=0) if case == "maverick" else dict(attn_temperature_tuning=False)
  other = nnx.merge(nnx.graphdef(abstract_model(dataclasses.replace(cfg, **off))),
                    nnx.state(model))
  assert np.abs(_logits(other, tokens) - want).max() > 100 * TOL


def test_config_round_trip_and_what_hf_cannot_express():
  """The config.json save_hf writes reads back as the same model, for both shapes; transformers
  takes it as a Llama4TextConfig; an irregular moe_layers list and a softmax-routed shared
  expert are one-line errors (the control: the same without the fault converts)."""
  for case in CASES:
    cfg = hf.config_from_hf(transformers.Llama4TextConfig(**CASES[case]).to_dict())
    c = hf.config_to_hf(cfg)
    assert hf.config_from_hf(c) == cfg
    assert transformers.Llama4TextConfig(**c).no_rope_layers == [
        int(not cfg.is_nope_layer(i)) for i in range(cfg.n_layers)]
  c = dict(CASES["maverick"], model_type="llama4_text", architectures=["Llama4ForCausalLM"])
  with pytest.raises(hf.HFError, match=r"moe_layers=\[0, 3\] is not every N-th layer"):
    hf.config_from_hf(dict(c, moe_layers=[0, 3]))
  assert hf.config_from_hf(dict(c, moe_layers=[1, 3])).moe_every == 2
  shared = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, vocab_size=101,
                       moe_experts=4, moe_shared_experts=1, nope_every=2)
  with pytest.raises(hf.HFError, match="model.moe_router='softmax' cannot be exported"):
    hf.config_to_hf(shared)
  assert hf.config_to_hf(dataclasses.replace(shared, moe_router="sigmoid"))["use_qk_norm"] is False


# Scout and Maverick, text part, from the published dimensions (module SIZES), re-derived:
#   attention per layer D*(2*N*H + 2*K*H) = 5120 * (2*40*128 + 2*8*128)  = 62,914,560
#   an MoE layer's router D*E, its E routed and 1 shared experts 3*D*F_e each (F_e = 8192)
#   a dense layer's SwiGLU 3*D*F (F = 16384) = 251,658,240; norms 2*D; embeddings + head 2*V*D
# Scout: 48 * (62,914,560 + 5120*16 + 3*5120*8192*17 + 10,240) + 2*202048*5120 + 5120
#                                                                       = 107,769,861,120
# Maverick: 24 dense + 24 MoE layers of 128 experts                     = 400,711,848,960
# active: the top-1 and the shared expert (2 of 17 or 129), router included
# Scout: 48 * (62,914,560 + 81,920 + 3*5120*8192*2 + 10,240) + 2,068,976,640 = 17,172,894,720
PUBLISHED = {"llama4_scout": (107_769_861_120, 17_172_894_720),
             "llama4_maverick": (400_711_848_960, 17_184_691_200)}


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_published_sizes_params_and_flops(size):
  cfg = ModelConfig(**SIZES[size])
  assert (sizes.count_params(cfg), sizes.active_params(cfg)) == PUBLISHED[size]
  d, n, h, layers = 5120, 40, 128, 48
  # FLOPs per token: 6 x the active matmul weights (embedding lookup excluded, head included)
  # plus the attention's 3 * 2 * 2*N*H per position attended: at 32768 tokens the 36 chunked
  # layers attend over 8192 positions, the 12 NoPE ones over all 32768.
  weights = PUBLISHED[size][1] - 202048 * d - (2 * layers + 1) * d  # no lookup table, norms
  for t, span in ((8192, 48 * 8192), (32768, 36 * 8192 + 12 * 32768)):
    assert sizes.flops_per_token(cfg, t) == pytest.approx(6 * weights + 12 * n * h * span,
                                                          rel=1e-12)
  # A chunk-free model attends over everything in every layer: more FLOPs at 32768 only.
  full = dataclasses.replace(cfg, attention_chunk=0)
  assert sizes.flops_per_token(full, 8192) == sizes.flops_per_token(cfg, 8192)
  assert sizes.flops_per_token(full, 32768) > sizes.flops_per_token(cfg, 32768)


def test_traced_params_equal_the_count():
  """sizes counts from the config; the layers create the parameters (qk-norm scales, the
  interleaved dense and MoE stacks, the shared expert)."""
  for extra in (dict(qk_norm="rms", moe_every=2), dict(qk_norm="l2", moe_every=1)):
    cfg = ModelConfig(dim=48, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=56, vocab_size=101,
                      moe_experts=3, moe_ffn_dim=40, moe_shared_experts=1, moe_router="sigmoid",
                      nope_every=2, attention_chunk=8, **extra)
    state = nnx.state(abstract_model(cfg), nnx.Param)
    assert sizes.count_params(cfg) == sum(math.prod(v.shape)
                                          for _, v in nnx.to_flat_state(state))


def _config(**model):
  c = config_lib.defaults("tiny")
  c.model.update(model)
  c.data.seq_len = 64
  return c


@pytest.mark.parametrize("model,message", [
    (dict(attention_chunk=200), r"model.attention_chunk=200 exceeds model.max_seq_len=128"),
    (dict(attention_chunk=24), r"model.attention_chunk=24 and the attention's blocks of 64"),
    (dict(nope_every=2, position="learned"), r"model.nope_every=2 .* model.position='learned'"),
    (dict(qk_norm="layer"), r"model.qk_norm='layer' is not one of \('none', 'l2', 'rms'\)"),
    (dict(dropout=1.0), r"model.dropout=1.0 must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"model.dropout=-0.1 must be in \[0, 1\)"),
    (dict(attn_temperature_tuning=True),
     r"attn_temperature_tuning=True .*\(model.nope_every=0\)"),
    (dict(nope_every=3), r"model.nope_every=3 must divide model.n_layers=2"),
])
def test_bad_input_is_one_line(model, message):
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    config_lib.validate(_config(**model))
  assert "\n" not in str(e.value)
  config_lib.validate(_config(attention_chunk=32, nope_every=2, qk_norm="l2", dropout=0.1,
                              attn_temperature_tuning=True))  # the control: a valid one
  assert RopeScaling(**SIZES["llama4_scout"]["rope_scaling"]).factor == 16.0
