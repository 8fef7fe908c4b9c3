"""Text generation: `decode` (KV-cache prefill and decoding, sampling); the CLI is __main__
(`python -m llama_jax.generate --workdir DIR | --hf_dir DIR --prompt ...`)."""
