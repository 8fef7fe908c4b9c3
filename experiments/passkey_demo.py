"""Passkey demonstration on CPU: a tiny byte-level Llama trained from scratch on a few hundred
passkey prompts of 1,024 tokens with each row split over 2 fake CPU devices (mesh.context=2),
then scored by `python -m llama_jax.passkey` at the length it saw, shorter ones and longer ones.

  python experiments/passkey_demo.py --workdir=/tmp/passkey_demo --out=experiments/results/passkey

Steps (each a subprocess, so the fake devices are set before jax starts):
1. data: `passkey.texts(500, (1023,))` as WORKDIR/data/passkey.jsonl, one {"text"} a line;
   with the byte tokenizer each document is BOS + 1,022 bytes + EOS = 1,024 tokens, exactly
   one training row (the loader cuts the stream into windows of seq_len, so every row is one
   whole prompt with its answer; every token counts in the loss).
2. train: run_train.py, model dim 64, 2 layers, 4 heads, byte vocabulary (259), seq_len 1024,
   8 rows a step, --steps steps (300; a checkpoint every 50), no remat, on XLA_FLAGS=--xla_force_host_platform_device_count=2
   with mesh.context=2 (each device holds 2 of the 4 load-balanced chunks of 256 tokens).
   model.max_seq_len=4096 only sizes the RoPE table, so the scorer can run past 1,024.
3. score: python -m llama_jax.passkey on the run, lengths 256 .. 2048, depths 0 .. 1, SAMPLES
   prompts a cell with keys it never trained on; writes OUT/passkey.md, OUT/passkey.png and
   OUT/results.json (the cells, the run's losses, the commands and their wall times).

Prediction (written before running): the filler repeats every ~90 bytes, so a 2-layer model
learns an induction (copy) mechanism early, and "The pass key is " in the question matches the
needle, so the key is copied from wherever it sits. Accuracy high (>= 0.8) at the trained
length 1024 at every depth, and at the shorter lengths 256 and 512 (positions it saw); lower
beyond it, at 1536 and 2048, where RoPE meets positions never trained on (expect < 0.5 at
2048, worst for keys deep in the far past, i.e. small depths). If the model does not learn
the task in the budget (300 steps, ~25 min of training on 2 shared cores), every cell is ~0 and this is
reported as a miss.

Result (stopped for time at step 150 of 300, 18 minutes, scored there with --score_only):
accuracy 0.00 in every cell, per-digit accuracy at chance; the prediction missed (the filler
is learnt from local n-grams, no copy mechanism formed). Details: experiments/results/passkey/
and docs/long_context.md ("The passkey demonstration").
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from llama_jax import passkey

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/passkey_demo", "Data and the run go here.")
_OUT = flags.DEFINE_string("out", "experiments/results/passkey", "The results folder.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps.")
_SAMPLES = flags.DEFINE_integer("samples", 8, "Scored prompts per (length, depth).")
_SCORE_ONLY = flags.DEFINE_bool("score_only", False,
                                "Score WORKDIR/run's newest checkpoint without training.")

DOCS, TOKENS = 500, 1024
LENGTHS = "256,512,1024,1536,2048"
DEPTHS = "0,0.25,0.5,0.75,1"


def overrides(data_file: str, data_dir: str, steps: int) -> list[str]:
  """run_train.py's --config.KEY=VALUE flags of the demo's run."""
  keys = {
      "data.name": "text_files", "data.files": data_file, "data.data_dir": data_dir,
      "data.tokenizer": "byte", "data.seq_len": TOKENS, "data.batch_size": 8,
      "data.packing": True,
      "model.vocab_size": 259, "model.dim": 64, "model.n_layers": 2, "model.n_heads": 4,
      "model.n_kv_heads": 4, "model.ffn_dim": 176, "model.max_seq_len": 4096,
      "model.remat": "none",
      "mesh.context": 2, "mesh.data": 1,
      "optim.lr": 3e-3, "optim.warmup_steps": 50,
      "train.steps": steps, "train.log_every": 10, "train.eval_every": steps,
      "train.eval_steps": 1, "train.checkpoint_every": 50, "train.sample_tokens": 0,
  }
  return [f"--config.{k}={v}" for k, v in keys.items()]


def timed(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
  """Runs cmd (its output passed through, stdout also returned) and its wall seconds."""
  print("$", " ".join(cmd), flush=True)
  start = time.time()
  proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
  print(proc.stdout, end="", flush=True)
  if proc.returncode:
    raise SystemExit(f"{cmd[1]} failed with exit status {proc.returncode}")
  return proc.stdout, time.time() - start


def main(argv):
  del argv
  workdir, out = os.path.abspath(_WORKDIR.value), _OUT.value
  data_file = os.path.join(workdir, "data", "passkey.jsonl")
  os.makedirs(os.path.dirname(data_file), exist_ok=True)
  os.makedirs(out, exist_ok=True)
  run = os.path.join(workdir, "run")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  train = [sys.executable, "run_train.py", "--config=configs/default.py", f"--workdir={run}",
           *overrides(data_file, os.path.join(workdir, "data"), _STEPS.value)]
  train_s = None
  if not _SCORE_ONLY.value:
    with open(data_file, "w") as f:
      for text in passkey.texts(DOCS, (TOKENS - 1,), seed=0):
        f.write(json.dumps({"text": text}) + "\n")
    _, train_s = timed(train, env)
  score = [sys.executable, "-m", "llama_jax.passkey", f"--workdir={run}",
           f"--lengths={LENGTHS}", f"--depths={DEPTHS}", f"--samples={_SAMPLES.value}",
           f"--out={os.path.join(out, 'passkey')}"]
  printed, score_s = timed(score)
  cells = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
  with open(os.path.join(run, "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f]
  losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m and "step" in m]
  evals = [m for m in metrics if any(k.startswith("eval") for k in m)]
  scored = max(int(d) for d in os.listdir(os.path.join(run, "checkpoints")) if d.isdigit())
  result = dict(cells=cells, trained_length=TOKENS, documents=DOCS, steps=_STEPS.value,
                scored_step=scored,
                first_loss=losses[0] if losses else None,
                last_loss=losses[-1] if losses else None, eval=evals[-1] if evals else None,
                train_command=" ".join(train[1:]), score_command=" ".join(score[1:]),
                train_seconds=train_s and round(train_s), score_seconds=round(score_s))
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(passkey.table(cells))


if __name__ == "__main__":
  app.run(main)
