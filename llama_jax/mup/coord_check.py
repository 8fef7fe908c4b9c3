"""The coordinate check (Yang et al. 2022, TP5 Appendix D; the mup library's `coord_check`):
train a few steps at several widths (or depths) from one base shape and watch each layer's
activation scale, mean |x| over batch, positions and features. Under a parametrization that
transfers, the curves are flat in width; under SP with Adam, a hidden activation moves by
O(lr x fan_in) per step and the logits grow with width.

Layers: `embedding` (the embedding output), `block_i` (block i's output, the residual stream),
`logits`. Step t is measured after t updates (t = 0: at init), always on the first batch, as
`l1` = mean |x_t| and `delta` = mean |x_t - x_0|. The delta is what μP keeps Θ(1) in width
(TP5's desiderata are on the change an update makes); the value at init need not be flat
(μP's logits at init shrink as 1/sqrt(width), as TP5's 1/fan_in^2 readout variance says).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from llama_jax import config as config_lib
from llama_jax import storage
from llama_jax import train
from llama_jax.data.loader import make_loaders


@dataclasses.dataclass(frozen=True)
class Coord:
  parametrization: str
  width: int
  depth: int
  step: int
  layer: str
  l1: float     # mean |activation|
  delta: float  # mean |activation - its value at init|


def scaled_config(config: ml_collections.ConfigDict, parametrization: str, width: int,
                  depth: int, depth_scaling: str) -> ml_collections.ConfigDict:
  """config's model widened to `width` (heads and ffn in proportion, head dim kept) and
  deepened to `depth`, with the config's own model shape as the base shape."""
  c = copy.deepcopy(config)
  m = c.model
  if width % m.dim and m.dim % width:
    raise config_lib.ConfigError(f"width {width} and the base dim {m.dim} must divide one another")
  ratio = width / m.dim
  heads, kv, ffn = (int(round(x * ratio)) for x in (m.n_heads, m.n_kv_heads, m.ffn_dim))
  if min(heads, kv) < 1 or heads * m.dim != m.n_heads * width:
    raise config_lib.ConfigError(f"width {width}: the base's {m.n_heads} heads of {m.dim // m.n_heads} "
                                 "do not scale to it; pick widths that are multiples of the head dim")
  c.model.update(dict(
      parametrization=parametrization, depth_scaling=depth_scaling,
      mup_base_dim=m.dim, mup_base_n_heads=m.n_heads, mup_base_ffn_dim=m.ffn_dim,
      mup_base_n_layers=m.n_layers))
  c.model.update(dict(dim=width, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn, n_layers=depth))
  return c


def _activations(graphdef):
  @jax.jit
  def activations(params, batch):
    model = nnx.merge(graphdef, params)
    logits, hidden = model(batch["inputs"], positions=batch.get("positions"),
                           segment_ids=batch.get("segment_ids"), output_hidden_states=True)
    return [*hidden, logits]  # embedding, block_1..block_L, logits
  return activations


@jax.jit
def _scales(acts, acts0):
  return ([jnp.mean(jnp.abs(a)) for a in acts],
          [jnp.mean(jnp.abs(a - b)) for a, b in zip(acts, acts0)])


def measure(config: ml_collections.ConfigDict, steps: int) -> list[tuple[int, str, float, float]]:
  """(step, layer, l1, delta) for steps 0..steps of one config, trained on one device."""
  config_lib.validate(config)
  setup = train.make_setup(config, devices=jax.devices()[:1], log=lambda *_: None)
  state = train.init_state(setup, config.train.seed)
  step_fn = train.make_train_step(setup)
  activations = _activations(setup.graphdef)
  _, loader, _ = make_loaders(config, setup.batch_sharding)
  probe = loader.batch(0)
  names = (["embedding"] + [f"block_{i + 1}" for i in range(int(config.model.n_layers))]
           + ["logits"])
  acts0 = activations(state["params"], probe)
  out = []
  for t in range(steps + 1):
    l1, delta = jax.device_get(_scales(activations(state["params"], probe), acts0))
    out += [(t, n, float(a), float(d)) for n, a, d in zip(names, l1, delta)]
    if t < steps:
      state, _ = step_fn(state, loader.batch(t))
  return out


def coord_check(config: ml_collections.ConfigDict, *, widths: Sequence[int] = (),
                depths: Sequence[int] = (), steps: int = 3,
                parametrizations: Iterable[str] = ("sp", "mup"),
                depth_scaling: str = "completep") -> list[Coord]:
  """Every (parametrization, width) at the base depth and every (parametrization, depth) at
  the base width. SP runs without depth scaling; μP with `depth_scaling` over depths."""
  base_dim, base_depth = int(config.model.dim), int(config.model.n_layers)
  shapes = sorted({(w, base_depth) for w in widths or [base_dim]}
                  | {(base_dim, d) for d in depths})
  coords = []
  for p in parametrizations:
    for width, depth in shapes:
      scaling = depth_scaling if (p == "mup" and depths) else "none"
      c = scaled_config(config, p, width, depth, scaling)
      coords += [Coord(p, width, depth, *m) for m in measure(c, steps)]
  return coords


def spread(coords: Sequence[Coord], parametrization: str, layer: str, step: int,
           over: str = "width", stat: str = "delta") -> float:
  """max / min of a layer's `stat` across the widths (or depths) of one sweep's coords at one
  step: 1 is flat."""
  values = [getattr(c, stat) for c in coords if c.parametrization == parametrization and c.layer == layer
            and c.step == step]
  keys = {getattr(c, over) for c in coords if c.parametrization == parametrization}
  if len(keys) < 2:
    raise ValueError(f"spread over {over} needs at least two of them, got {sorted(keys)}")
  return max(values) / min(values)


def plot(coords: Sequence[Coord], path: str, over: str = "width", stat: str = "delta") -> None:
  """One panel per (parametrization, step >= 1): each layer's `stat` against width (log2)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  params = sorted({c.parametrization for c in coords})
  steps = sorted({c.step for c in coords} - ({0} if stat == "delta" else set()))
  other = "depth" if over == "width" else "width"
  fixed = min(getattr(c, other) for c in coords)  # the base: widths at base depth, or v.v.
  fig, axes = plt.subplots(len(params), len(steps), figsize=(3.2 * len(steps), 3 * len(params)),
                           squeeze=False, sharey="row")
  for i, p in enumerate(params):
    rows = [c for c in coords if c.parametrization == p and getattr(c, other) == fixed]
    for j, t in enumerate(steps):
      ax = axes[i][j]
      for layer in dict.fromkeys(c.layer for c in rows):
        pts = sorted((getattr(c, over), getattr(c, stat)) for c in rows if c.layer == layer and c.step == t)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=layer)
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_title(f"{p.upper()}, step {t}")
      ax.set_xlabel(over)
      if j == 0:
        ax.set_ylabel("mean |x_t - x_0|" if stat == "delta" else "mean |x_t|")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  storage.write_png(path, fig, dpi=100)
  plt.close(fig)
