"""A run's goodput from its metrics.jsonl: each attempt's wall time split into productive steps,
lost work, compilation, restore, checkpoint waits, data waits, evaluation and the rest; the
run's total; a table; a stacked-bar PNG.

Lost work is the steps' time spent on steps that did not make it into the final model: a
segment of steps (an attempt's, from where it resumed or rolled back to where it stopped or
rolled back) loses the steps above any later segment's start (a rollback's `rollback_to`, or a
later attempt resuming from an older checkpoint after a preemption); its steps' time is split
in proportion. An attempt killed outright (SIGKILL) is counted up to its last metrics line:
what it did after that left no record.
"""

from __future__ import annotations

import math
import os
from typing import Any

from llama_jax.goodput.ledger import PREFIX

# The parts of an attempt's wall time, in the order of the table and the bars.
PARTS = ("productive", "lost", "compile", "restore", "checkpoint", "data", "eval", "other")
COLORS = ("#2ca02c", "#d62728", "#9467bd", "#8c564b", "#1f77b4", "#ff7f0e", "#17becf",
          "#7f7f7f")


def _segments(lines: list[dict]) -> list[dict]:
  """Every attempt's segments in order: {attempt, start, end, steps_s} (steps_s: the steps'
  time within the segment)."""
  out, current = [], None
  for m in lines:
    a = m.get(PREFIX + "attempt")
    if a is None:
      continue
    if current is None or current["attempt"] != a:
      if current is not None:
        out.append(current)
      start = int(m.get(PREFIX + "start_step", m["step"]))
      current = {"attempt": a, "start": start, "end": start, "t0": 0.0, "t": 0.0}
    if "rollback_to" in m:  # ends this segment; the next starts where it restored
      current.update(end=int(m["step"]), t=m[PREFIX + "steps_s"])
      out.append(current)
      current = {"attempt": a, "start": int(m["rollback_to"]), "end": int(m["rollback_to"]),
                 "t0": m[PREFIX + "steps_s"], "t": m[PREFIX + "steps_s"]}
    else:
      current.update(end=int(m["step"]), t=m.get(PREFIX + "steps_s", current["t"]))
  if current is not None:
    out.append(current)
  for seg in out:
    seg["steps_s"] = max(0.0, seg.pop("t") - seg.pop("t0"))
  return out


def attempts(lines: list[dict]) -> list[dict[str, Any]]:
  """One dict per attempt: attempt, wall_s, the PARTS in seconds (`<part>_s`), steps (done
  from..to), rollbacks, end ('finished', 'stopped', 'diverged', 'error', or 'killed/running':
  no final line yet)."""
  segments = _segments(lines)
  later_start = math.inf
  for seg in reversed(segments):  # a step survives if no later segment starts below it
    executed = seg["end"] - seg["start"]
    kept = max(0, min(seg["end"], later_start) - seg["start"])
    seg["lost_s"] = seg["steps_s"] * (1 - kept / executed) if executed > 0 else 0.0
    later_start = min(later_start, seg["start"])
  out = []
  for a in dict.fromkeys(seg["attempt"] for seg in segments):
    mine = [m for m in lines if m.get(PREFIX + "attempt") == a]
    last = mine[-1]
    segs = [s for s in segments if s["attempt"] == a]
    steps_s = sum(s["steps_s"] for s in segs)
    lost = sum(s["lost_s"] for s in segs)
    row = {"attempt": a, "wall_s": last[PREFIX + "wall_s"], "productive_s": steps_s - lost,
           "lost_s": lost, "start_step": segs[0]["start"], "end_step": segs[-1]["end"],
           "rollbacks": sum("rollback_to" in m for m in mine),
           "end": last.get(PREFIX + "end", "killed/running")}
    for part in ("compile", "restore", "checkpoint", "data", "eval"):
      row[f"{part}_s"] = last.get(f"{PREFIX}{part}_s", 0.0)
    row["other_s"] = max(0.0, row["wall_s"] - steps_s - sum(
        row[f"{p}_s"] for p in ("compile", "restore", "checkpoint", "data", "eval")))
    out.append(row)
  return out


def total(rows: list[dict]) -> dict[str, Any]:
  """The attempts summed, with goodput = productive / wall."""
  out = {f"{p}_s": sum(r[f"{p}_s"] for r in rows) for p in PARTS}
  out.update(attempt="all", wall_s=sum(r["wall_s"] for r in rows),
             rollbacks=sum(r["rollbacks"] for r in rows),
             end=rows[-1]["end"] if rows else "", start_step=rows[0]["start_step"] if rows else 0,
             end_step=rows[-1]["end_step"] if rows else 0)
  out["goodput"] = out["productive_s"] / out["wall_s"] if out["wall_s"] > 0 else math.nan
  return out


def summarize(lines: list[dict]) -> dict[str, Any]:
  """{'attempts': [...], 'total': {...}} of a run's metrics.jsonl lines."""
  rows = attempts(lines)
  for r in rows:
    r["goodput"] = r["productive_s"] / r["wall_s"] if r["wall_s"] > 0 else math.nan
  return {"attempts": rows, "total": total(rows)}


def table(rows: list[tuple[str, dict]]) -> str:
  """A fixed-width table: one row per (label, summary row)."""
  head = ["", "wall_s", *[f"{p}_s" for p in PARTS], "goodput", "steps", "rollbacks", "end"]
  lines = [head]
  for label, r in rows:
    lines.append([label, f"{r['wall_s']:.1f}", *[f"{r[f'{p}_s']:.1f}" for p in PARTS],
                  f"{r['goodput']:.1%}", f"{r['start_step']}-{r['end_step']}",
                  str(r["rollbacks"]), str(r["end"])])
  widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
  return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                             enumerate(zip(row, widths))) for row in lines)


def plot(rows: list[tuple[str, dict]], path: str, title: str = "") -> str:
  """A stacked bar per row (seconds of each part); written to `path` (PNG)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.7 * len(rows)), 4.0))
  labels = [label for label, _ in rows]
  bottom = [0.0] * len(rows)
  for part, color in zip(PARTS, COLORS):
    heights = [r[f"{part}_s"] for _, r in rows]
    ax.bar(labels, heights, bottom=bottom, color=color, label=part)
    bottom = [b + h for b, h in zip(bottom, heights)]
  for i, (_, r) in enumerate(rows):
    ax.text(i, bottom[i], f"{r['goodput']:.0%}", ha="center", va="bottom", fontsize=8)
  ax.set_ylabel("wall time (s)")
  ax.set_title(title or "goodput: where the wall time went")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
