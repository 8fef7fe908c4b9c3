"""Llama-3.1-8B at 131,072 tokens per row: the sequence split over the context mesh axis
(docs/long_context.md), splash attention, Llama 3.1's RoPE scaling, full remat.

arg: the context degree (default 8), e.g. `configs/llama3_8b_128k.py:4`. The batch is one row
per context group: batch = fsdp = devices / context, so every chip holds 131,072 / context
tokens of activations and 1 / devices of the parameters (fsdp x context split them).
Check the TPU compiler's plan on a CPU machine (nothing allocated):
  python run_train.py --config=configs/llama3_8b_128k.py:8 --dry_run --topology=v5p-16
Should reach: no published loss curve; use the passkey check (llama_jax.passkey) for the
context it really uses.
Mesh: data=1, fsdp=devices/context (set with batch_size for another slice), context=arg.
"""

from configs import base

SEQ_LEN = 131_072


def get_config(arg=None):
  context = int(arg or 8)
  config = base.published_size("llama3_8b", seq_len=SEQ_LEN)
  config.model.update(dict(max_seq_len=SEQ_LEN, attention="splash", attention_block=512,
                           rope_scaling=dict(factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0,
                                             original_max_position_embeddings=8192)))
  fsdp = 8 // context  # a v5p-16 (8 chips); scale fsdp and batch_size together for more
  config.data.batch_size = fsdp
  config.mesh.update(dict(data=1, fsdp=fsdp, context=context, tensor=1))
  return config
