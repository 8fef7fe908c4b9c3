"""The SLURM launcher on a real one-node SLURM cluster (tests/slurm_cluster.py): a two-run
sweep with two tasks per run, submitted through `python -m llama_jax.sweep --launcher slurm
--submit`. Every task finds its peer from the SLURM environment alone; one run is requeued
mid-way (`scontrol requeue`), starts again and resumes, then gets SIGTERM in its batch script
(what `--signal=B:TERM@N` sends before the time limit), saves and requeues itself; started
again, it gets SIGTERM once more during its start-up, before any step, and requeues itself
without losing anything; both finish, the collect job writes results.csv with both, and the
requeued run's losses are bitwise those of the other, never interrupted (the two differ only
in how often they save, which does not touch the training).

One test function: the cluster is machine-wide, so nothing here may run beside itself (the
cluster's file lock also keeps another xdist worker's from starting).
"""

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from tests import metrics_lines, slurm_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
EXPERIMENT = textwrap.dedent(f'''
    """Two runs for the SLURM test: the same training, saved every 2 or every 4 steps."""
    CONFIG = "configs/base.py:tiny"
    BASE = {{"data.name": "synthetic", "data.seq_len": 16, "data.batch_size": 8,
            "model.dim": 48, "model.ffn_dim": 88, "model.vocab_size": 104,
            "train.steps": {STEPS}, "train.log_every": 1, "train.eval_every": {STEPS},
            "train.eval_steps": 1, "train.sample_tokens": 0, "train.keep_checkpoints": 10,
            "mesh.data": -1}}

    def sweep(add):
      add(name="requeued", **{{"train.checkpoint_every": 2}})
      add(name="reference", **{{"train.checkpoint_every": 4}})
''')


def _lines(run_dir):
  """metrics.jsonl less timings; a step logged again after the restart keeps its last line."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return metrics_lines.last_per_step([json.loads(x) for x in f if x.strip()])


def _wait(what, predicate, timeout, log=lambda: ""):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, f"{what} after {timeout} s\n{log()}"
    time.sleep(0.2)


@pytest.mark.slow
def test_sweep_submitted_to_slurm_finds_peers_requeues_and_collects(tmp_path):
  reason = slurm_cluster.missing_reason()
  if reason:
    pytest.skip(reason)
  exp = tmp_path / "slurm_sweep.py"
  exp.write_text(EXPERIMENT)
  out = tmp_path / "sweep"
  with slurm_cluster.cluster() as env:
    # sbatch hands this environment on to the jobs: one CPU device per process (the mesh is
    # test_multihost's business), a shared compilation cache, no cluster flags of any kind.
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    r = subprocess.run([sys.executable, "-m", "llama_jax.sweep", str(exp), "--workdir", str(out),
                        "--launcher", "slurm", "--ntasks_per_node", "2", "--submit",
                        "--python", sys.executable], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    array, collect = re.search(r"submitted job array (\d+); job (\d+) writes", r.stderr).groups()
    logs = {i: out / f"slurm_sweep-{array}_{i}.out" for i in (0, 1)}

    def show():
      return "\n".join(f"--- {p}\n" + "\n".join(
          line for line in p.read_text(errors="replace").splitlines()[-40:] if "%|" not in line)
          for p in logs.values() if p.exists())

    def restart(why):
      """A requeued task waits for its old credential to expire (AuthInfo=cred_expire): start
      it sooner, but not in the second its old instance ended. slurmd refuses a credential
      made in the second it revoked the job's last one (`ctime <= revoked`, whole seconds:
      "already killed, do not launch batch job"), and the task then ends FAILED; starting it
      at once after it went PENDING did that now and then."""
      _wait(f"the task did not go back to PENDING after {why}",
            lambda: slurm_cluster.job_state(env, f"{array}_0") == "PENDING", 240, show)
      after = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(int(time.time()) + 1))
      subprocess.run(["scontrol", "update", f"JobId={array}_0", f"StartTime={after}"],
                     env=env, check=True)

    # Requeued from outside once its first checkpoint is on disk, mid-way through its steps.
    _wait("no checkpoint 2 of the first run", (out / "requeued" / "checkpoints" / "2").exists,
          400, show)
    subprocess.run(["scontrol", "requeue", f"{array}_0"], env=env, check=True)
    restart("scontrol requeue")
    # Started again, it gets what --signal=B:TERM@N sends near the time limit: SIGTERM to the
    # batch script alone, whose trap hands it to srun and then requeues the job itself.
    _wait("the requeued run did not resume",
          lambda: "resumed from step" in logs[0].read_text(errors="replace"), 300, show)
    subprocess.run(["scancel", "--batch", "--signal=TERM", f"{array}_0"], env=env, check=True)
    restart("SIGTERM to the batch script")
    # The third start gets the notice during its start-up, as soon as its script has begun:
    # before srun's tasks are up or in their start (no step yet, nothing to save). It
    # requeues itself all the same and the fourth start finishes the run.
    _wait("the third start did not begin",
          lambda: re.search(r"^=== \S+ job \d+ start 3$", logs[0].read_text(errors="replace"),
                            re.M), 240, show)
    subprocess.run(["scancel", "--batch", "--signal=TERM", f"{array}_0"], env=env, check=True)
    restart("SIGTERM during the start-up")
    _wait("the collect job did not complete",
          lambda: slurm_cluster.job_state(env, collect) == "COMPLETED", 600, show)
    states = [slurm_cluster.job_state(env, f"{array}_{i}") for i in (0, 1)]
    assert states == ["COMPLETED", "COMPLETED"], show()

  requeued, reference = (logs[i].read_text(errors="replace") for i in (0, 1))
  starts = re.split(r"^=== \S+ job \d+ start (\d+)$", requeued, flags=re.M)
  assert starts[1::2] == ["1", "2", "3", "4"], show()
  first, second, third, fourth = starts[2::2]
  found = (r": processes: process \d of 2, found through SLURM \(SLURM_NTASKS, SLURM_PROCID, the "
           r"first host of SLURM_STEP_NODELIST\); coordinator \S+:\d+; 1 local device\(s\) of 2$")

  # Every start that trained found its peer through SLURM's variables alone.
  for text in (first, second, fourth, reference):
    assert sorted(re.findall(rf"^(\d){found}", text, re.M)) == ["0", "1"], show()
  # The batch script's SIGTERM reached both tasks of the second start, which saved the same
  # step before the script requeued the job (the first start's requeue from outside kills
  # the tasks after KillWait, saved or not).
  stopped = re.findall(r"^\d: process \d: stopped by SIGTERM .* at step (\d+);", second, re.M)
  assert len(stopped) == 2 and stopped[0] == stopped[1], show()
  # The third start was stopped before any step: it trained and saved nothing, and the
  # fourth resumed where the second had stopped.
  assert "stopped by SIGTERM" not in third and "loss" not in third, show()
  second_from = re.findall(r"^0: resumed from step (\d+) in ", second, re.M)
  assert len(second_from) == 1 and 2 <= int(second_from[0]) < int(stopped[0]), show()
  assert re.findall(r"^0: resumed from step (\d+) in ", fourth, re.M) == stopped[:1], show()

  rows = {row["name"]: row for row in csv.DictReader(open(out / "results.csv"))}
  assert sorted(rows) == ["reference", "requeued"]
  assert all(row["status"] == "done" and row["final_step"] == str(STEPS) for row in rows.values())
  # The requeued run, resumed, is bitwise the one never interrupted.
  a, b = _lines(out / "requeued"), _lines(out / "reference")
  assert [d["step"] for d in b if "loss" in d] == list(range(1, STEPS + 1))
  assert a == b


def test_submit_mistakes_are_one_line_errors(tmp_path, monkeypatch, capsys):
  from llama_jax.sweep import __main__ as sweep_cli
  exp = tmp_path / "slurm_sweep.py"
  exp.write_text(EXPERIMENT)
  monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
  for extra, message in ((["--launcher", "tpu", "--script", str(tmp_path / "t.sh")],
                          "--submit goes with --launcher slurm"),
                         (["--launcher", "slurm"], "sbatch is not on PATH")):
    with pytest.raises(SystemExit) as exit_:
      sweep_cli.main([str(exp), "--workdir", str(tmp_path / "w"), "--submit", *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
