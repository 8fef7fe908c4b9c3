"""run_train.py in a subprocess, as a user runs it: for the tests that stop, kill and resume
runs (test_resume, test_object_store, test_data_resume)."""

import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny synthetic run of 10 steps: every step logged, an eval every 5, a checkpoint every 2
# (all kept); the mesh is each test's own.
TINY_RUN = [
    "--config=configs/base.py:tiny",
    "--config.data.name=synthetic", "--config.data.seq_len=24", "--config.data.batch_size=8",
    "--config.model.dim=48", "--config.model.ffn_dim=88", "--config.model.vocab_size=104",
    "--config.train.steps=10", "--config.train.log_every=1", "--config.train.eval_every=5",
    "--config.train.eval_steps=1", "--config.train.checkpoint_every=2",
    "--config.train.sample_tokens=0", "--config.optim.warmup_steps=2",
    "--config.train.keep_checkpoints=10",
]


def env(devices: int = 8, **extra) -> dict:
  """This environment (the emulator's variables, set by tests/conftest.py) with `devices`
  forced CPU devices, the repository importable, and `extra`."""
  out = dict(os.environ)
  out.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + out.get("PYTHONPATH", ""), **extra)
  return out


def start(workdir, args, *extra, devices: int = 8, **env_extra) -> subprocess.Popen:
  """`python run_train.py --workdir=WORKDIR ARGS EXTRA`, its output piped."""
  return subprocess.Popen([sys.executable, "run_train.py", f"--workdir={workdir}", *args, *extra],
                          cwd=ROOT, env=env(devices, **env_extra), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(*procs: subprocess.Popen, check: bool = True,
           timeout: float = 600) -> list[tuple[int, str, str]]:
  """(returncode, stdout, stderr) of each process once it ends; with `check`, each must have
  exited 0. Every process's pipes are read at once (one thread each): read one after another,
  a process that fills its stderr pipe while a peer waits on it never ends (the preparation
  test's hang). A process still running after `timeout` s fails the test with the last output
  of every process, after killing them all."""
  outs: list = [None] * len(procs)

  def read(i):
    outs[i] = procs[i].communicate()

  threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(procs))]
  for t in threads:
    t.start()
  deadline = time.monotonic() + timeout
  for t in threads:
    t.join(max(0.0, deadline - time.monotonic()))
  if any(t.is_alive() for t in threads):
    for p in procs:
      p.kill()
    for t in threads:
      t.join()
    raise AssertionError(f"still running after {timeout:.0f} s:\n" + tails(procs, outs))
  if check:
    for p, (_, err) in zip(procs, outs):
      assert p.returncode == 0, tails(procs, outs)
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def tails(procs, outs, chars: int = 3000) -> str:
  """The end of each process's output, progress bars left out."""
  return "\n".join(
      f"--- {' '.join(p.args[1:4])}... (exit {p.returncode})\n" + "\n".join(
          line for line in (out + err).splitlines() if "%|" not in line)[-chars:]
      for p, (out, err) in zip(procs, outs))
