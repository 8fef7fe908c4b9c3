"""Exact resume with a mixture, packing and sharded preparation, everything in a bucket of the
GCS emulator (workdir and data_dir), each process with its own local cache dir:

- SIGKILL once checkpoint 2 of 8 steps is committed, rerun: losses and final parameters bitwise those of
  an uninterrupted run;
- the same killed run resumed on 2 processes x 4 CPU devices (the same global mesh of 8): the
  same batches (its losses equal the uninterrupted run's to the mesh-invariance tolerance,
  where a different batch would move them by far more) and its eval lines carry
  eval_loss/<source> for both sources.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import object_store, training_process
from tests.object_store import gcs  # noqa: F401  (fixture)
from tests.test_data_mixture import write_two_sources
from tests.test_object_store import _final_params

ROOT = training_process.ROOT
pytestmark = pytest.mark.slow


def _args(corpus, data_dir):
  a, b = f"files:{corpus}/a/*.txt", f"files:{corpus}/b/*.jsonl"
  return [
      "--config=configs/base.py:tiny", "--config.data.name=text_files",
      f"--config.data.files={corpus}/a/*.txt", "--config.data.tokenizer=byte",
      f"--config.data.data_dir={data_dir}", f"--config.data.mixture={a}=3,{b}=1; 4: {b}=1",
      "--config.data.packing=true", "--config.data.shards=2", "--config.data.seq_len=24",
      "--config.data.batch_size=8", "--config.model.vocab_size=259", "--config.model.dim=48",
      "--config.model.ffn_dim=88", "--config.train.steps=8", "--config.train.log_every=1",
      "--config.train.eval_every=8", "--config.train.eval_steps=1",
      "--config.train.checkpoint_every=2", "--config.train.sample_tokens=0",
      "--config.train.keep_checkpoints=10", "--config.optim.warmup_steps=2",
      "--config.mesh.data=4", "--config.mesh.fsdp=2", "--config.mesh.tensor=1",
  ]


def _env(devices, cache):
  return training_process.env(devices, LLAMA_JAX_CACHE=str(cache))


def _start(workdir, args, cache, devices=8, *extra):
  return training_process.start(workdir, args, *extra, devices=devices,
                                LLAMA_JAX_CACHE=str(cache))


def _finish(*procs):
  return "".join(out + err for _, out, err in training_process.finish(*procs))


def _lines(workdir):
  """metrics.jsonl read through the emulator's own API (gcsfs in this process caches the
  listing copy_tree made, with the file's size before the rerun)."""
  name, _, key = workdir.split("://", 1)[1].partition("/")
  raw = object_store.read_object(name, f"{key}/metrics.jsonl")
  return [json.loads(x) for x in raw.decode().splitlines() if x]


def _losses(workdir):
  return {d["step"]: d["loss"] for d in _lines(workdir) if "loss" in d}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _runs(tmp_path_factory):
  """(uninterrupted run, killed-and-resumed run, killed run resumed on 2 processes, log)."""
  corpus = write_two_sources(tmp_path_factory.mktemp("corpus"))
  bucket = f"gs://{object_store.new_bucket('resume')}"
  args = _args(corpus, f"{bucket}/data")
  caches = [tmp_path_factory.mktemp(f"cache{i}") for i in range(3)]

  ref = f"{bucket}/reference"
  _finish(_start(ref, args, caches[0]))
  run = f"{bucket}/run"
  proc = _start(run, args, caches[1])
  name, key = bucket.split("://", 1)[1], "run/checkpoints/2/commit_success.txt"
  t0 = time.time()
  while key not in object_store.list_objects(name, "run/checkpoints/"):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() - t0 < 300, "no committed checkpoint after 300 s"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  two = f"{bucket}/two"
  # Copied by another process: gcsfs keeps listings per process, and one made here now would
  # hide from Orbax's listing below the checkpoints that the rerun adds.
  subprocess.run([sys.executable, "-c", "import sys; from llama_jax import storage; "
                  "storage.copy_tree(sys.argv[1], sys.argv[2])", run, two],
                 cwd=ROOT, env=_env(1, caches[1]), check=True, timeout=300)
  log = _finish(_start(run, args, caches[1]))
  port = _free_port()
  log2 = _finish(*[
      _start(two, args, caches[2 if i else 1], 4, f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}") for i in range(2)])
  return ref, run, two, log + log2


def test_resume_with_a_mixture_in_a_bucket_on_one_then_two_processes(gcs, tmp_path_factory):
  # One test, not three sharing a module fixture: pytest-xdist would run the five training
  # processes once on each worker that got one of them.
  runs = _runs(tmp_path_factory)
  _check_sigkill_then_resume_is_bitwise_exact(runs)
  _check_resumed_on_two_processes_sees_the_same_batches(runs)
  _check_evaluate_prints_each_sources_loss_and_bits_per_byte(runs, tmp_path_factory.mktemp("e"))


def _check_sigkill_then_resume_is_bitwise_exact(runs):
  ref, run, _, log = runs
  assert log.count("resumed from step 2") == 2  # the rerun and process 0 of the 2-process one
  a, b = _losses(ref), _losses(run)
  assert sorted(a) == list(range(1, 9)) and a == b
  pa, pb = _final_params(ref), _final_params(run)
  assert int(pa["step"]) == int(pb["step"]) == 8
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)


def _check_resumed_on_two_processes_sees_the_same_batches(runs):
  ref, _, two, _ = runs
  a, b = _losses(ref), _losses(two)
  assert sorted(b) == list(range(1, 9))
  for s in a:
    assert b[s] == pytest.approx(a[s], rel=1e-5)
  assert len({round(v, 3) for v in a.values()}) == 8  # steps differ: equal losses mean equal data
  evals = [d for d in _lines(two) if "eval_loss" in d]
  assert [d["step"] for d in evals][-1] == 8
  per = [k for k in evals[-1] if k.startswith("eval_loss/")]
  assert len(per) == 2
  assert evals[-1]["eval_loss"] == pytest.approx(np.mean([evals[-1][k] for k in per]))


def _check_evaluate_prints_each_sources_loss_and_bits_per_byte(runs, tmp_path):
  ref = runs[0]
  out = subprocess.run([sys.executable, "-m", "llama_jax.evaluate", f"--workdir={ref}",
                        "--max_batches=2"], cwd=ROOT, env=_env(8, tmp_path / "cache"),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  names = sorted(result["sources"])
  assert len(names) == 2 and all(n.startswith("files:") for n in names)
  for n in names:
    assert result[f"loss/{n}"] == result["sources"][n]["loss"] > 0
    assert 0 < result[f"bits_per_byte/{n}"] < 8
  assert result["loss"] == pytest.approx(np.mean([result[f"loss/{n}"] for n in names]))
  assert result["step"] == 8
