"""Llama-3-8B (8.03B parameters): the published dimensions, bf16 compute, full remat.

Launch on a pod slice (one command per host; see experiments/ and llama_jax.sweep for
launchers), with a prepared tfds corpus. Llama 3's own tokenizer is tiktoken-based, not
SentencePiece: data.tokenizer='spm' trains a 128256-piece BPE on the corpus instead.
  python run_train.py --config=configs/llama3_8b.py --workdir=gs://BUCKET/llama3_8b \
    --config.data.name=c4 --config.data.data_dir=gs://BUCKET/tfds
Check the memory plan first (nothing allocated):
  python run_train.py --config=configs/llama3_8b.py --dry_run --config.mesh.fsdp=64
Should reach: Meta trained on 15T tokens and published no loss curve; compare downstream
evaluations instead.
Mesh: fsdp=-1.
"""

from configs import base


def get_config(arg=None):
  return base.published_size("llama3_8b", seq_len=8192)
