"""A real one-node SLURM cluster for tests: Debian's munged, slurmctld and slurmd, started as
../shared/notes/slurm.md describes (about a second), stopped by the PIDs in their pid files.

Ports 6817/6818 and /run/munge are machine-wide, so there is one cluster per machine: `cluster()`
holds an exclusive lock on a file in /tmp while it runs, and a second caller (another xdist
worker, another checkout's suite) waits for it. Where the daemons are not installed, or the
tests do not run as root (slurmd must), `missing_reason()` says why, for a skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo")
LOCK = os.path.join(tempfile.gettempdir(), "llama_jax_slurm_cluster.lock")


def _which(name: str) -> str | None:
  return shutil.which(name) or next(
      (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def missing_reason() -> str | None:
  missing = [d for d in DAEMONS if _which(d) is None]
  if missing:
    return (f"SLURM is not installed ({', '.join(missing)} missing): apt-get install -y "
            "--no-install-recommends slurmctld slurmd slurm-client munge (CI does)")
  if os.geteuid() != 0:
    return "the one-node SLURM cluster needs root (slurmd runs jobs as their user)"
  return None


def _conf(root: str) -> str:
  host = socket.gethostname()
  # 4 CPUs declared on 2 cores (config_overrides) so that two array tasks of 2 tasks each run
  # at once; cred_expire=10 lets a requeued job start again within seconds, not ~2 minutes.
  return "\n".join([
      "ClusterName=llama_jax_test", "SlurmctldHost=localhost", "SlurmUser=root",
      "SlurmdUser=root", "AuthType=auth/munge", "AuthInfo=cred_expire=10",
      f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
      f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
      f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
      "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
      "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
      "SchedulerType=sched/backfill", "AccountingStorageType=accounting_storage/none",
      "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none",
      "ReturnToService=2", "MailProg=/bin/true", "KillWait=5", "MinJobAge=300",
      "SlurmdParameters=config_overrides",
      f"NodeName={host} NodeAddr=127.0.0.1 CPUs=4 CoresPerSocket=4 ThreadsPerCore=1 "
      "RealMemory=2000",
      "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


def _pid(path: str) -> int | None:
  try:
    with open(path) as f:
      return int(f.read().strip())
  except (OSError, ValueError):
    return None


def _stop(pid: int | None) -> None:
  if pid is None:
    return
  with contextlib.suppress(ProcessLookupError):
    os.kill(pid, signal.SIGTERM)
  for _ in range(100):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return
    time.sleep(0.05)
  with contextlib.suppress(ProcessLookupError):
    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def cluster():
  """Starts the cluster (waiting for any other on this machine to stop first); yields the
  environment for its clients (SLURM_CONF, which sbatch also passes on to the jobs)."""
  with open(LOCK, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    root = tempfile.mkdtemp(prefix="slurm-")
    started = []
    try:
      for d in ("state", "spool"):
        os.makedirs(os.path.join(root, d))
      conf = os.path.join(root, "slurm.conf")
      with open(conf, "w") as f:
        f.write(_conf(root))
      munge_pid = "/run/munge/munged.pid"
      if _pid(munge_pid) is None or not os.path.exists(f"/proc/{_pid(munge_pid)}"):
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], check=True)
        started.append(munge_pid)
      for daemon, pid_file in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
        subprocess.run([_which(daemon), "-f", conf], check=True)
        started.append(os.path.join(root, pid_file))
      env = dict(os.environ, SLURM_CONF=conf)
      deadline = time.monotonic() + 30
      while True:
        r = subprocess.run([_which("sinfo"), "-h", "-o", "%T"], env=env, capture_output=True,
                           text=True)
        if r.stdout.strip() == "idle":
          break
        if time.monotonic() > deadline:
          raise RuntimeError(f"the SLURM node is not idle after 30 s: {r.stdout}{r.stderr}; "
                             f"logs in {root}")
        time.sleep(0.2)
      yield env
    finally:
      for pid_file in reversed(started):  # slurmd, slurmctld, then munged
        for _ in range(50):  # a daemon writes its pid file just after it forks
          if _pid(pid_file) is not None:
            break
          time.sleep(0.05)
        _stop(_pid(pid_file))
      shutil.rmtree(root, ignore_errors=True)


def job_state(env, job: str) -> str:
  """JobState of one job (or array task, 'ID_I'), '' once SLURM has forgotten it."""
  r = subprocess.run([_which("scontrol"), "show", "job", "-o", job], env=env,
                     capture_output=True, text=True)
  for word in r.stdout.split():
    if word.startswith("JobState="):
      return word.split("=", 1)[1]
  return ""
