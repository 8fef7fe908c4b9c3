"""Mixtral through llama_jax.hf against transformers' MixtralForCausalLM (PyTorch, fp32, eager
attention), the independent reference: logits both ways, in every weight layout the pinned
transformers writes and reads."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llama_jax import hf
from llama_jax.model.config import ModelConfig

TOL = 1e-4
# GQA in both; top 1 of 3 experts and top 2 of 5, distinct sizes so no axis can hide.
CASES = {
    "top1": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=40, vocab_size=101, num_hidden_layers=2, num_local_experts=3,
                 num_experts_per_tok=1),
    "top2": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=56, vocab_size=131, num_hidden_layers=2, num_local_experts=5,
                 num_experts_per_tok=2),
}


def _mixtral(case) -> transformers.MixtralForCausalLM:
  """A random fp32 Mixtral with every weight perturbed (norm weights 1 + N(0, 0.3^2), matrices
  N(0, 1/fan_in), the router too, so that routing is far from uniform)."""
  config = transformers.MixtralConfig(attn_implementation="eager", max_position_embeddings=128,
                                      rms_norm_eps=1e-5, **CASES[case])
  torch.manual_seed(0)
  model = transformers.MixtralForCausalLM(config).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.copy_(1 + 0.3 * torch.randn_like(p) if p.ndim == 1
              else torch.randn_like(p) / math.sqrt(p.shape[-1]))
  return model


def _logits(model, tokens: np.ndarray) -> np.ndarray:
  if isinstance(model, transformers.PreTrainedModel):
    with torch.no_grad():
      return model(torch.from_numpy(tokens)).logits.numpy()
  return np.asarray(_forward(model, jnp.asarray(tokens, jnp.int32)))


@nnx.jit
def _forward(model, tokens):  # one compile per shape: every load builds the same model
  return model(tokens)


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixtral_logits_match_transformers_both_ways(case, tmp_path):
  ref = _mixtral(case)
  tokens = np.random.RandomState(0).randint(0, ref.config.vocab_size, (2, 12)).astype(np.int64)
  want = _logits(ref, tokens)
  # In memory: transformers 5 holds the experts fused (gate_up_proj [E, 2F, D]).
  model, cfg = hf.load_hf(ref)
  assert (cfg.moe_experts, cfg.moe_top_k, cfg.n_kv_heads) == (
      ref.config.num_local_experts, ref.config.num_experts_per_tok, 2)
  assert np.abs(_logits(model, tokens) - want).max() <= TOL
  # On disk, both layouts save_pretrained writes: per expert (w1/w2/w3, the Hub's Mixtral
  # layout, the default) and fused.
  for layout, original in (("per_expert", True), ("fused", False)):
    ref.save_pretrained(tmp_path / layout, save_original_format=original)
    names = open(tmp_path / layout / "model.safetensors", "rb").read(20_000)
    assert (b"experts.0.w1.weight" in names) == original, layout
    loaded, loaded_cfg = hf.load_hf(str(tmp_path / layout))
    assert loaded_cfg == cfg
    assert np.abs(_logits(loaded, tokens) - want).max() <= TOL, layout
  # Our export, read by transformers.
  hf.save_hf(model, cfg, str(tmp_path / "ours"))
  back = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "ours"),
                                                          attn_implementation="eager").eval()
  assert np.abs(_logits(back, tokens) - want).max() <= TOL
  # The control: two experts swapped in one layer change the logits far beyond the tolerance.
  with torch.no_grad():
    up = ref.model.layers[0].mlp.experts.gate_up_proj
    up.copy_(up[[1, 0, *range(2, up.shape[0])]])
  assert np.abs(_logits(ref, tokens) - want).max() > 100 * TOL


def test_what_mixtral_cannot_express_is_refused_in_one_line(tmp_path):
  cfg = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, vocab_size=101,
                    moe_experts=4, moe_shared_experts=1)
  # A shared expert is Llama 4's (docs/llama4.md), whose router is the sigmoid one.
  with pytest.raises(hf.HFError, match="model.moe_router='softmax' cannot be exported to a "
                                       "Llama 4 checkpoint"):
    hf.config_to_hf(cfg)
  with pytest.raises(hf.HFError, match="router bias .* cannot be exported"):
    hf.config_to_hf(ModelConfig(**{**cfg.to_dict(), "moe_shared_experts": 0}), np.ones(4))
  c = _mixtral("top1").config.to_dict()
  c["sliding_window"] = 4096
  with pytest.raises(hf.HFError, match="sliding_window=4096 is not supported"):
    hf.config_from_hf(c)
