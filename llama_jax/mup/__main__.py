"""python -m llama_jax.mup coord_check --config=configs/base.py:tiny --widths=64,128,256,512
    [--depths=2,4,8] [--steps=3] [--out=coord_check] [--config.optim.lr=1e-2]

Trains `steps` steps at each width (at the config's depth) and each depth (at its width), under
SP and μP with the config's model as the base shape, and writes OUT/coords.csv and the plots
OUT/width.png (and OUT/depth.png); prints each layer's spread (max / min over widths) at the
last step. The optimizer runs at a constant learning rate with no warmup, so the steps measured
are at the configured lr. Guide: docs/experiments.md (μP and the coordinate check).
"""

from __future__ import annotations

import csv
import dataclasses
import io

from absl import flags
from ml_collections import config_flags

from llama_jax import errors, storage
from llama_jax.model.config import DEPTH_SCALINGS

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py:tiny", "Base config.")
_WIDTHS = flags.DEFINE_list("widths", [], "Model dims (default: 1, 2, 4, 8 x the base dim).")
_DEPTHS = flags.DEFINE_list("depths", [], "Layer counts to check at the base width.")
_STEPS = flags.DEFINE_integer("steps", 3, "Updates measured after.",
                              lower_bound=1)
_DEPTH_SCALING = flags.DEFINE_enum("depth_scaling", "completep", DEPTH_SCALINGS[1:],
                                   "μP's residual-branch scaling over --depths.")
_OUT = flags.DEFINE_string("out", "coord_check", "Output folder.")


def _ints(name, values):
  try:
    return [int(v) for v in values]
  except ValueError:
    raise errors.UserError(f"--{name}={','.join(values)}: give comma-separated integers") from None


def main(argv):
  if argv[1:] != ["coord_check"]:
    raise errors.UserError(f"unknown command {' '.join(argv[1:]) or '(none)'}; the command is "
                           "`python -m llama_jax.mup coord_check --config=...`")
  from llama_jax.mup import coord_check as cc  # jax and the model: after the flags are good

  config = _CONFIG.value
  base = int(config.model.dim)
  widths = _ints("widths", _WIDTHS.value) or [base, 2 * base, 4 * base, 8 * base]
  depths = _ints("depths", _DEPTHS.value)
  config.optim.update(dict(warmup_steps=0, schedule="constant"))
  config.train.steps = _STEPS.value
  coords = cc.coord_check(config, widths=widths, depths=depths, steps=_STEPS.value,
                          depth_scaling=_DEPTH_SCALING.value)
  table = io.StringIO(newline="")  # written whole: --out may be a bucket
  w = csv.DictWriter(table, fieldnames=[x.name for x in dataclasses.fields(cc.Coord)])
  w.writeheader()
  w.writerows(dataclasses.asdict(c) for c in coords)
  storage.write_text(storage.join(_OUT.value, "coords.csv"), table.getvalue())
  cc.plot([c for c in coords if c.depth == config.model.n_layers],
          storage.join(_OUT.value, "width.png"))
  if depths:
    cc.plot([c for c in coords if c.width == base], storage.join(_OUT.value, "depth.png"),
            over="depth")
  last = _STEPS.value
  for over, present in (("width", len(widths) > 1), ("depth", len(depths) > 1)):
    if not present:
      continue
    subset = [c for c in coords if getattr(c, "depth" if over == "width" else "width")
              == (config.model.n_layers if over == "width" else base)]
    for p in ("sp", "mup"):
      layers = dict.fromkeys(c.layer for c in subset if c.parametrization == p)
      spreads = {layer: cc.spread(subset, p, layer, last, over) for layer in layers}
      print(f"{p} over {over}s, step {last}: " + ", ".join(
          f"{layer} x{s:.2f}" for layer, s in spreads.items() if layer in ("embedding", "logits")
          or layer == list(layers)[-2]))  # the last block
  print(f"wrote {_OUT.value}/coords.csv and the plots")


if __name__ == "__main__":
  errors.run(main)
