"""The population's training loop: llama_jax.train's loop with a leading runs axis, one
writer, checkpointer and NaN check per member (the package docstring says what is shared)."""

from __future__ import annotations

import dataclasses
import math
import signal
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llama_jax import checkpoint as ckpt_lib
from llama_jax import config as config_lib
from llama_jax import metrics as metrics_lib
from llama_jax import sharding
from llama_jax import storage
from llama_jax import train as train_lib
from llama_jax.loss import batch_loss
from llama_jax.model import parametrization as param_lib
from llama_jax.model.llama import Llama
from llama_jax.optim import make_optimizer, traced_schedule
from llama_jax.preemption import StopSignal
from llama_jax.population.members import PopulationError, check_members, member_values

RUNS_AXIS = "runs"


def population_mesh(mesh_cfg, n_members: int, runs_devices: int, devices=None) -> Mesh:
  """(runs, data, fsdp, tensor): `runs_devices` groups of devices, each a config.mesh."""
  devices = list(jax.devices() if devices is None else devices)
  if runs_devices < 1 or n_members % runs_devices or len(devices) % runs_devices:
    raise PopulationError(
        f"runs_devices={runs_devices} must divide both the {n_members} members and the "
        f"{len(devices)} devices (each group of devices trains members/runs_devices of them)")
  sizes = sharding.mesh_sizes(mesh_cfg, len(devices) // runs_devices)
  grid = np.asarray(devices).reshape((runs_devices, *sizes.values()))
  return Mesh(grid, (RUNS_AXIS, *sizes), axis_types=(AxisType.Auto,) * (1 + len(sizes)))


def _stacked(shardings):
  """A member's NamedShardings with the runs axis in front."""
  return jax.tree.map(lambda s: NamedSharding(s.mesh, PartitionSpec(RUNS_AXIS, *s.spec)),
                      shardings)


@dataclasses.dataclass
class Population:
  """What the loop needs: the members' Setup (their shared shape, on the population mesh), the
  stacked shardings and the per-member values."""

  setup: train_lib.Setup
  configs: list[ml_collections.ConfigDict]
  workdirs: list[str]
  values: dict[str, list]
  state_shardings: Any       # stacked: [K, ...] on the runs axis
  hparam_sharding: NamedSharding

  @property
  def size(self) -> int:
    return len(self.configs)

  def hparams(self) -> dict[str, jax.Array]:
    """The traced per-member values, [K] each, split over the runs axis."""
    return {k: jax.device_put(np.asarray(self.values[k], np.float32), self.hparam_sharding)
            for k in ("lr", "weight_decay", "warmup_steps")}


def make_population(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
                    runs_devices: int = 1, log=print) -> Population:
  check_members(configs, workdirs)
  mesh = population_mesh(configs[0].mesh, len(configs), runs_devices)
  setup = train_lib.make_setup(configs[0], log=log, mesh=mesh)
  return Population(setup, list(configs), list(workdirs), member_values(configs),
                    _stacked(setup.state_shardings),
                    NamedSharding(mesh, PartitionSpec(RUNS_AXIS)))


# ---------------------------------------------------------------------------- state


def init_states(pop: Population):
  """Every member's initial state, [K, ...], in its sharding. A member's params are bitwise
  those of train.init_state for its seed and init_scale: each member is drawn by one compiled
  init taking its key (a traced key draws what a constant one does), not under vmap, whose
  batched draws differ from unbatched ones for some PRNGs (unsafe_rbg)."""
  setup = pop.setup

  def init(seed, init_scale):
    model = Llama(setup.model_cfg, rngs=nnx.Rngs(jax.random.key(seed)))
    params = param_lib.scale_init(nnx.to_pure_dict(nnx.state(model)), init_scale)
    return {"params": params, "opt_state": setup.optimizer.init(params),
            "step": jnp.zeros((), jnp.int32)}

  with jax.set_mesh(setup.mesh):
    init_one = jax.jit(init, out_shardings=setup.state_shardings)
    return _stack(pop, [init_one(jnp.int32(seed), jnp.float32(scale)) for seed, scale
                        in zip(pop.values["seed"], pop.values["init_scale"])])


def _stack(pop: Population, states: list):
  """K members' states (a run's own layout) as one [K, ...] state on the runs axis."""
  return jax.jit(lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s),
                 out_shardings=pop.state_shardings)(*states)


def restore_states(pop: Population, checkpointers, log=print):
  """(step, stacked state) from the members' checkpoints, all at one step; None when no
  member has one. Members at different steps cannot resume together."""
  latest = [max(c.steps(), default=-1) for c in checkpointers]
  if max(latest) < 0:
    return None
  if len(set(latest)) > 1:
    at = ", ".join(f"{w}: {s if s >= 0 else 'none'}" for w, s in zip(pop.workdirs, latest))
    raise PopulationError(f"population members have their latest checkpoints at different "
                          f"steps ({at}); resume them separately (python -m llama_jax "
                          "--workdir=MEMBER) or rerun the sweep, which groups them by step")
  states = []
  for workdir, checkpointer in zip(pop.workdirs, checkpointers):
    restored = checkpointer.restore_latest(pop.setup.abstract_state, log=log)
    if restored is None or restored[0] != latest[0]:
      raise PopulationError(f"{workdir}: checkpoint {latest[0]} could not be read; resume "
                            "this member alone (python -m llama_jax --workdir=...)")
    states.append(restored[1])
  return latest[0], _stack(pop, states)


def member_getter(pop: Population):
  """(stacked state, k) -> member k's state in a run's own layout, for its checkpoint."""
  take = jax.jit(lambda s, k: jax.tree.map(lambda x: x[k], s),
                 out_shardings=pop.setup.state_shardings)
  return lambda state, k: take(state, jnp.int32(k))


# ---------------------------------------------------------------------------- steps


def make_population_step(pop: Population):
  """(state [K,...], batch, hparams [K]) -> (state, stats [K]): train.train_step_fn per member
  under vmap, each member's optimizer built from its traced lr, warmup and weight decay."""
  setup, config = pop.setup, pop.setup.config
  steps = config.train.steps

  def member_step(state, batch, hp):
    schedule = traced_schedule(config.optim, steps, hp["lr"], hp["warmup_steps"])
    optimizer = make_optimizer(config.optim, steps, setup.lr_multipliers, schedule=schedule,
                               weight_decay=hp["weight_decay"])
    return train_lib.train_step_fn(config, setup.graphdef, optimizer, schedule)(state, batch)

  step = jax.vmap(member_step, in_axes=(0, None, 0), spmd_axis_name=RUNS_AXIS)
  return jax.jit(step, in_shardings=(pop.state_shardings, setup.batch_sharding,
                                     pop.hparam_sharding),
                 out_shardings=(pop.state_shardings, None), donate_argnums=0)


def make_population_eval_step(pop: Population):
  graphdef = pop.setup.graphdef

  def member_eval(params, batch):
    return batch_loss(nnx.merge(graphdef, params), batch)[1]

  step = jax.vmap(member_eval, in_axes=(0, None), spmd_axis_name=RUNS_AXIS)
  return jax.jit(step, in_shardings=(pop.state_shardings["params"], pop.setup.batch_sharding))


# ---------------------------------------------------------------------------- the loop


def _first_non_finite(pending, k: int) -> tuple[int, float] | None:
  for done, losses in pending:
    value = float(losses[k])
    if not math.isfinite(value):
      return done, value
  return None


def train_population(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str], *,
                     runs_devices: int = 1, log=print) -> list[dict[str, Any]]:
  """Trains the members (resuming them if they all have checkpoints at one step); returns a
  summary per member like train.train's, with 'diverged' (None or the error's text)."""
  is_main = jax.process_index() == 0
  log_all, log = log, log if is_main else (lambda *a, **k: None)
  stop = StopSignal()
  pop = make_population(configs, workdirs, runs_devices, log=log)
  setup, t_cfg, k_all = pop.setup, pop.configs[0].train, range(pop.size)
  for config, workdir in zip(pop.configs, pop.workdirs):
    storage.check_writable(workdir, "--workdir")
    train_lib.check_workdir_config(config, workdir)
    if is_main:
      config_lib.write(config, workdir)

  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    from llama_jax import data
    tokenizer = train_lib.run_tokenizer(pop.configs[0], pop.workdirs)
    _, train_loader, eval_loader = data.make_loaders(pop.configs[0], setup.batch_sharding,
                                                     tokenizer=tokenizer)
    checkpointers = [ckpt_lib.Checkpointer(w, t_cfg.keep_checkpoints) for w in pop.workdirs]
    restored = restore_states(pop, checkpointers, log=log_all)
    if restored is not None:
      start_step, state = restored
      log(f"population of {pop.size}: resumed from step {start_step}")
    else:
      start_step, state = 0, init_states(pop)
    hparams = pop.hparams()
    train_step, eval_step = make_population_step(pop), make_population_eval_step(pop)
    take = member_getter(pop)
    writers = [metrics_lib.MetricsWriter(w, enabled=is_main, config=c)
               for w, c in zip(pop.workdirs, pop.configs)]
    tokens_per_step = pop.configs[0].data.batch_size * pop.configs[0].data.seq_len
    flops = train_lib.model_flops(setup, log)
    log(f"population of {pop.size} members, {setup.mesh.shape[RUNS_AXIS]} group(s) of devices "
        f"on the runs axis: lr {pop.values['lr']}")

    diverged: dict[int, str] = {}
    live = lambda: [k for k in k_all if k not in diverged]  # noqa: E731
    last_stats: list[dict | None] = [None] * pop.size
    last_eval: list[float | None] = [None] * pop.size

    def run_eval(done: int, params) -> None:
      loss, per_source = train_lib.eval_losses(eval_step, params, eval_loader, t_cfg.eval_steps)
      for k in live():
        last_eval[k] = float(loss[k])
        writers[k].write(done, {"eval_loss": last_eval[k],
                                **{f"eval_loss/{n}": float(v[k]) for n, v in per_source.items()}})
      log(f"step {done}: eval_loss " + " ".join(
          f"{last_eval[k]:.4f}" if k not in diverged else "-" for k in k_all))

    def check_finite(pending) -> None:
      for k in live():
        bad = _first_non_finite(pending, k)
        if bad is not None:
          diverged[k] = (f"{pop.workdirs[k]}: loss is {bad[1]} at step {bad[0]}; stopped "
                         "logging and saving this member (its last good checkpoint is kept), "
                         "the others train on")
          log("error: " + diverged[k])

    progress = train_lib.progress_bar(start_step, t_cfg.steps, is_main)
    # Every member's tokens/s is the program's rate over K: the K members share each step.
    throughput = train_lib.Throughput(tokens_per_step)
    pending: list[tuple[int, Any]] = []
    stopped_by, step = None, start_step
    if start_step == 0:
      run_eval(0, state["params"])
    try:
      with stop:
        for step, batch in train_loader.iterate(start_step):
          if step >= t_cfg.steps or not live():
            break
          state, stats = train_step(state, batch, hparams)
          done = step + 1
          pending.append((done, stats["loss"]))
          throughput.step(stats["loss"])
          progress.update(1)
          at_log, at_eval, at_ckpt = (train_lib.itstime(done, every, t_cfg.steps) for every in (
              t_cfg.log_every, t_cfg.eval_every, t_cfg.checkpoint_every))
          stopping = stop.should_stop(done, waited=at_log or at_eval or at_ckpt)
          if at_log or at_eval or at_ckpt or stopping:
            pending = jax.device_get(pending)
            check_finite(pending)
            pending = []
          if at_log:
            stats, tps = jax.device_get(stats), throughput.read()
            for k in live():
              last_stats[k] = train_lib.step_metrics(jax.tree.map(lambda x: x[k], stats),
                                                     tps, done, tokens_per_step, flops)
              last_stats[k]["population_size"] = pop.size
              writers[k].write(done, last_stats[k])
            progress.set_postfix(tok_s=f"{tps * pop.size:,.0f}")
          if at_eval:
            run_eval(done, state["params"])
            throughput.restart()
          if at_ckpt or stopping:
            for k in live():
              checkpointers[k].save(done, take(state, k), pop.configs[k])
              writers[k].flush()
          if stopping:
            stopped_by = signal.Signals(stop.received).name
            break
        step = int(jax.device_get(state["step"])[0])
    finally:
      progress.close()
      for c in checkpointers:
        c.close()
      for w in writers:
        w.close()
  if stopped_by:
    log(f"stopped by {stopped_by} at step {step}; checkpoints saved, rerun to resume")
  return [{"step": step, "train": last_stats[k], "eval_loss": last_eval[k],
           "stopped_by": stopped_by, "diverged": diverged.get(k)} for k in k_all]
