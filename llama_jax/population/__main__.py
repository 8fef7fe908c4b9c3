"""python -m llama_jax.population SPEC.json: trains a population (llama_jax.population).

SPEC: {"members": [{"name": str, "workdir": str, "config": {... the config as config.json
holds it ...}}, ...], "runs_devices": R}, as the sweep's --population writes it. Every config is
validated before anything starts; a member whose loss turns NaN / Inf makes the program end
with one line `error: ...` naming it (exit status 2) once the others have finished.
Guide: docs/experiments.md (Population training).
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from llama_jax import config as config_lib
from llama_jax import storage
from llama_jax.errors import ArgumentParser, UserError, cli
from llama_jax.population.members import PopulationError


def read_spec(path: str) -> tuple[list, list[str], int]:
  """(configs, workdirs, runs_devices) of a spec file, each config validated."""
  if not storage.exists(path):
    raise PopulationError(f"population spec {path} not found")
  try:
    spec = json.loads(storage.read_text(path))
    members = spec["members"]
    configs = [config_lib.from_dict(m["config"]) for m in members]
    workdirs = [m["workdir"] for m in members]
  except (ValueError, KeyError, TypeError) as e:
    raise PopulationError(f"population spec {path} is not a members list of name, workdir and "
                          f"config ({type(e).__name__}: {e}); write it with "
                          "llama_jax.sweep --population") from None
  for config, member in zip(configs, members):
    try:
      config_lib.validate(config)
    except UserError as e:
      raise PopulationError(f"member {member.get('name', '?')}: {e}") from None
  return configs, workdirs, int(spec.get("runs_devices", 1))


@cli
def main(argv: Sequence[str] | None = None) -> int:
  p = ArgumentParser(prog="python -m llama_jax.population",
                     description="Train same-shape runs as one program (llama_jax.population).")
  p.add_argument("spec", help="the population's JSON spec (members, runs_devices)")
  p.add_argument("--runs_devices", type=int, default=0,
                 help="groups of devices on the runs axis (default: the spec's, else 1)")
  args = p.parse_args(argv)
  configs, workdirs, runs_devices = read_spec(args.spec)

  from llama_jax import sharding
  from llama_jax.population.loop import train_population
  print("processes: " + sharding.initialize_distributed(None, None, None), flush=True)
  summaries = train_population(configs, workdirs, runs_devices=args.runs_devices or runs_devices)
  failed = [s["diverged"] for s in summaries if s["diverged"]]
  if failed:
    raise PopulationError(f"{len(failed)} of {len(summaries)} members diverged: "
                          + "; ".join(failed))
  return 0


if __name__ == "__main__":
  sys.exit(main())
