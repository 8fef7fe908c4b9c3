"""llama_jax's train step against the reference implementations, side by side: one JSON line.

  python benchmarks/compare.py --config=configs/cpu_bench.py:B [--steps=10]

The same shapes go through transformers' PyTorch `LlamaForCausalLM` (fp32, SDPA attention,
torch.optim.AdamW, every CPU thread) and, where the installed transformers still ships it,
`FlaxLlamaForCausalLM` (optax AdamW, jitted). Each reference is optional: when it is missing,
its entry says why instead of a number. The implementations take turns step by step (one step
of each per round, never two at once), so a drift in the machine's speed during the run (other
tenants of a VM, clock changes) slows them alike and leaves the ratios alone.
"""

import json
import os
import statistics
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

# A sibling script: Python puts the running script's folder first on its import path.
from train_step import build, time_in_turns

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cpu_bench.py:A", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per implementation.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first.")


def _hf_config(m, transformers):
  return transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim,
      num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
      num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
      rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings)


def torch_llama(config) -> tuple[Callable[[], None], dict] | dict:
  """(step, info) for transformers' PyTorch LlamaForCausalLM, or {"error": why}."""
  try:
    import torch
    import transformers
  except ImportError as e:
    return {"error": f"not installed ({e.name}); pip install -r requirements-test.txt"}
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(_hf_config(config.model, transformers)).float()
  model.config._attn_implementation = "sdpa"
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  b, t = config.data.batch_size, config.data.seq_len
  tokens = torch.randint(0, config.model.vocab_size, (b, t))

  def step():
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  return step, {"version": f"torch {torch.__version__}, transformers {transformers.__version__}",
                "threads": torch.get_num_threads()}


def flax_llama(config) -> tuple[Callable[[], None], dict] | dict:
  """(step, info) for transformers' FlaxLlamaForCausalLM with optax AdamW, or {"error": why}."""
  try:
    import transformers
    from transformers import FlaxLlamaForCausalLM
  except ImportError:
    import transformers
    return {"error": f"transformers {transformers.__version__} has no FlaxLlamaForCausalLM "
                     "(removed in v5); compare in a venv with transformers==4.57.1 "
                     "(docs/PERFORMANCE.md)"}
  import jax
  import optax

  model = FlaxLlamaForCausalLM(_hf_config(config.model, transformers), seed=0)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))
  params = model.params
  opt_state = tx.init(params)
  b, t = config.data.batch_size, config.data.seq_len
  tokens = jax.random.randint(jax.random.key(0), (b, t + 1), 0, config.model.vocab_size)

  @jax.jit
  def train_step(params, opt_state, tokens):
    def loss_fn(p):
      logits = model(tokens[:, :-1], params=p).logits
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, opt_state]

  def step():
    state[0], state[1], loss = train_step(state[0], state[1], tokens)
    loss.block_until_ready()

  return step, {"version": f"transformers {transformers.__version__}"}


def main(argv):
  del argv
  config = _CONFIG.value
  tokens = config.data.batch_size * config.data.seq_len
  ours_step, summarize = build(config)
  built = {"pytorch_llama": torch_llama(config), "flax_llama": flax_llama(config)}
  refs = {name: b for name, b in built.items() if isinstance(b, tuple)}
  times = time_in_turns({"llama_jax": ours_step, **{n: step for n, (step, _) in refs.items()}},
                        _STEPS.value, _WARMUP.value)
  ours = summarize(times["llama_jax"])
  out = {"llama_jax": {k: ours[k] for k in ("tokens_per_s", "step_s", "mfu", "mfu_causal_half",
                                             "peak_flops", "flops_per_token",
                                             "flops_per_token_causal_half", "compile_s")}}
  for name, b in built.items():
    if name not in refs:
      out[name] = b  # {"error": ...}
      continue
    step_s = statistics.median(times[name])
    tokens_per_s = tokens / step_s
    out[name] = {"tokens_per_s": round(tokens_per_s, 1), "step_s": round(step_s, 5), **b[1],
                 "mfu": round(tokens_per_s * ours["flops_per_token"] / ours["peak_flops"], 4),
                 "mfu_causal_half": round(tokens_per_s * ours["flops_per_token_causal_half"]
                                          / ours["peak_flops"], 4)}
    out[f"speedup_vs_{name}"] = round(ours["tokens_per_s"] / out[name]["tokens_per_s"], 3)
  out["shape"] = {"batch": ours["batch"], "seq_len": ours["seq_len"], **ours["model"]}
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
