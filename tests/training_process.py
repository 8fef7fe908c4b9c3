"""run_train.py in a subprocess, as a user runs it: for the tests that stop, kill and resume
runs (test_resume, test_object_store, test_data_resume)."""

import os
import subprocess
import sys

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


def finish(*procs: subprocess.Popen, check: bool = True) -> list[tuple[int, str, str]]:
  """(returncode, stdout, stderr) of each process once it ends; with `check`, each must have
  exited 0."""
  outs = [(p, *p.communicate(timeout=600)) for p in procs]
  if check:
    for p, _, err in outs:
      assert p.returncode == 0, err[-3000:]
  return [(p.returncode, out, err) for p, out, err in outs]
