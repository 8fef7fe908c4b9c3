"""run_train.py as a user runs it: the CLI, config errors, and exact resume after SIGKILL /
SIGTERM, in subprocesses on 8 forced CPU devices."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import training_process
from tests.training_process import ROOT

# training_process's tiny run on a mesh of all three axes.
ARGS = [*training_process.TINY_RUN, "--config.mesh.data=2", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2"]


def _start(workdir, *extra):
  return training_process.start(workdir, ARGS, *extra)


def _run(workdir, *extra, check=True):
  return training_process.finish(_start(workdir, *extra), check=check)[0]


def _losses(workdir):
  """step -> loss; after a resume the re-run steps overwrite the earlier lines."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      d = json.loads(line)
      if "loss" in d:
        out[d["step"]] = d["loss"]
  return out


def _committed_checkpoints(workdir):
  """Step directories Orbax has finalised (in-progress saves carry a tmp suffix)."""
  d = os.path.join(workdir, "checkpoints")
  return [n for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []


def _wait_for_step(proc, workdir, step, timeout=300):
  """Until the run has logged `step` and finalised at least one checkpoint."""
  path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError("run ended before step %d: %s" % (step, proc.stderr.read()[-2000:]))
    if (os.path.exists(path) and max(_losses(workdir) or [0]) >= step
        and _committed_checkpoints(workdir)):
      return
    time.sleep(0.05)
  raise AssertionError("timed out")


def _final_params(workdir):
  from llama_jax import checkpoint, train
  from llama_jax import config as config_lib
  setup = train.make_setup(config_lib.read(workdir))
  ckpt = checkpoint.Checkpointer(workdir, keep=10, async_save=False)
  state = ckpt.restore(ckpt.steps()[-1], setup.abstract_state)
  ckpt.close()
  return jax.device_get(state)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  _run(workdir)
  return workdir


def _assert_same_run(a, b):
  la, lb = _losses(a), _losses(b)
  assert sorted(la) == list(range(1, 11)) and sorted(lb) == sorted(la)
  assert la == lb  # bitwise: JSON floats round-trip exactly
  pa, pb = _final_params(a), _final_params(b)
  assert int(pa["step"]) == int(pb["step"]) == 10
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(reference, tmp_path):
  kill_at = random.Random(os.getpid()).randint(3, 8)
  proc = _start(str(tmp_path))
  _wait_for_step(proc, str(tmp_path), kill_at)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  _, out, err = _run(str(tmp_path))
  assert "resumed from step" in out + err
  _assert_same_run(reference, str(tmp_path))


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_is_exact(reference, tmp_path):
  proc = _start(str(tmp_path))
  _wait_for_step(proc, str(tmp_path), 3)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-2000:]
  assert "stopped by SIGTERM at step" in out + err
  stopped = int((out + err).split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert str(stopped) in os.listdir(tmp_path / "checkpoints")
  _run(str(tmp_path))
  _assert_same_run(reference, str(tmp_path))


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_skipped(reference, tmp_path):
  import shutil
  work = tmp_path / "w"
  shutil.copytree(reference, work)
  # Drop steps 6..10 so the run must redo them, then corrupt step 4's array data.
  for step in ("6", "8", "10"):
    shutil.rmtree(work / "checkpoints" / step)
  newest = work / "checkpoints" / "4" / "state"
  for root, _, files in os.walk(newest):
    for f in files:
      if not f.endswith((".json", "_METADATA")) and "manifest" not in f:
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  _, out, err = _run(str(work))
  assert "checkpoint 4 is unreadable" in out + err
  assert "resumed from step 2" in out + err
  assert os.path.isdir(work / "checkpoints_unreadable" / "4")  # moved aside, not deleted
  _assert_same_run(reference, str(work))


def test_cli_config_errors_are_one_line(tmp_path):
  code, out, err = _run(str(tmp_path), "--config.model.n_heads=5", check=False)
  assert code == 2 and err.strip().splitlines() == [
      "error: model.dim=48 is not divisible by model.n_heads=5; choose n_heads that divides dim"]
  code, out, err = _run(str(tmp_path), "--config.model.bogus=1", check=False)
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert err.startswith("error: unknown config key 'model.bogus'")
  code, out, err = _run(str(tmp_path), "--config.model.dim=abc", check=False)
  assert code == 2 and err.strip().splitlines() == [
      "error: config key 'model.dim' takes an int, got 'abc'; e.g. --config.model.dim=256"]
  assert not os.listdir(tmp_path)  # refused before anything was written


@pytest.mark.slow
def test_dry_run_prints_memory_json(tmp_path):
  p = subprocess.run([sys.executable, "run_train.py", "--dry_run", *ARGS,
                      "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"],
                     cwd=ROOT, env=training_process.env(), capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  d = json.loads(p.stdout.strip().splitlines()[-1])
  for key in ("param_bytes_per_device", "opt_bytes_per_device", "temp_bytes_per_device",
              "flops_per_step", "compile_s"):
    assert key in d
  assert d["devices"] == 8
  total = d["params"] * 4
  # fsdp 4 x tensor 2 split every matrix 8 ways; only norms are replicated.
  assert total / 8 <= d["param_bytes_per_device"] <= 1.05 * total / 8
