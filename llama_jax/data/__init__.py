"""Data: corpora (tfds builders), tokenizers, the token cache, mixtures and the step-indexed
loaders.

  tokenizer, train, evaluation = make_loaders(config, batch_sharding)
  for step, batch in train.iterate(start_step): ...      # batch: {'inputs', 'targets', ...}
  evaluation.batch(i)                                      # a fixed function of i

Importing this package registers the `python_stdlib` and `text_files` tfds builders.
"""

from llama_jax.data.cache import TokenFile, token_file
from llama_jax.data.corpora import (Corpus, PythonStdlib, TextFiles, build_corpus, cache_root,
                                    data_root, open_corpus, stdlib_config, stdlib_files)
from llama_jax.data.errors import DataError
from llama_jax.data.loader import (Loader, MixtureLoader, SyntheticLoader, TokenLoader,
                                   make_loaders, make_tokenizer, segments)
from llama_jax.data.tokenizer import (ByteTokenizer, SpmTokenizer, Tokenizer, load_tokenizer,
                                      saved_tokenizer, tokenizer_from_path, train_spm)

__all__ = [
    "ByteTokenizer", "Corpus", "DataError", "Loader", "MixtureLoader", "PythonStdlib",
    "SpmTokenizer", "SyntheticLoader", "TextFiles", "TokenFile", "TokenLoader", "Tokenizer", "build_corpus",
    "cache_root", "data_root", "load_tokenizer", "make_loaders", "make_tokenizer", "open_corpus",
    "saved_tokenizer", "segments", "stdlib_config", "stdlib_files", "token_file", "tokenizer_from_path", "train_spm",
]
