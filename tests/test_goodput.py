"""Goodput accounting (llama_jax.goodput): the ledger's sections, the report's split of the steps'
time into productive and lost work on a hand-made history, and the CLI over a run and a sweep."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from llama_jax.goodput import __main__ as goodput_cli
from llama_jax.goodput import ledger, report


def _line(step, attempt, wall, steps_s, **extra):
  return {"step": step, "goodput/attempt": attempt, "goodput/wall_s": wall,
          "goodput/steps_s": steps_s, "goodput/compile_s": 2.0, "goodput/restore_s": 1.0,
          "goodput/checkpoint_s": 0.5, "goodput/data_s": 0.25, "goodput/eval_s": 0.25,
          **extra}


# Attempt 1 trains steps 0-20 (20 s of steps), rolls back to step 10, trains to 15 (5 s) and
# is killed; attempt 2 resumes from checkpoint 10 and finishes at 30 (20 s). Kept in the final
# model: steps 1-10 of attempt 1's first segment and all of attempt 2's.
HISTORY = [
    {"step": 0, "eval_loss": 5.0},
    _line(0, 1, 4.0, 0.0, **{"goodput/start_step": 0}),
    _line(10, 1, 14.0, 10.0, loss=3.0),
    _line(20, 1, 24.0, 20.0, loss=2.0),
    _line(20, 1, 25.0, 20.0, rollback_to=10, rollback_reason="3 of the last 8 steps ..."),
    _line(15, 1, 40.0, 25.0, loss=2.5),
    _line(10, 2, 5.0, 0.0, **{"goodput/start_step": 10}),
    _line(30, 2, 29.0, 20.0, loss=1.5),
    _line(30, 2, 30.0, 20.0, **{"goodput/end": "finished"}),
]


def test_report_splits_productive_and_lost_work():
  s = report.summarize(HISTORY)
  a1, a2 = s["attempts"]
  assert (a1["productive_s"], a1["lost_s"]) == (10.0, 15.0)  # 10 of 20 s kept, then 5 s lost
  assert (a2["productive_s"], a2["lost_s"]) == (20.0, 0.0)
  assert (a1["end"], a2["end"], a1["rollbacks"]) == ("killed/running", "finished", 1)
  assert a1["other_s"] == pytest.approx(40.0 - 25.0 - 4.0)
  for a in (a1, a2):  # the parts add up to the wall time
    assert sum(a[f"{p}_s"] for p in report.PARTS) == pytest.approx(a["wall_s"])
  assert s["total"]["goodput"] == pytest.approx(30.0 / 70.0)
  # The control: without the rollback line attempt 1 is one segment, steps 0-15 in 25 s, of
  # which attempt 2's resume from step 10 loses 5 steps.
  plain = report.summarize([m for m in HISTORY if "rollback_to" not in m])
  assert plain["attempts"][0]["lost_s"] == pytest.approx(25.0 * 5 / 15)


def test_ledger_sections_leave_compilation_out():
  book = ledger.Ledger(attempt=3)
  with book.section("eval"):
    jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.arange(7.0)).block_until_ready()  # compiles
  book.start_loop()
  book.add("data", 0.0)
  book.end_loop()
  f = book.fields(end="finished")
  assert f["goodput/attempt"] == 3 and f["goodput/end"] == "finished"
  assert f["goodput/compile_s"] > 0
  parts = sum(f[f"goodput/{p}_s"] for p in ("steps", "compile", "restore", "checkpoint", "data",
                                              "eval"))
  assert parts <= f["goodput/wall_s"] + 1e-3
  assert ledger.next_attempt(HISTORY) == 3 and ledger.next_attempt([]) == 1


def test_cli_over_a_run_and_a_sweep(tmp_path, capsys):
  for name, lines in (("a", HISTORY), ("b", HISTORY[:4])):
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / "metrics.jsonl", "w") as f:
      f.writelines(json.dumps(m) + "\n" for m in lines)
  assert goodput_cli.main([str(tmp_path / "a")]) == 0
  out = capsys.readouterr().out
  assert "attempt 1" in out and "attempt 2" in out and "42.9%" in out  # 30 / 70
  assert os.path.getsize(tmp_path / "a" / "goodput.png") > 1000
  assert goodput_cli.main([str(tmp_path), "--json", "--png", str(tmp_path / "g.png")]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["label"] for r in rows] == ["a", "b", "all runs"]
  assert rows[2]["wall_s"] == pytest.approx(70.0 + 24.0)
  assert os.path.exists(tmp_path / "g.png")
  with pytest.raises(SystemExit):  # one line, exit 2
    goodput_cli.main([str(tmp_path / "nothing")])
