"""lm-evaluation-harness (the `lm_eval` package, `pip install -e '.[eval]'`) over llama_jax
models: importing this registers the model name `llama_jax` (adapter.LlamaJaxLM).

    python -m llama_jax.lm_eval --workdir=DIR[@STEP] | --hf_dir=DIR --tasks=T1,T2
        [--include_path=YAML_DIR] [--limit=N] [--num_fewshot=K] [--batch_size=8]
        [--output_path=results.json] [--apply_chat_template]
"""

try:
  import lm_eval as _lm_eval  # noqa: F401
except ImportError as e:  # one line from the CLI instead of a traceback
  from llama_jax.errors import UserError
  raise UserError("llama_jax.lm_eval needs lm-evaluation-harness: pip install -e '.[eval]' "
                  "(lm-eval==0.4.13)") from e

from llama_jax.lm_eval.adapter import LlamaJaxLM, bucket  # noqa: E402,F401  (registers it)
