"""Processes that start, stop and resume together: 2 processes x 4 CPU devices (gloo
collectives) with the workdir in the GCS emulator's bucket (tests/object_store.py) and, for
each process, its own working directory, token cache, tfds dir and compilation cache, as on
hosts that share no local disk.

SIGTERM to process 1 alone makes both processes save the same step and exit 0. The resumed run
meets a newest checkpoint that its processes cannot all read, agrees on the step to restore,
moves the bad one aside once, and then trains bitwise the losses of a run never interrupted.
Start-up is checked too: what jax's own cluster detection finds decides whether
jax.distributed starts, and the first line says how the processes were found.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from llama_jax import sharding, storage
from tests import metrics_lines, object_store
from tests.object_store import gcs  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16
# A tiny model on a (1, 8, 1) mesh: the params are split over the devices of both processes,
# so each process reads only its own shards of a checkpoint, and batch rows 0-3 / 4-7 are
# contiguous per process (what the loader of this time needs).
ARGS = [
    f"--config={ROOT}/configs/base.py:tiny",
    "--config.data.name=synthetic", "--config.data.seq_len=16", "--config.data.batch_size=8",
    "--config.model.dim=48", "--config.model.ffn_dim=88", "--config.model.vocab_size=104",
    f"--config.train.steps={STEPS}", "--config.train.log_every=1",
    f"--config.train.eval_every={STEPS}", "--config.train.eval_steps=1",
    "--config.train.checkpoint_every=4", "--config.train.keep_checkpoints=10",
    "--config.train.sample_tokens=0", "--config.optim.warmup_steps=2",
    "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Job:
  """Two processes of one run, each in its own local folder (`hosts/p<i>`)."""

  def __init__(self, hosts, workdir, name, args=ARGS):
    port = _free_port()
    self.logs = [os.path.join(hosts, f"p{i}", f"{name}.log") for i in range(2)]
    self.procs = []
    for i in range(2):
      local = os.path.join(hosts, f"p{i}")
      os.makedirs(local, exist_ok=True)
      env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                 XLA_FLAGS="--xla_force_host_platform_device_count=4",
                 LLAMA_JAX_CACHE=os.path.join(local, "cache"),
                 TFDS_DATA_DIR=os.path.join(local, "tfds"),
                 # The three runs compile the same programs: the second and third read them
                 # from this host's cache (about 15 s less per process on 2 cores).
                 JAX_COMPILATION_CACHE_DIR=os.path.join(local, "jax_cache"),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
      with open(self.logs[i], "w") as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "run_train.py"), f"--workdir={workdir}", *args,
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}"], cwd=local, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL))

  def wait(self, timeout=600):
    for p in self.procs:
      try:
        p.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        for q in self.procs:
          q.kill()
        raise AssertionError("the run did not finish:\n" + self.tail()) from None
    return [p.returncode for p in self.procs]

  def output(self, i) -> str:
    with open(self.logs[i], errors="replace") as f:
      return f.read()

  def tail(self) -> str:
    return "\n".join(f"--- process {i}\n" + "\n".join(
        line for line in self.output(i).splitlines() if "%|" not in line)[-2000:]
        for i in range(2))


def _lines(workdir):
  """metrics.jsonl less its timings; a step logged again (after a resume) keeps its last line."""
  text = storage.read_text(f"{workdir}/metrics.jsonl") if storage.exists(
      f"{workdir}/metrics.jsonl") else ""
  return metrics_lines.last_per_step([json.loads(x) for x in text.splitlines() if x.strip()])


@pytest.mark.slow
def test_sigterm_to_one_process_then_a_coordinated_resume(gcs, tmp_path):
  """One test function, so that pytest-xdist cannot split the three runs over two workers
  (a module fixture would then run in each)."""
  hosts = str(tmp_path / "hosts")
  bucket = f"gs://{object_store.new_bucket('multihost')}"
  reference = Job(hosts, f"{bucket}/reference", "reference")
  assert reference.wait() == [0, 0], reference.tail()

  # ---- SIGTERM to process 1 alone, once a checkpoint is in the bucket.
  run = f"{bucket}/run"
  job = Job(hosts, run, "preempted")
  t0 = time.time()
  # metrics.jsonl reaches the bucket after each checkpoint: the loop runs once it is there.
  while not _lines(run):
    assert all(p.poll() is None for p in job.procs), job.tail()
    assert time.time() - t0 < 300, "no checkpoint in the bucket after 300 s:\n" + job.tail()
    time.sleep(0.1)
  job.procs[1].send_signal(signal.SIGTERM)
  assert job.wait() == [0, 0], job.tail()
  # Each process found the other through the flags, and says so first.
  for i in range(2):
    first = job.output(i).splitlines()[0]
    assert first.startswith(f"processes: process {i} of 2, found through the "
                            "--coordinator_address"), first
    assert "4 local device(s) of 8" in first
  stopped = [re.findall(r"process \d: stopped by SIGTERM \(to any of the 2 processes\) at "
                        r"step (\d+)", job.output(i)) for i in range(2)]
  assert len(stopped[0]) == len(stopped[1]) == 1, job.tail()
  step = int(stopped[0][0])
  assert stopped[1] == stopped[0] and 4 <= step < STEPS  # the same step, before the end
  steps = sorted(int(s) for s in storage.listdir(f"{run}/checkpoints") if s.isdigit())
  assert steps[-1] == step and storage.exists(f"{run}/checkpoints/{step}/commit_success.txt")
  assert [d["step"] for d in _lines(run) if "loss" in d] == list(range(1, step + 1))

  # ---- A newest checkpoint (step + 1) whose shards process 1 reads are garbage: a copy of
  # the saved step with the data files process 1 wrote overwritten. Process 0 reads its own
  # shards of it fine, so without one shared decision the two would restore different steps.
  name = storage.bucket(bucket)
  bad = step + 1
  storage.copy_tree(f"{run}/checkpoints/{step}", f"{run}/checkpoints/{bad}")
  corrupted = object_store.list_objects(name, f"run/checkpoints/{bad}/state/ocdbt.process_1/d/")
  assert corrupted
  for o in corrupted:
    storage.write_bytes(f"gs://{name}/{o}", b"garbage")

  resumed = Job(hosts, run, "resumed")
  assert resumed.wait() == [0, 0], resumed.tail()
  out0, out1 = resumed.output(0), resumed.output(1)
  assert f"process 1 cannot read checkpoint {bad}" in out1, resumed.tail()
  assert f"process 0 cannot read checkpoint {bad}" not in out0  # its own shards were fine
  # One decision, one move: process 0 says it once and moved the step aside (not deleted).
  assert out0.count(f"checkpoint {bad} is unreadable by process(es) [1]") == 1, resumed.tail()
  assert out1.count("is unreadable by") == 0
  for o in corrupted:
    aside = o.replace(f"/checkpoints/{bad}/", f"/checkpoints_unreadable/{bad}/")
    assert object_store.read_object(name, aside) == b"garbage"
  assert f"resumed from step {step} in {run}/checkpoints" in out0, resumed.tail()
  # Bitwise the uninterrupted run: every logged loss, grad norm, lr and eval loss.
  lines, expected = _lines(run), _lines(f"{bucket}/reference")
  assert [d["step"] for d in expected if "loss" in d] == list(range(1, STEPS + 1))
  assert lines == expected


# An MoE run whose expert axis spans both processes: 8 experts, one per device, the tokens of
# every device gathered to every other and the outputs reduce-scattered back across them.
MOE_STEPS = 4
MOE_ARGS = [a for a in ARGS if not a.startswith(("--config.train.", "--config.mesh."))] + [
    "--config.model.moe_experts=8", "--config.model.moe_ffn_dim=40",
    "--config.model.moe_shared_experts=1", "--config.model.moe_bias_rate=0.001",
    "--config.model.moe_z_loss=0.001", f"--config.train.steps={MOE_STEPS}",
    "--config.train.log_every=1", f"--config.train.eval_every={MOE_STEPS}",
    "--config.train.eval_steps=1", f"--config.train.checkpoint_every={MOE_STEPS}",
    "--config.train.sample_tokens=0", "--config.optim.warmup_steps=1",
    "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
    "--config.mesh.expert=8"]


def _config_of(args):
  """The ConfigDict that run_train.py builds from `args` (each --config.SECTION.KEY=VALUE
  parsed as the type of the key's default)."""
  from configs import base
  config = base.get_config("tiny")
  for arg in args:
    if arg.startswith("--config."):
      key, value = arg[len("--config."):].split("=", 1)
      section, name = key.split(".")
      default = config[section][name]
      config[section][name] = (value == "true" if isinstance(default, bool)
                               else type(default)(value))
  return config


@pytest.mark.slow
def test_moe_expert_axis_across_two_processes_equals_one_process(tmp_path, monkeypatch):
  """2 processes x 4 devices with the expert axis over all 8 (gloo all-gathers and
  reduce-scatters between the processes) log the losses, balancing losses and eval loss of
  the same run on 1 process x 8 devices (in this process), within 1e-5."""
  from llama_jax import config as config_lib
  from llama_jax import train
  # The processes draw and multiply as this one does (tests/conftest.py's jax settings).
  monkeypatch.setenv("JAX_DEFAULT_PRNG_IMPL", "unsafe_rbg")
  monkeypatch.setenv("JAX_DEFAULT_MATMUL_PRECISION", "highest")
  job = Job(str(tmp_path / "hosts"), str(tmp_path / "two"), "moe", args=MOE_ARGS)
  config = _config_of(MOE_ARGS)  # the reference trains while the job starts
  config_lib.validate(config)
  train.train(config, str(tmp_path / "one"), log=lambda *a: None)
  assert job.wait(timeout=420) == [0, 0], job.tail()
  two, one = _lines(str(tmp_path / "two")), _lines(str(tmp_path / "one"))
  assert [d["step"] for d in one if "loss" in d] == list(range(1, MOE_STEPS + 1))
  assert [d["step"] for d in two] == [d["step"] for d in one]
  keys = ("loss", "grad_norm", "moe_aux_loss", "moe_z_loss", "moe_load_imbalance", "eval_loss")
  for a, b in zip(two, one):
    for k in keys:
      if k in b:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)


# ---------------------------------------------------------------------------- start-up


def test_start_up_follows_jax_cluster_detection(monkeypatch):
  """No cluster, no flags: nothing starts (no coordinator to wait for). SLURM with one task:
  nothing either (jax would pin that task to one GPU). SLURM with two tasks is detected by
  jax's own SLURM detector; the flags without a coordinator are refused in one line."""
  for var in list(os.environ):
    if var.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "KUBERNETES_")):
      monkeypatch.delenv(var)
  assert sharding.detect_cluster() is None
  line = sharding.initialize_distributed()
  assert line.startswith("1 process: no cluster detected")
  slurm = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="node[003-004]", SLURM_NTASKS="1",
               SLURM_PROCID="0", SLURM_LOCALID="0")
  for k, v in slurm.items():
    monkeypatch.setenv(k, v)
  assert sharding.detect_cluster().name == "slurm"
  assert sharding.initialize_distributed() == (
      "1 process: SLURM (SLURM_NTASKS, SLURM_PROCID, the first host of SLURM_STEP_NODELIST) "
      "counts one")
  monkeypatch.setenv("SLURM_NTASKS", "2")
  env = sharding.detect_cluster()  # what initialize_distributed would start with
  assert (env.get_process_count(), env.get_process_id()) == (2, 0)
  assert env.get_coordinator_address(timeout_secs=1, override_coordinator_port=None) == (
      f"node003:{4242 % 4096 + 61440}")
  with pytest.raises(sharding.ShardingError, match="need --coordinator_address"):
    sharding.initialize_distributed(num_processes=2)


def test_slurm_task_alone_on_a_gpu_node_gets_every_gpu():
  per_gpu = dict(SLURM_GPUS_ON_NODE="8", SLURM_STEP_TASKS_PER_NODE="8(x4)")
  assert sharding.slurm_local_device_ids(per_gpu) is None  # jax's SLURM_LOCALID choice
  per_node = dict(SLURM_GPUS_ON_NODE="8", SLURM_STEP_TASKS_PER_NODE="1(x4)")
  assert sharding.slurm_local_device_ids(per_node) == list(range(8))
  assert sharding.slurm_local_device_ids(dict(SLURM_STEP_TASKS_PER_NODE="1")) is None  # no GPU
