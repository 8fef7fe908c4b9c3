"""llama_jax/waiting.py: a process waiting on others says what for and since when at a steady
interval, and gives up with one line naming it; a barrier with a deadline across two real
processes (jax.distributed's coordination service) fails in seconds when a peer never comes."""

import subprocess
import sys
import textwrap
import time

import pytest

from llama_jax import waiting
from tests import training_process


def test_poll_says_what_it_waits_for_and_gives_up_in_one_line(monkeypatch):
  monkeypatch.setenv(waiting.LOG_ENV, "0.2")
  lines, calls = [], []

  def ready():
    calls.append(time.monotonic())
    return "manifest" if len(calls) == 8 else None

  assert waiting.poll("the manifest", ready, timeout=30, interval=0.1, who="process 1",
                      log=lines.append) == "manifest"
  assert lines and all(line.startswith("process 1: waiting ") and line.endswith(
      " for the manifest") and "(since " in line for line in lines), lines

  t0 = time.monotonic()
  with pytest.raises(waiting.WaitTimeout) as e:
    waiting.poll("process 0's shards", lambda: None, timeout=0.5, interval=0.1,
                 fix="check process 0", who="process 1", log=lines.append)
  assert time.monotonic() - t0 < 5
  assert str(e.value) == "process 1: waited 0 s for process 0's shards; check process 0" or (
      str(e.value) == "process 1: waited 1 s for process 0's shards; check process 0")


def test_announced_is_silent_for_a_short_wait_and_the_settings_are_checked(monkeypatch):
  lines = []
  monkeypatch.setenv(waiting.LOG_ENV, "5")
  with waiting.announced("nothing long", log=lines.append):
    pass
  assert lines == []
  monkeypatch.setenv(waiting.TIMEOUT_ENV, "soon")
  with pytest.raises(waiting.UserError, match="LLAMA_JAX_WAIT_S='soon' is not a number"):
    waiting.timeout_s()
  monkeypatch.setenv(waiting.TIMEOUT_ENV, "-3")
  with pytest.raises(waiting.UserError, match="must be positive"):
    waiting.timeout_s()


# Process 0 reaches the barrier; process 1 has "crashed" (it only sleeps) and never does.
_PEER = textwrap.dedent("""
    import sys, time
    import jax
    from llama_jax import sharding, waiting
    pid = int(sys.argv[2])
    print(sharding.initialize_distributed(sys.argv[1], 2, pid), flush=True)
    if pid == 1:
      time.sleep(60)  # the test kills it once process 0 has given up
    t0 = time.monotonic()
    try:
      waiting.barrier("the test's barrier", timeout=3)
    except waiting.WaitTimeout as e:
      print(f"timed out after {time.monotonic() - t0:.1f} s: {e}", flush=True)
      sys.exit(3)
""")


@pytest.mark.slow
def test_a_barrier_whose_peer_never_comes_fails_in_seconds(tmp_path):
  from tests.test_multihost import _free_port
  script = tmp_path / "peer.py"
  script.write_text(_PEER)
  address = f"127.0.0.1:{_free_port()}"
  # 5 s: also how long process 0 waits for process 1 at jax's shutdown barrier as it exits.
  env = training_process.env(devices=1, LLAMA_JAX_WAIT_LOG_S="1", LLAMA_JAX_WAIT_S="5")
  procs = [subprocess.Popen([sys.executable, str(script), address, str(i)], env=env,
                            cwd=training_process.ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    out0, err0 = procs[0].communicate(timeout=90)
  finally:
    procs[1].kill()
    procs[1].communicate()
  # Exit 3, or an abort: jax's shutdown barrier, which process 1 never reaches either, gives
  # up after LLAMA_JAX_WAIT_S and ends the process (-6) once the line below is out.
  assert procs[0].returncode in (3, -6), out0 + err0
  took = float(out0.split("timed out after ")[1].split(" s")[0])
  assert 3 <= took < 15, out0
  assert ("process 0: waited 3 s at the test's barrier for the other processes; one of them "
          "stopped or is stuck (its log says where)") in out0
  # While it waited, it said so every second.
  assert "process 0: waiting 1 s (since " in err0 and (
      "for the other 1 process(es) at the test's barrier") in err0, err0
