"""Llama-2-13B (13.0B parameters): the published dimensions, bf16 compute, full remat.

Launch on a pod slice (one command per host; see experiments/ and llama_jax.sweep for
launchers), with a prepared tfds corpus and Meta's tokenizer:
  python run_train.py --config=configs/llama2_13b.py --workdir=gs://BUCKET/llama2_13b \
    --config.data.name=c4 --config.data.data_dir=gs://BUCKET/tfds \
    --config.data.tokenizer=/path/to/tokenizer.model
Check the memory plan first (nothing allocated):
  python run_train.py --config=configs/llama2_13b.py --dry_run --config.mesh.fsdp=64
Should reach: about 1.65 training loss after 2T tokens on Meta's data mix (Touvron et al.
2023, fig. 5); other corpora land elsewhere.
Mesh: fsdp=-1.
"""

from configs import base


def get_config(arg=None):
  return base.published_size("llama2_13b", seq_len=4096)
