"""KV-cache decoding speed: prefill time and per-token decode time for a batch. One JSON line.

  python benchmarks/generate.py --config=configs/default.py [--config.model.KEY=VALUE ...]
      [--batch=8 --prompt_len=64 --max_new_tokens=128 --temperature=0 --top_k=0 --top_p=1]

The model is config.model with random weights (decode speed does not depend on their values).
compile_s is the ahead-of-time compilation of the jitted prefill and one-token step;
prefill_s the prefill of the whole batch (best of 3); per_token_ms one cached decode step for
the whole batch, from max_new_tokens - 1 steps dispatched back to back (no host sync between
them; best of 3 passes), so tokens_per_s = batch * 1000 / per_token_ms is the decode rate.
e2e_tokens_per_s is `generate()` end to end (prefill + the while_loop, compiled beforehand),
batch * max_new_tokens new tokens over its wall time.
"""

import json
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch", 8, "Prompts decoded together.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens generated per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k cut (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off).")
_E2E = flags.DEFINE_bool("e2e", True, "Also time generate() end to end.")


def _best(fn, repeats=3):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def main(argv):
  del argv
  import jax
  import numpy as np
  from flax import nnx

  import llama_jax  # noqa: F401
  from llama_jax.generate import decode as gen
  from llama_jax.model.llama import Llama
  from llama_jax.model.config import ModelConfig
  from llama_jax.model.sizes import count_params

  config = _CONFIG.value
  cfg = ModelConfig.from_dict(config.model)
  b, p, n = _BATCH.value, _PROMPT_LEN.value, _NEW.value
  if n < 2:
    raise app.UsageError("--max_new_tokens must be >= 2 (one prefill token + decode steps)")

  # Random weights, created on device by one jitted init.
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.state(Llama(cfg, rngs=nnx.Rngs(0))))()
  model = nnx.merge(graphdef, params)
  graphdef, params = gen.split_model(model)

  prompts = np.random.RandomState(0).randint(0, cfg.vocab_size, (b, p)).tolist()
  tokens, positions, lengths = gen.pad_prompts(prompts, n, cfg.max_seq_len, cfg.vocab_size)
  temperature, top_k, top_p = gen._check_sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  sampling = (np.float32(max(temperature, 1e-6)), np.int32(top_k), np.float32(top_p))
  eos = gen._eos_array(None)
  key = jax.random.PRNGKey(0)
  width = gen._round_up(n, gen.PAD_MULTIPLE)
  static = dict(graphdef=graphdef, greedy=temperature == 0.0)

  # ---- compile (ahead of time) ----------------------------------------------------------
  t0 = time.perf_counter()
  prefill = gen.prefill.lower(params=params, tokens=tokens, positions=positions,
                              lengths=lengths, key=key, sampling=sampling, eos=eos,
                              width=width, **static).compile()
  compile_s = time.perf_counter() - t0
  carry = prefill(params=params, tokens=tokens, positions=positions, lengths=lengths, key=key,
                  sampling=sampling, eos=eos)
  t0 = time.perf_counter()
  step = gen.decode_step.lower(params=params, carry=carry, key=key, sampling=sampling, eos=eos,
                               **static).compile()
  compile_s += time.perf_counter() - t0

  # ---- prefill ---------------------------------------------------------------------------
  def run_prefill():
    return jax.block_until_ready(prefill(params=params, tokens=tokens, positions=positions,
                                         lengths=lengths, key=key, sampling=sampling, eos=eos))

  prefill_s = _best(run_prefill)

  # ---- decode: n - 1 cached steps dispatched back to back -----------------------------------
  def run_decode():
    c = run_prefill()
    t = time.perf_counter()
    for _ in range(n - 1):
      c = step(params=params, carry=c, key=key, sampling=sampling, eos=eos)
    jax.block_until_ready(c)
    return time.perf_counter() - t

  run_decode()  # warm-up
  decode_s = min(run_decode() for _ in range(3))
  per_token_s = decode_s / (n - 1)

  result = dict(
      tokens_per_s=round(b / per_token_s, 1), batch=b, prompt_len=p, max_new_tokens=n,
      prefill_s=round(prefill_s, 5), per_token_ms=round(per_token_s * 1e3, 4),
      compile_s=round(compile_s, 2),
      prefill_tokens_per_s=round(b * p / prefill_s, 1),
      params=count_params(cfg), dim=cfg.dim, n_layers=cfg.n_layers, dtype=cfg.dtype,
      param_dtype=cfg.param_dtype, greedy=temperature == 0.0, top_k=top_k, top_p=top_p,
      device=jax.devices()[0].device_kind, backend=jax.default_backend())

  if _E2E.value:
    kw = dict(max_new_tokens=n, temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    t0 = time.perf_counter()
    gen.generate(model, prompts, **kw)  # compiles the while_loop
    result["e2e_compile_s"] = round(time.perf_counter() - t0, 2)
    e2e_s = _best(lambda: gen.generate(model, prompts, **kw))
    result["e2e_tokens_per_s"] = round(b * n / e2e_s, 1)

  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
