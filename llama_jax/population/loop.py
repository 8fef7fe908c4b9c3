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
from llama_jax import rollback as rollback_lib
from llama_jax import sharding, spikes
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


def init_member(pop: Population, k: int):
  """Member k's initial state in a run's own layout. Its params are bitwise those of
  train.init_state for its seed and init_scale: each member is drawn by one compiled init
  taking its key (a traced key draws what a constant one does), not under vmap, whose batched
  draws differ from unbatched ones for some PRNGs (unsafe_rbg)."""
  setup = pop.setup

  def init(seed, init_scale):
    model = Llama(setup.model_cfg, rngs=nnx.Rngs(jax.random.key(seed)))
    params = param_lib.scale_init(nnx.to_pure_dict(nnx.state(model)), init_scale)
    return spikes.with_guard(setup.config.train, {
        "params": params, "opt_state": setup.optimizer.init(params),
        "step": jnp.zeros((), jnp.int32)})

  with jax.set_mesh(setup.mesh):
    init_one = setup.jitted.setdefault("population_init", jax.jit(
        init, out_shardings=setup.state_shardings))
    return init_one(jnp.int32(pop.values["seed"][k]), jnp.float32(pop.values["init_scale"][k]))


def init_states(pop: Population):
  """Every member's initial state, [K, ...], in its sharding (init_member's)."""
  return _stack(pop, [init_member(pop, k) for k in range(pop.size)])


def _stack(pop: Population, states: list):
  """K members' states (a run's own layout) as one [K, ...] state on the runs axis."""
  return jax.jit(lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s),
                 out_shardings=pop.state_shardings)(*states)


def restore_states(pop: Population, checkpointers, log=print):
  """(data position, stacked state) from the members' newest checkpoints, all at one data
  position (step + the member's rollback offset, llama_jax/rollback.py); None when no member
  has one. Members at different positions cannot resume together."""
  latest = [max(c.steps(), default=-1) for c in checkpointers]
  if max(latest) < 0:
    return None
  states, positions = [], []
  for workdir, checkpointer, step in zip(pop.workdirs, checkpointers, latest):
    restored = checkpointer.restore_latest(pop.setup.abstract_state, log=log) if step >= 0 \
        else None
    if step >= 0 and (restored is None or restored[0] != step):
      raise PopulationError(f"{workdir}: checkpoint {step} could not be read; resume "
                            "this member alone (python -m llama_jax --workdir=...)")
    states.append(restored and restored[1])
    positions.append(step + rollback_lib.Rollbacks.offset(restored[1]) if restored else -1)
  if len(set(positions)) > 1:
    at = ", ".join(f"{w}: {p if p >= 0 else 'none'}" for w, p in zip(pop.workdirs, positions))
    raise PopulationError(f"population members have their latest checkpoints at different "
                          f"data positions ({at}); resume them separately (python -m "
                          "llama_jax --workdir=MEMBER) or rerun the sweep, which groups them")
  return positions[0], _stack(pop, states)


def member_getter(pop: Population):
  """(stacked state, k) -> member k's state in a run's own layout, for its checkpoint."""
  take = jax.jit(lambda s, k: jax.tree.map(lambda x: x[k], s),
                 out_shardings=pop.setup.state_shardings)
  return lambda state, k: take(state, jnp.int32(k))


def member_setter(pop: Population):
  """(stacked state, k, member state) -> the stacked state with member k's replaced (a
  member's rollback)."""
  put = jax.jit(lambda s, k, m: jax.tree.map(lambda x, y: x.at[k].set(y), s, m),
                out_shardings=pop.state_shardings, donate_argnums=0)
  return lambda state, k, member: put(state, jnp.int32(k), member)


# ---------------------------------------------------------------------------- steps


def make_population_step(pop: Population):
  """(state [K,...], batch, hparams [K]) -> (state, stats [K]): train.train_step_fn per member
  under vmap, each member's optimizer built from its traced lr, warmup and weight decay. With
  the guard on (llama_jax/spikes.py), hparams["active"] [K] leaves a member that is done (a
  rolled-back one finishes later than the others) exactly as it was."""
  setup, config = pop.setup, pop.setup.config
  steps = config.train.steps

  def member_step(state, batch, hp):
    schedule = traced_schedule(config.optim, steps, hp["lr"], hp["warmup_steps"])
    optimizer = make_optimizer(config.optim, steps, setup.lr_multipliers, schedule=schedule,
                               weight_decay=hp["weight_decay"])
    new, stats = train_lib.train_step_fn(config, setup.graphdef, optimizer, schedule)(state,
                                                                                      batch)
    if "active" in hp:
      new = jax.tree.map(lambda a, b: jnp.where(hp["active"], b, a), state, new)
    return new, stats

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
    config_lib.check_workdir(config, workdir)
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
    take, put = member_getter(pop), member_setter(pop)
    writers = [metrics_lib.MetricsWriter(w, enabled=is_main, config=c)
               for w, c in zip(pop.workdirs, pop.configs)]
    tokens_per_step = pop.configs[0].data.batch_size * pop.configs[0].data.seq_len
    flops = metrics_lib.model_flops(setup.model_cfg, pop.configs[0].data.seq_len, setup.mesh,
                                    log)
    log(f"population of {pop.size} members, {setup.mesh.shape[RUNS_AXIS]} group(s) of devices "
        f"on the runs axis: lr {pop.values['lr']}")

    # With rollbacks (llama_jax/rollback.py) a member rolls back alone: its step is then the
    # data position (the population's, shared) minus its own offset, and it trains on, masked
    # off ('active') once done, until every member has done train.steps.
    guard_on = "guard" in setup.abstract_state
    offsets = (np.asarray(jax.device_get(state["guard"]["offset"]), np.int64) if guard_on
               else np.zeros(pop.size, np.int64))
    diverged: dict[int, str] = {}
    live = lambda: [k for k in k_all if k not in diverged]  # noqa: E731
    last_stats: list[dict | None] = [None] * pop.size
    last_eval: list[float | None] = [None] * pop.size

    def run_eval(done: int, params, members) -> None:
      loss, per_source = train_lib.eval_losses(eval_step, params, eval_loader, t_cfg.eval_steps)
      for k in members:
        last_eval[k] = float(loss[k])
        writers[k].write(done - offsets[k], {"eval_loss": last_eval[k], **{
            f"eval_loss/{n}": float(v[k]) for n, v in per_source.items()}})
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

    def roll_back(state, k: int, trouble: rollback_lib.Trouble):
      """Member k restored from before its trouble, its data moved past it (or, its
      rollbacks spent, marked diverged)."""
      g = jax.tree.map(lambda x: np.asarray(x)[k], guards)
      c = rollback_lib.checkpoint_before(checkpointers[k], trouble.first)
      rollback_lib.set_aside(checkpointers[k], pop.workdirs[k], c, log)
      if int(g["rollbacks"]) >= t_cfg.max_rollbacks:
        diverged[k] = f"{pop.workdirs[k]}: {rollback_lib.diverged(t_cfg, trouble, c)}"
        log("error: " + diverged[k])
        return state
      member = (checkpointers[k].restore(c, setup.abstract_state) if c else init_member(pop, k))
      values = rollback_lib.rolled_guard(g, trouble.found, c)
      member["guard"] = {**member["guard"], **{
          name: jax.device_put(np.int32(v), setup.state_shardings["guard"][name])
          for name, v in values.items()}}
      offsets[k] = values["offset"]
      rollback_lib.record(writers[k], trouble.found, c, trouble, values, {},
                          lambda m: log(f"{pop.workdirs[k]}: {m}"))
      return put(state, k, member)

    progress = train_lib.progress_bar(start_step, t_cfg.steps, is_main)
    # Every member's tokens/s is the program's rate over K: the K members share each step.
    throughput = metrics_lib.Throughput(tokens_per_step)
    pending: list[tuple[int, Any]] = []
    stopped_by, step = None, start_step
    if start_step == 0:
      run_eval(0, state["params"], live())
    try:
      with stop:
        for step, batch in train_loader.iterate(start_step):
          active = [k for k in live() if step - offsets[k] < t_cfg.steps]
          if not active:
            break
          if guard_on:
            hparams["active"] = jax.device_put(np.isin(k_all, active), pop.hparam_sharding)
          state, stats = train_step(state, batch, hparams)
          done = step + 1
          pending.append((done, stats["loss"]))
          throughput.step(stats["loss"])
          progress.update(1)
          at_log, at_eval, at_ckpt = ([k for k in active if done % every == 0
                                       or done - offsets[k] == t_cfg.steps] for every in (
              t_cfg.log_every, t_cfg.eval_every, t_cfg.checkpoint_every))
          synced = bool(at_log or at_eval or at_ckpt)
          stopping = stop.should_stop(done, waited=synced)
          if (synced or stopping) and not guard_on:
            check_finite(jax.device_get(pending))
          pending = []
          if guard_on and (synced or stopping):
            guards = jax.device_get(state["guard"])
            troubles = {k: rollback_lib.find_trouble(
                t_cfg, jax.tree.map(lambda x: np.asarray(x)[k], guards), done - offsets[k])
                for k in active}
            for k, trouble in troubles.items():
              if trouble and synced:
                state = roll_back(state, k, trouble)
            # a member with trouble pending at a stop saves nothing (train.py says why)
            saving = [k for k in live() if not troubles.get(k)]
          else:
            saving = live()
          at_log, at_eval, at_ckpt = ([k for k in m if k in live() and not (
              guard_on and troubles.get(k))] for m in (at_log, at_eval, at_ckpt))
          if at_log:
            stats, tps = jax.device_get(stats), throughput.read()
            for k in at_log:
              last_stats[k] = metrics_lib.step_metrics(jax.tree.map(lambda x: x[k], stats),
                                                     tps, done - offsets[k], tokens_per_step, flops)
              last_stats[k]["population_size"] = pop.size
              if guard_on:
                last_stats[k].update(rollback_lib.log_fields(
                    jax.tree.map(lambda x: np.asarray(x)[k], guards), last_stats[k]))
              writers[k].write(done - offsets[k], last_stats[k])
            progress.set_postfix(tok_s=f"{tps * pop.size:,.0f}")
          if at_eval:
            run_eval(done, state["params"], at_eval)
            throughput.restart()
          for k in at_ckpt if not stopping else [k for k in saving if k in active]:
            checkpointers[k].save(int(done - offsets[k]), take(state, k), pop.configs[k])
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
