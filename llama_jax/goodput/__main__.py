"""Where the wall time of a run, or of a sweep's runs, went (docs/robustness.md):

    python -m llama_jax.goodput WORKDIR [--png PATH] [--json]

WORKDIR holds a run's metrics.jsonl (one row per attempt and the total) or a sweep's runs (one
row per run and all runs): a table on stdout, or JSON lines with --json, and a stacked-bar PNG
(default WORKDIR/goodput.png)."""

from __future__ import annotations

import json
import sys
from typing import Sequence

from llama_jax import storage
from llama_jax.errors import ArgumentParser, UserError, cli
from llama_jax.goodput import report
from llama_jax.metrics import read_metrics


def _has_metrics(path: str) -> bool:
  return storage.exists(storage.join(path, "metrics.jsonl"))


def rows_of(workdir: str) -> tuple[list[tuple[str, dict]], str]:
  """(table rows, what they are) of a run's or a sweep's directory."""
  if _has_metrics(workdir):
    summary = report.summarize(read_metrics(workdir))
    if not summary["attempts"]:
      raise UserError(f"{workdir}/metrics.jsonl has no goodput/ fields: it was written before "
                      "runs accounted for their time; rerun or resume it to get them")
    rows = [(f"attempt {r['attempt']}", r) for r in summary["attempts"]]
    return rows + [("total", summary["total"])], f"run {workdir}"
  runs = sorted(name for name in (storage.listdir(workdir) if storage.isdir(workdir) else [])
                if _has_metrics(storage.join(workdir, name)))
  if not runs:
    raise UserError(f"{workdir} holds no metrics.jsonl, nor runs that do; give a run's "
                    "--workdir or a sweep's")
  rows = []
  for name in runs:
    summary = report.summarize(read_metrics(storage.join(workdir, name)))
    if summary["attempts"]:
      rows.append((name, summary["total"]))
  if len(rows) > 1:
    everything = report.total([r for _, r in rows])
    rows.append(("all runs", {**everything, "end": "", "start_step": "", "end_step": ""}))
  return rows, f"sweep {workdir} ({len(runs)} runs)"


@cli
def main(argv: Sequence[str] | None = None) -> int:
  p = ArgumentParser(prog="python -m llama_jax.goodput", description=__doc__.split("\n")[0])
  p.add_argument("workdir", help="a run's workdir, or a sweep's (its runs' parent)")
  p.add_argument("--png", help="where the stacked-bar chart goes (default WORKDIR/goodput.png)")
  p.add_argument("--json", action="store_true", help="print the rows as JSON lines instead")
  args = p.parse_args(argv)
  rows, what = rows_of(args.workdir)
  if args.json:
    for label, r in rows:
      print(json.dumps({"label": label, **r}))
  else:
    print(what)
    print(report.table(rows))
  png = args.png or (None if storage.is_remote(args.workdir)
                     else storage.join(args.workdir, "goodput.png"))
  if png:
    print(report.plot(rows, png, title=f"goodput of {what}"), file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
