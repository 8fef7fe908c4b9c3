"""A real spike: a byte-level mixture whose middle phase is garbage (random characters), trained
with skip-step and rollbacks on (llama_jax/spikes.py, llama_jax/rollback.py), as run_train.py
runs it. One set of runs, started together, serves every check (one test, so that
pytest-xdist never trains them twice):

  garbage   the garbage phase at data positions 16-21 of 48 steps: skips, then a rollback
  clean     the same run without the garbage phase (its weight 0): the control
  killed    the garbage run again, SIGKILLed after its rollback and its first checkpoint
            after it, then resumed: bitwise the garbage run
  absurd    lr 1e30: NaN whatever it does; stops after its 2 rollbacks with one line
"""

import json
import os
import random
import signal
import string
import subprocess
import sys
import sysconfig
import time

import jax
import numpy as np
import pytest

from llama_jax import checkpoint
from llama_jax import config as config_lib
from llama_jax import train
from tests.training_process import ROOT, env

pytestmark = pytest.mark.slow

# Real text that does not change with this repository (the package's own source did: a commit
# could move the clean control's spikes): the running Python's asyncio package, 33 files, 490 kB
# on 3.11.
CLEAN = f"files:{sysconfig.get_paths()['stdlib']}/asyncio/*.py"
GARBAGE_FROM, GARBAGE_TO, STEPS = 16, 22, 48


def _overrides(tmp, garbage: bool, **extra) -> dict:
  junk = f"files:{tmp}/junk/*.txt"
  mixture = (f"{CLEAN}=1,{junk}=0; {GARBAGE_FROM}: {junk}=1; {GARBAGE_TO}: {CLEAN}=1"
             if garbage else f"{CLEAN}=1,{junk}=0")
  return {
      "data.name": "text_files", "data.files": f"{tmp}/junk/*.txt", "data.tokenizer": "byte",
      "data.mixture": mixture, "data.data_dir": f"{tmp}/cache", "data.seq_len": 32,
      "data.batch_size": 8, "model.vocab_size": 259, "model.dim": 48, "model.ffn_dim": 88,
      "model.max_seq_len": 32, "model.remat": "none", "model.attention": "xla",
      "train.steps": STEPS, "train.log_every": 2, "train.eval_every": STEPS,
      "train.eval_steps": 2, "train.checkpoint_every": 4, "train.keep_checkpoints": 20,
      "train.sample_tokens": 0, "optim.warmup_steps": 4, "optim.lr": 1e-2,
      # 6 sigma over the last 8 accepted steps; more than 2 skips in 8 steps roll back.
      "train.spike_sigma": 6.0, "train.spike_window": 8, "train.max_skips": 2,
      "train.max_rollbacks": 2, "mesh.data": -1, **extra}


def _config(overrides):
  c = config_lib.defaults("tiny")
  c.update_from_flattened_dict(overrides)
  config_lib.validate(c)
  return c


def _start(workdir, overrides, cache):
  """run_train.py on one CPU device, its output in files (no pipe to fill). The runs share
  jax's persistent compilation cache: the same programs compile once (bitwise the same
  executables), and the counter-based PRNG the in-process tests use compiles faster."""
  os.makedirs(workdir, exist_ok=True)
  argv = [sys.executable, "run_train.py", "--config=configs/base.py:tiny", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in overrides.items()]]
  out, err = (open(os.path.join(workdir, f"{n}.txt"), "a") for n in ("stdout", "stderr"))
  return subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, text=True, env=env(
      1, JAX_DEFAULT_PRNG_IMPL="unsafe_rbg", JAX_COMPILATION_CACHE_DIR=str(cache),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0"))


def _finish(proc, workdir, timeout=300):
  proc.wait(timeout=timeout)
  return proc.returncode, *(open(os.path.join(workdir, f"{n}.txt")).read()
                           for n in ("stdout", "stderr"))


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _final_losses(workdir):
  """step -> the loss its last line says (after a rollback or a resume, the redone steps)."""
  return {m["step"]: m["loss"] for m in _lines(workdir) if "loss" in m}


def _final_state(workdir):
  setup = train.make_setup(config_lib.read(workdir))
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  state = ckpt.restore(ckpt.steps()[-1], setup.abstract_state)
  ckpt.close()
  return jax.device_get(state)


def _wait_for_a_step(proc, workdir, timeout=300):
  path, t0 = os.path.join(workdir, "metrics.jsonl"), time.time()
  while not (os.path.exists(path) and any("loss" in m for m in _lines(workdir))):
    assert proc.poll() is None and time.time() - t0 < timeout, "no step logged"
    time.sleep(0.05)


def _kill_after_rollback(proc, workdir, timeout=240):
  """SIGKILL once the run has rolled back and committed a checkpoint after the step it
  restored: that checkpoint carries the moved data offset."""
  path, t0 = os.path.join(workdir, "metrics.jsonl"), time.time()
  while time.time() - t0 < timeout:
    assert proc.poll() is None, "the run ended before it could be killed after its rollback"
    if os.path.exists(path):
      rollbacks = [m for m in _lines(workdir) if "rollback_to" in m]
      ckpts = os.listdir(os.path.join(workdir, "checkpoints"))
      if rollbacks and any(d.isdigit() and int(d) > rollbacks[0]["rollback_to"] for d in ckpts):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return rollbacks[0]
    time.sleep(0.02)
  raise AssertionError("no rollback and checkpoint after it within the timeout")


def _train_all(tmp):
  """Starts the four runs (the garbage run and the one to kill first, the others once its
  programs are in the compilation cache), kills one after its rollback and resumes it."""
  rng = random.Random(0)
  os.makedirs(tmp / "junk")
  for i in range(4):  # 4 documents: one goes to the validation split
    (tmp / "junk" / f"g{i}.txt").write_text(
        "".join(rng.choice(string.printable[:94]) for _ in range(4000)))
  from llama_jax import data  # the token caches, once, before the runs read them together
  data.make_loaders(_config(_overrides(tmp, True)))
  plans = {"garbage": _overrides(tmp, True), "clean": _overrides(tmp, False),
           "killed": _overrides(tmp, True),
           "absurd": _overrides(tmp, False, **{"optim.lr": 1e30, "optim.clip_norm": 0.0})}
  cache = tmp / "jax_cache"
  start = lambda name: _start(str(tmp / name), plans[name], cache)  # noqa: E731
  procs = {name: start(name) for name in ("garbage", "absurd")}
  _wait_for_a_step(procs["garbage"], str(tmp / "garbage"))  # its programs are in the cache
  procs.update({name: start(name) for name in ("clean", "killed")})
  killed_at = _kill_after_rollback(procs["killed"], str(tmp / "killed"))
  resumed = start("killed")
  out = {name: _finish(p, str(tmp / name)) for name, p in procs.items() if name != "killed"}
  out["killed"] = _finish(resumed, str(tmp / "killed"))
  return out, killed_at


def _check_garbage_run(tmp, out):
  for name in ("garbage", "clean"):
    assert out[name][0] == 0, out[name][2][-3000:]
  garbage, clean = _lines(tmp / "garbage"), _lines(tmp / "clean")
  rollbacks = [m for m in garbage if "rollback_to" in m]
  assert rollbacks and "skipped as loss or grad norm spikes" in rollbacks[0]["rollback_reason"]
  # Restored from before the garbage (positions 16-21), the data moved past what it read.
  assert rollbacks[0]["rollback_to"] <= GARBAGE_FROM < rollbacks[0]["step"]
  assert rollbacks[0]["data_offset"] == rollbacks[0]["step"] - rollbacks[0]["rollback_to"]
  last = [m for m in garbage if "loss" in m][-1]
  assert last["step"] == STEPS and last["skipped_steps"] >= 3 and last["rollbacks"] >= 1
  # The control: no garbage, no rollback, fewer skips (a window of 8 sees a few real spikes).
  assert not [m for m in clean if "rollback_to" in m]
  clean_skips = [m for m in clean if "loss" in m][-1]["skipped_steps"]
  assert clean_skips < last["skipped_steps"]
  key = f"eval_loss/{CLEAN}"
  final = {n: [m for m in lines if key in m][-1][key] for n, lines in
           (("garbage", garbage), ("clean", clean))}
  print("spike test: clean-source eval loss", final, "rollbacks", rollbacks,
        "skipped", last["skipped_steps"], "clean skipped", clean_skips)
  assert abs(final["garbage"] / final["clean"] - 1) < 0.03, final
  # The goodput of the attempt: the rollback's abandoned steps are lost work.
  from llama_jax.goodput import report
  summary = report.summarize(garbage)
  assert summary["attempts"][0]["lost_s"] > 0 and summary["total"]["goodput"] > 0


def _check_killed_run(tmp, out, killed_at):
  code, stdout, stderr = out["killed"]
  assert code == 0, stderr[-3000:]
  assert "resumed from step" in stdout + stderr
  a, b = _final_losses(tmp / "garbage"), _final_losses(tmp / "killed")
  assert sorted(a) == sorted(b) and a == b  # bitwise: JSON floats round-trip exactly
  sa, sb = _final_state(tmp / "garbage"), _final_state(tmp / "killed")
  assert int(sa["step"]) == int(sb["step"]) == STEPS
  assert int(sb["guard"]["offset"]) == killed_at["data_offset"] > 0
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(x, y)
  # Two attempts, the first killed without a final line.
  ends = [m.get("goodput/end") for m in _lines(tmp / "killed") if "goodput/end" in m]
  assert ends == ["finished"]
  attempts = {m["goodput/attempt"] for m in _lines(tmp / "killed") if "goodput/attempt" in m}
  assert attempts == {1, 2}


def _check_absurd_run(tmp, out):
  code, stdout, stderr = out["absurd"]
  assert code == 2
  error = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1 and error[0] == stderr.strip().splitlines()[-1]
  assert error[0].startswith("error: diverged: ") and "after 2 rollback(s)" in error[0]
  assert "found at step" in error[0] and "Traceback" not in stderr
  lines = _lines(tmp / "absurd")
  assert len([m for m in lines if "rollback_to" in m]) == 2
  assert lines[-1]["goodput/end"] == "diverged"
  # Nothing of the trouble stays as the newest checkpoint (a rerun starts before it); what
  # was saved during it is set aside, not deleted.
  assert not [d for d in os.listdir(tmp / "absurd" / "checkpoints") if d.isdigit()]
  assert os.listdir(tmp / "absurd" / "checkpoints_rolled_back")


def test_a_garbage_phase_is_skipped_rolled_back_and_a_kill_after_it_resumes_bitwise(tmp_path):
  """The garbage run recovers to within 3% of the clean one, the killed and resumed one is
  bitwise the garbage run, and the absurd one stops after its rollbacks with one line."""
  out, killed_at = _train_all(tmp_path)
  _check_garbage_run(tmp_path, out)
  _check_killed_run(tmp_path, out, killed_at)
  _check_absurd_run(tmp_path, out)
