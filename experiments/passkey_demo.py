"""Passkey demonstration on CPU: a tiny byte-level Llama pretrained on short passkey documents,
then fine-tuned on a few hundred passkey prompts of ~2k tokens with each row split over 2 fake CPU
devices (mesh.context=2), both scored by `python -m llama_jax.passkey` at the lengths each saw
and beyond.

  python experiments/passkey_demo.py --workdir=/tmp/passkey_demo --out=experiments/results/passkey

Steps (each a subprocess, so the fake devices are set before jax starts):
1. data: every document exactly one row of its stage's seq_len, from
   `passkey.texts(..., row=ROW)`: the prompt (its length drawn from the stage's range),
   then the key and as much filler as fills the row (". " and the filler), then EOS. Equal
   documents tile the loader's windows, so none is cut by a window's edge (which would leave
   its answer without its needle), while the key's position in the row still varies.
2. base: run_train.py from scratch on BASE documents of 250-319 tokens in rows of 320, as
   plain text (every token in the loss: the needle's second copy of the key, 15 tokens after
   the first, is a short copy that teaches the copying the answer needs), mesh.context=1:
   the "short-context pretraining".
3. long: the fine-tune, `train.init_from` the base run (a fresh optimizer), on LONG
   documents of 1,792-2,047 tokens in rows of 2,048, plain text again (prompt/completion
   records, which leave the prompt's positions untrained, lost the base's first-digit
   retrieval: docs/long_context.md), on XLA_FLAGS=--xla_force_host_platform_device_count=2
   with mesh.context=2 (each device holds 2 of the 4 load-balanced chunks of 512 tokens).
4. score: python -m llama_jax.passkey on both runs, lengths 256 .. 4,096, depths 0 .. 1,
   --samples prompts a cell, keys drawn from another seed; writes OUT/base.{md,png},
   OUT/passkey.{md,png} (the fine-tune) and OUT/results.json (the cells, the runs' losses,
   the commands and their wall times).

Model: dim 128, 2 layers, 4 heads, byte vocabulary (259), no remat; model.max_seq_len=8192
only sizes the RoPE table, so the scorer can run past what either run saw.
--base_run=DIR takes a base run made with the same settings instead of training one (the
committed results' base is such a run: docs/long_context.md says which).

Result (docs/long_context.md, "The passkey demonstration", with how it got there): whole keys
0.75-1.00 at 256-1,536 tokens at every depth after the fine-tune, 0.00-0.69 at 2,048 (the
rows' own length, where the model predicts the row's end), at 3,072-4,096 found from within
~2,000 tokens of the question only; the base 1.00 at 256, ~0 beyond.

First prediction (committed before the first fine-tune ran, after the probes in
docs/long_context.md, whose best base got 0.97 of whole keys at 260 tokens at step 1,900):
the base retrieves whole keys (>= 0.8) at 256 tokens, less at 512 (positions past its 320),
~0 from 1,024 on; the fine-tune >= 0.8 at 1,536 and 2,048 (its rows), also high at 256 to
1,024 (shorter distances, positions it saw), lower at 3,072 and 4,096 (past its rows).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from llama_jax import passkey

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/passkey_demo", "Data and the runs go here.")
_OUT = flags.DEFINE_string("out", "experiments/results/passkey", "The results folder.")
_BASE_STEPS = flags.DEFINE_integer("base_steps", 6000, "Training steps of the base run.")
_LONG_STEPS = flags.DEFINE_integer("long_steps", 400, "Training steps of the fine-tune.")
_LONG_LR = flags.DEFINE_float("long_lr", 3e-3, "Peak learning rate of the fine-tune (the base's "
                              "is 3e-3).")
_SAMPLES = flags.DEFINE_integer("samples", 16, "Scored prompts per (length, depth).")
_SCORE_ONLY = flags.DEFINE_bool("score_only", False,
                                "Score both runs' newest checkpoints without training.")
_BASE_RUN = flags.DEFINE_string("base_run", "", "An existing base run (same settings) to use.")

MODEL = {"model.vocab_size": 259, "model.dim": 128, "model.n_layers": 2, "model.n_heads": 4,
         "model.n_kv_heads": 4, "model.ffn_dim": 352, "model.max_seq_len": 8192,
         "model.remat": "none"}
# name: (documents, their prompts' lengths in tokens, data seed, seq_len = a document's
# length, rows a step, mesh.context, documents as "text" (every token counted) or "records"
# (prompt/completion: the completion counted))
STAGES = {"base": (4000, (250, 319), 7, 320, 16, 1, "text"),
          "long": (400, (1792, 2047), 8, 2048, 4, 2, "text")}
LENGTHS = "256,512,1024,1536,2048,3072,4096"
DEPTHS = "0,0.25,0.5,0.75,1"


def overrides(stage: str, data_dir: str, steps: int, init_from: str = "") -> list[str]:
  """run_train.py's --config.KEY=VALUE flags of one stage's run."""
  _, _, _, seq_len, rows, context, _ = STAGES[stage]
  keys = {
      "data.name": "text_files", "data.files": os.path.join(data_dir, "passkey.jsonl"),
      "data.data_dir": data_dir, "data.tokenizer": "byte", "data.seq_len": seq_len,
      "data.batch_size": rows, "data.packing": True, **MODEL,
      "mesh.context": context, "mesh.data": 1,
      "optim.lr": _LONG_LR.value if stage == "long" else 3e-3, "optim.warmup_steps": 50,
      "train.steps": steps, "train.log_every": 25, "train.eval_every": steps,
      "train.eval_steps": 1, "train.checkpoint_every": 100, "train.sample_tokens": 0,
  }
  if init_from:
    keys["train.init_from"] = init_from
  return [f"--config.{k}={v}" for k, v in keys.items()]


def write_records(stage: str, data_dir: str) -> None:
  n, (lo, hi), seed, row, *_, kind = STAGES[stage]
  lengths = tuple(range(lo, hi + 1))
  docs = ([{"text": t} for t in passkey.texts(n, lengths, seed=seed, row=row)] if kind == "text"
          else passkey.records(n, lengths, seed=seed, row=row))
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, "passkey.jsonl"), "w") as f:
    for doc in docs:
      f.write(json.dumps(doc) + "\n")


def timed(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
  """Runs cmd (its output passed through, stdout also returned) and its wall seconds."""
  print("$", " ".join(cmd), flush=True)
  start = time.time()
  proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
  print(proc.stdout, end="", flush=True)
  if proc.returncode:
    raise SystemExit(f"{cmd[1]} failed with exit status {proc.returncode}")
  return proc.stdout, time.time() - start


def losses(run: str) -> dict:
  with open(os.path.join(run, "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f]
  train = [(m["step"], round(m["loss"], 4)) for m in metrics if "loss" in m and "step" in m]
  evals = [(m["step"], round(m["eval_loss"], 4)) for m in metrics if "eval_loss" in m]
  return dict(train=train, eval=evals)


def main(argv):
  del argv
  workdir, out = os.path.abspath(_WORKDIR.value), _OUT.value
  os.makedirs(out, exist_ok=True)
  runs = {s: os.path.join(workdir, s) for s in STAGES}
  if _BASE_RUN.value:
    runs["base"] = os.path.abspath(_BASE_RUN.value)
  steps = {"base": _BASE_STEPS.value, "long": _LONG_STEPS.value}
  result = dict(stages={s: dict(zip(("documents", "lengths", "seed", "seq_len", "rows",
                                     "context", "kind"), v), steps=steps[s])
                        for s, v in STAGES.items()},
                model=MODEL, samples=_SAMPLES.value, long_lr=_LONG_LR.value)
  for stage in STAGES:
    data_dir = os.path.join(workdir, "data", stage)
    context = STAGES[stage][5]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={context}")
    cmd = [sys.executable, "run_train.py", "--config=configs/default.py",
           f"--workdir={runs[stage]}",
           *overrides(stage, data_dir, steps[stage], runs["base"] if stage == "long" else "")]
    result["stages"][stage]["train_command"] = " ".join(cmd[1:])
    if not _SCORE_ONLY.value and not (stage == "base" and _BASE_RUN.value):
      write_records(stage, data_dir)
      _, result["stages"][stage]["train_seconds"] = timed(cmd, env)
    result["stages"][stage]["losses"] = losses(runs[stage])
  for stage, name in (("base", "base"), ("long", "passkey")):
    score = [sys.executable, "-m", "llama_jax.passkey", f"--workdir={runs[stage]}",
             f"--lengths={LENGTHS}", f"--depths={DEPTHS}", f"--samples={_SAMPLES.value}",
             f"--seed=1000", f"--out={os.path.join(out, name)}"]
    printed, seconds = timed(score)
    cells = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    result["stages"][stage].update(cells=cells, score_command=" ".join(score[1:]),
                                   score_seconds=round(seconds))
    print(f"{stage}, whole keys:\n{passkey.table(cells)}\nkey tokens:\n"
          f"{passkey.table(cells, 'token_accuracy')}", flush=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
