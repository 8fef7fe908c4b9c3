"""lm-evaluation-harness (the `lm_eval` package, `pip install -e '.[eval]'`) over llama_jax
models: importing this registers the model name `llama_jax` (adapter.LlamaJaxLM).

    python -m llama_jax.lm_eval --workdir=DIR[@STEP] | --hf_dir=DIR --tasks=T1,T2
        [--include_path=YAML_DIR] [--limit=N] [--num_fewshot=K] [--batch_size=8]
        [--output_path=results.json]
"""

from llama_jax.lm_eval.adapter import LlamaJaxLM, bucket  # noqa: F401  (registers the model)
