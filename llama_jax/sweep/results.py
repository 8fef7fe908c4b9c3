"""A sweep's results.csv: one row per run (overrides, tags, sizes, final losses, wall time,
status), written by collect_results and read back, numbers typed, by read_results.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Sequence

from llama_jax import storage
from llama_jax.sweep.overrides import get_value
from llama_jax.sweep.run import Run, final_value, last_step


def result_row(run: Run) -> dict[str, Any]:
  metrics = run.metrics()
  sizes = run.sizes()
  attempts = run.record().get("attempts", [])
  status = run.status()
  row: dict[str, Any] = {"name": run.name}
  row.update(run.overrides)
  row.update(run.tags)
  row.update(sizes)
  row.update(
      steps=run.steps,
      final_step=last_step(metrics) if metrics else "",
      final_loss=final_value(metrics, "loss"),
      final_eval_loss=final_value(metrics, "eval_loss"),
      wall_s=run.record().get("wall_s", ""),
      status=status,
      attempts=len(attempts),
      rollbacks=sum("rollback_to" in m for m in metrics),
      error=(attempts[-1].get("error") or "") if attempts and status != "done" else "",
  )
  return row


_SIZE_COLUMNS = ["params", "active_params", "nonembedding_params", "tokens", "flops",
                 "kaplan_flops", "steps", "final_step", "final_loss", "final_eval_loss", "wall_s",
                 "status", "attempts", "rollbacks", "error"]


def collect_results(runs: Sequence[Run], path: str) -> list[dict[str, Any]]:
  """Writes results.csv (one row per run) and returns the rows. Columns: name, every config key
  some run overrides (each run's resolved value), tags, sizes, final losses, wall_s, status,
  attempts (trainer launches), rollbacks (llama_jax/rollback.py) and, for a run not done, the
  last error line of its last attempt."""
  rows = [result_row(r) for r in runs]
  override_keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
  tag_keys = [k for k in dict.fromkeys(k for r in runs for k in r.tags) if k not in override_keys]
  columns = ["name"] + override_keys + tag_keys
  for run, row in zip(runs, rows):  # a key another run overrides: this run's resolved value
    for k in override_keys:
      row.setdefault(k, get_value(run.config, k))
  columns += [c for c in _SIZE_COLUMNS if c not in columns]
  f = io.StringIO(newline="")
  w = csv.DictWriter(f, fieldnames=columns, restval="")
  w.writeheader()
  for row in rows:
    w.writerow({k: _csv_value(v) for k, v in row.items()})
  storage.write_text(path, f.getvalue())  # local or in a bucket, whole
  return rows


def missing(rows: Sequence[dict[str, Any]]) -> list[str]:
  """One line per cell of the grid without a result (status not done), saying why."""
  out = []
  for r in rows:
    status = r["status"]
    if status == "done":
      continue
    if status == "pending":
      why = "never started"
    elif status == "incomplete":
      why = (f"stopped at step {r['final_step'] if r['final_step'] != '' else 0} of "
             f"{r['steps']}; rerun the sweep to resume it")
    else:
      tries = f"{r['attempts']} attempt(s)" + (f", {r['rollbacks']} rollback(s)"
                                               if r["rollbacks"] else "")
      why = f"{tries}: {r['error'] or 'no error line in its log.txt'}"
    out.append(f"{r['name']}: {status}: {why}")
  return out


def _csv_value(v: Any) -> Any:
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, float):
    return "" if math.isnan(v) else repr(v)
  if isinstance(v, (tuple, list, dict)):
    return json.dumps(v)
  return v


def read_results(path: str) -> list[dict[str, Any]]:
  """results.csv back as dicts, numbers as int / float (empty cells as nan)."""
  text = storage.read_bytes(path).decode("utf-8")  # bytes: csv's own \r\n line ends
  rows = list(csv.DictReader(io.StringIO(text, newline="")))
  return [{k: _parse_cell(v) for k, v in row.items()} for row in rows]


def _parse_cell(v: str) -> Any:
  if v is None:
    return None
  if v == "":
    return math.nan
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return v

