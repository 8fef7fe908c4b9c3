"""Trains a LLaMA model: python run_train.py --config=configs/default.py --workdir=DIR.

The program is llama_jax.__main__ (also `python -m llama_jax`); its docstring lists the flags.
Guide: docs/training.md.
"""

from llama_jax.__main__ import run

if __name__ == "__main__":
  run()
