"""python -m llama_jax.scaling DIR [--out OUT] [--loss eval|train] [--bootstrap 1000] [--seed 0]
[--where KEY=VALUE ...] [--approach2_only]

IsoFLOP fit of a sweep's DIR/results.csv (Chinchilla's approach 2: llama_jax.scaling.fit) and
approaches 1 and 3 beside it (llama_jax.scaling.approaches), written to OUT (default
DIR/scaling): results.csv with a `used` column, report.md, isoflop.png, optimal.png. A sweep of
several architectures (dense and MoE) is fitted one at a time: --where model.moe_experts=8.
Guide: docs/experiments.md (Scaling fits).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from llama_jax import errors
from llama_jax.scaling.fit import BOOTSTRAP_METHODS
from llama_jax.scaling.report import analyze, default_out, fmt_ci


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  p = errors.ArgumentParser(prog="python -m llama_jax.scaling",
                            description="IsoFLOP fit of a scaling sweep's results.csv")
  p.add_argument("results", help="sweep workdir holding results.csv, or the csv itself")
  p.add_argument("--out", help="output folder (default: a folder `scaling` beside the "
                 "results.csv)")
  p.add_argument("--loss", choices=("eval", "train"), default="eval")
  p.add_argument("--bootstrap", type=int, default=1000, help="resamples (0 = no intervals)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--bootstrap_method", choices=BOOTSTRAP_METHODS, default="residual")
  p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                 help="fit only the rows whose results.csv column KEY is VALUE (repeatable), "
                 "e.g. model.moe_experts=8")
  p.add_argument("--approach2_only", action="store_true",
                 help="only the IsoFLOP parabolas: skip approaches 1 and 3")
  args = p.parse_args(argv)
  csv_path = (os.path.join(args.results, "results.csv") if os.path.isdir(args.results)
              else args.results)  # as analyze reads it
  if not os.path.isfile(csv_path):
    raise errors.UserError(f"{csv_path} not found: give a sweep workdir holding results.csv "
                           "(python -m llama_jax.sweep ... --collect writes it) or the csv")
  if args.bootstrap < 0:
    raise errors.UserError(f"--bootstrap={args.bootstrap} must be >= 0")
  result = analyze(args.results, args.out, loss=args.loss, bootstrap=args.bootstrap,
                   seed=args.seed, bootstrap_method=args.bootstrap_method, where=args.where,
                   approaches=not args.approach2_only)
  for conv, fit in result.fits.items():
    print(f"approach 2, {conv}: a = {fmt_ci(fit.n_opt)}, b = {fmt_ci(fit.d_opt)}")
  if result.approaches is not None:
    for name, a, (lo, hi), *_ in result.approaches.rows():
      print(f"approach {name}: a = {a:.3f} [{lo:.3f}, {hi:.3f}]")
  out = args.out or default_out(csv_path)
  print(f"wrote {out}/{{results.csv,report.md,isoflop.png,optimal.png}}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
