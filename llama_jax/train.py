"""The training loop, top to bottom: mesh, data, abstract state, shardings, sharded init, a
jitted train_step with donated state, eval, logs, checkpoints, a sample at the end.

The step number is the only loop state outside the train state: the data position and the
learning-rate schedule both derive from it, so a resumed run is bitwise the run that was
never interrupted. The config is trusted: every entry point has passed it through
llama_jax.config.validate before calling in here.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from llama_jax import checkpoint as ckpt_lib
from llama_jax import config as config_lib
from llama_jax import init_from
from llama_jax import metrics as metrics_lib
from llama_jax import rollback as rollback_lib
from llama_jax import sharding, spikes
from llama_jax import storage, waiting
from llama_jax.goodput import ledger as goodput
from llama_jax.errors import UserError
from llama_jax.loss import batch_loss, batch_loss_and_stats, loss_tokens
from llama_jax.model import lora as lora_lib
from llama_jax.model import moe as moe_lib
from llama_jax.model import sizes
from llama_jax.model.llama import Llama  # noqa: F401  (tests build train.Llama)
from llama_jax.model import parametrization as param_lib
from llama_jax.model import remat as remat_lib
from llama_jax.model.config import ModelConfig
from llama_jax.optim import make_optimizer, make_schedule
from llama_jax.preemption import StopSignal


class NonFiniteLossError(UserError):
  """A NaN / Inf loss: the run stops at that step, keeping the last good checkpoint."""


# ============================================================================ state


@dataclasses.dataclass
class Setup:
  """Everything derived from the config before any array is allocated."""

  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  graphdef: Any
  optimizer: optax.GradientTransformation
  abstract_state: Any      # {'params', 'opt_state', 'step'[, 'guard']} of ShapeDtypeStructs
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  lr_multipliers: Any = None  # per-parameter lr multipliers (μP, depth scaling) or None
  # LoRA (config.lora.rank > 0): params hold base and adapters, the optimizer state and the
  # checkpoints only the adapters; None = every param trains.
  lora: lora_lib.LoraSpec | None = None
  jitted: dict = dataclasses.field(default_factory=dict, repr=False)  # init_state's, by seed


def _trainable(spec: lora_lib.LoraSpec | None, params):
  """The part of a params tree that trains: the adapters under LoRA, else all but router biases."""
  return moe_lib.trainable(params) if spec is None else lora_lib.adapters_of(params)


def _with_trained(spec: lora_lib.LoraSpec | None, params, trained):
  """params with its trainable part replaced by `trained`."""
  return (moe_lib.with_trainable(params, trained) if spec is None
          else lora_lib.with_adapters(params, trained))


def make_setup(config: ml_collections.ConfigDict, devices=None, log=print, *,
               mesh: jax.sharding.Mesh | None = None) -> Setup:
  """The Setup of a validated config on `devices` (default all), or on `mesh` (a population's,
  whose extra `runs` axis no rule names); what needs the devices (the mesh fits them, each
  split divides its size) raises ShardingError here."""
  # Building the ModelConfig is not a second validation: its checks are the dataclass's own
  # invariants, which config.validate reached by building it too.
  model_cfg = ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh, devices) if mesh is None else mesh
  remat_lib.check_platform(model_cfg.remat, mesh.devices.flat[0].platform)  # offload: TPU, GPU
  rules = sharding.resolve_rules(config, model_cfg, mesh, warn=log)

  # Abstract model -> logical names -> shardings; nothing is allocated yet.
  spec = lora_lib.spec_from_config(config.lora, model_cfg.mlp)
  abstract_model = nnx.eval_shape(lambda: lora_lib.build(model_cfg, spec, nnx.Rngs(0)))
  graphdef, abs_vars = nnx.split(abstract_model)
  # μP's per-parameter learning rates are for the base's widths; adapters train at optim.lr.
  multipliers = None if spec else param_lib.lr_multiplier_tree(model_cfg, abs_vars)
  multipliers = None if multipliers is None else _trainable(spec, multipliers)
  optimizer = make_optimizer(config.optim, config.train.steps, multipliers)
  param_shardings = nnx.to_pure_dict(sharding.tree_shardings(abs_vars, mesh, rules))
  abs_params = nnx.to_pure_dict(abs_vars)
  abs_opt = jax.eval_shape(optimizer.init, _trainable(spec, abs_params))
  # Optimizer moments are laid out like the params they track; scalars (counts) replicate.
  opt_shardings = _like_params(abs_opt, _trainable(spec, abs_params),
                               _trainable(spec, param_shardings), mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}
  abstract = {"params": abs_params, "opt_state": abs_opt,
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
  if spikes.enabled(config.train):  # skip-step's window, the rollbacks' offset (spikes.py)
    abstract["guard"] = spikes.abstract(config.train)
    state_shardings["guard"] = jax.tree.map(lambda _: replicated, abstract["guard"])
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_shardings)
  return Setup(config, model_cfg, mesh, rules, graphdef, optimizer, abstract, state_shardings,
               sharding.batch_sharding(mesh, rules), multipliers, spec)


def _like_params(abs_opt, abs_params, param_shardings, mesh):
  """Shardings for the optimizer state: any subtree shaped like the params gets theirs."""
  params_def = jax.tree.structure(abs_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def is_params_like(x):
    try:
      return jax.tree.structure(x) == params_def
    except Exception:  # noqa: BLE001
      return False

  return jax.tree.map(lambda x: param_shardings if is_params_like(x) else replicated,
                      abs_opt, is_leaf=is_params_like)


def init_state(setup: Setup, seed: int):
  """The train state created directly in its shardings: no device holds the full params."""
  def init():
    model = lora_lib.build(setup.model_cfg, setup.lora, nnx.Rngs(seed))
    params = param_lib.scale_init(nnx.to_pure_dict(nnx.state(model)), setup.model_cfg.init_scale)
    return spikes.with_guard(setup.config.train, {
        "params": params, "opt_state": setup.optimizer.init(_trainable(setup.lora, params)),
        "step": jnp.zeros((), jnp.int32)})
  with jax.set_mesh(setup.mesh):  # compiled once per seed: a rollback to the start reuses it
    return setup.jitted.setdefault(("init", seed), jax.jit(
        init, out_shardings=setup.state_shardings))()


# ============================================================================ steps


def make_train_step(setup: Setup) -> Callable:
  """(state, batch) -> (state, metrics), jitted with donated state (train_step_fn's step)."""
  step = train_step_fn(setup.config, setup.graphdef, setup.optimizer,
                       make_schedule(setup.config.optim, setup.config.train.steps), setup.lora)
  return jax.jit(step, in_shardings=(setup.state_shardings, setup.batch_sharding),
                 out_shardings=(setup.state_shardings, None), donate_argnums=0)


def train_step_fn(config: ml_collections.ConfigDict, graphdef, optimizer: optax.
                  GradientTransformation, schedule: optax.Schedule,
                  lora: lora_lib.LoraSpec | None = None) -> Callable:
  """The pure (state, batch) -> (state, metrics) of one update, for jit (make_train_step) or
  for vmap over a population's members (llama_jax.population, each with its own optimizer).

  With grad_accum = A the [B, T] batch is split into A microbatches of B/A rows (row r goes to
  microbatch r % A, so each stays evenly split over the batch-sharded devices) and the
  gradients are averaged in fp32 inside the step: one update sees the large batch's gradient.
  """
  accum, z_loss = config.optim.grad_accum, config.optim.z_loss

  def loss_fn(params, batch, rng):  # (loss, (mean cross-entropy, MoE stats))
    return batch_loss_and_stats(nnx.merge(graphdef, params), batch, z_loss, rng)

  # Differentiated: the trainable part only. Under LoRA the frozen base enters as a constant,
  # so the backward pass computes no weight gradient for it, only the adapters' (and the
  # activations' gradients that reach them).
  spec = lora
  grad_fn = jax.value_and_grad(
      lambda trained, params, batch, rng: loss_fn(_with_trained(spec, params, trained), batch,
                                                  rng), has_aux=True)

  def train_step(state, batch):
    params = state["params"]
    trained = _trainable(spec, params)
    rng = dropout_key(config, state["step"])
    if accum == 1:
      (_, (loss, moe_stats)), grads = grad_fn(trained, params, batch, rng)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

      # SFT: microbatches count different numbers of tokens; scaling each one's mean by
      # accum x its share of the batch's tokens makes the average the batch's token mean.
      total = loss_tokens(batch)

      def body(carry, xs):
        (g_sum, l_sum), (mb, i) = carry, xs
        mb = jax.tree.map(lambda x: sharding.constrain(x, ("act_batch", None)), mb)
        (_, (l, moe_stats)), g = grad_fn(trained, params, mb,
                                         None if rng is None else jax.random.fold_in(rng, i))
        if "weights" in mb:
          share = accum * loss_tokens(mb) / jnp.maximum(total, 1.0)
          l, g = l * share, jax.tree.map(lambda x: x * share, g)
        return (jax.tree.map(jnp.add, g_sum, g), l_sum + l), moe_stats

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trained)
      (grads, loss), moe_stats = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)),
                                              (micro, jnp.arange(accum)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
      moe_stats = moe_lib.over_microbatches(moe_stats)
    updates, opt_state = optimizer.update(grads, state["opt_state"], trained)
    updates = spikes.scale_updates(config.train, state, updates)  # rollback_lr_scale
    new_params = _with_trained(spec, params, optax.apply_updates(trained, updates))
    new_params, moe_metrics = moe_lib.after_step(new_params, moe_stats, config.model)
    new_state = {"params": new_params, "opt_state": opt_state,
                 "step": state["step"] + 1}
    stats = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
             "loss_tokens": loss_tokens(batch), **moe_metrics}
    return spikes.guard(config.train, state, new_state, stats)  # skip-step, when on

  return train_step


def dropout_key(config: ml_collections.ConfigDict, step):
  """The dropout masks' key of a step: a pure function of (train.seed, step), so a resumed run
  draws the masks the uninterrupted one drew (microbatch i folds in i); None when
  model.dropout is 0."""
  if not config.model.dropout:
    return None
  return jax.random.fold_in(jax.random.key(config.train.seed), step)


def make_eval_step(setup: Setup) -> Callable:
  graphdef = setup.graphdef

  def eval_step(params, batch):
    return batch_loss(nnx.merge(graphdef, params), batch)[1]

  return jax.jit(eval_step, in_shardings=(setup.state_shardings["params"], setup.batch_sharding))


def evaluate(eval_step, params, eval_loader, n_batches: int):
  """The mean eval loss over n_batches (a float; for a population's vmapped step, one per
  member)."""
  losses = [eval_step(params, eval_loader.batch(i)) for i in range(n_batches)]
  mean = np.mean(np.asarray(jax.device_get(losses)), axis=0)
  return float(mean) if mean.ndim == 0 else mean


def eval_losses(eval_step, params, eval_loader, n_batches: int):
  """(eval_loss, {source: loss}): a mixture evaluates each source, and its eval_loss is their
  unweighted mean, so the curve does not jump where the weights change."""
  per_source = {name: evaluate(eval_step, params, loader, n_batches)
                for name, loader in getattr(eval_loader, "sources", {}).items()}
  if per_source:
    return np.mean(np.stack(list(per_source.values())), axis=0), per_source
  return evaluate(eval_step, params, eval_loader, n_batches), per_source


# ============================================================================ the loop


def itstime(step: int, every: int, total: int) -> bool:
  """Whether something done every `every` steps (log, eval, checkpoint) is due once `step`
  steps of `total` are done: at each multiple of `every`, and at the last step whatever
  `every` is (big_vision's utils.itstime)."""
  return step % every == 0 or step == total


def _check_finite(pending: list[tuple[int, Any]]) -> None:
  """Raises on the first step whose loss is NaN/Inf among those not yet checked."""
  for step, loss in pending:
    value = float(jax.device_get(loss))
    if not math.isfinite(value):
      raise NonFiniteLossError(
          f"loss is {value} at step {step}; stopped before saving it. The last good checkpoint "
          "is kept: lower optim.lr, raise optim.warmup_steps or set optim.clip_norm, then rerun")


def train(config: ml_collections.ConfigDict, workdir: str, *, log=print) -> dict[str, Any]:
  """Trains (resuming from DIR/checkpoints if any); returns a summary dict."""
  is_main = jax.process_index() == 0
  log_all, log = log, log if is_main else (lambda *a, **k: None)  # log_all: on every process
  stop = StopSignal()  # with several processes it listens from here on
  storage.check_writable(workdir, "--workdir")  # a missing bucket fails here, not in Orbax
  ledger = goodput.Ledger.of_workdir(workdir, is_main)  # where the wall time goes (reads it)

  # ---- mesh, shardings (the checks that need the devices, before data or params) --------
  setup = make_setup(config, log=log)
  if config.data.data_dir:
    storage.check_bucket(config.data.data_dir, "data.data_dir")
  config_lib.check_workdir(config, workdir)
  source = init_from.check(config)  # its model against the config's, before data or compiles
  if is_main:
    config_lib.write(config, workdir)
  t_cfg = config.train

  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    # ---- data -------------------------------------------------------------------------
    from llama_jax import data
    with ledger.section("data"):
      tokenizer = run_tokenizer(config, [workdir], source)
      tokenizer, train_loader, eval_loader = data.make_loaders(
          config, setup.batch_sharding, tokenizer=tokenizer, log=log)

    # ---- state: restore or create sharded -----------------------------------------------
    checkpointer = ckpt_lib.Checkpointer(workdir, t_cfg.keep_checkpoints)
    with ledger.section("restore"):
      start_step, state = start_state(setup, checkpointer, source, log=log, log_all=log_all)
    if checkpointer.steps():
      log(f"resumed from step {start_step} in {checkpointer.directory}")

    train_step = make_train_step(setup)
    eval_step = make_eval_step(setup)
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main, config=config)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops = metrics_lib.model_flops(setup.model_cfg, config.data.seq_len, setup.mesh, log)
    if setup.lora is not None:
      log(f"LoRA rank {setup.lora.rank} on {','.join(setup.lora.targets)}: "
          f"{metrics_lib.human(lora_lib.count(state['params']))} adapter params train, the "
          "base is frozen")
    rollbacks = rollback_lib.Rollbacks(setup, checkpointer, workdir, writer, log=log, restore=(
        lambda at: start_state(setup, checkpointer, source, at=at)[1]))

    # ---- loop ---------------------------------------------------------------------------
    def run_eval(done: int, params) -> float:
      with ledger.section("eval"):
        loss, per_source = eval_losses(eval_step, params, eval_loader, t_cfg.eval_steps)
      loss = float(loss)
      writer.write(done, {"eval_loss": loss,
                          **{f"eval_loss/{name}": v for name, v in per_source.items()}})
      log(f"step {done}: eval_loss {loss:.4f}"
          + "".join(f", {name} {v:.4f}" for name, v in per_source.items()))
      return loss

    progress = progress_bar(start_step, t_cfg.steps, is_main)
    throughput = metrics_lib.Throughput(tokens_per_step)
    pending: list[tuple[int, Any]] = []  # (step, loss) not yet checked for NaN / Inf
    last_stats, last_eval, stopped_by, ended = None, None, None, "error"
    step = start_step
    if start_step == 0:  # the starting loss, so every curve shows how far training took it
      last_eval = run_eval(0, state["params"])
    feed = rollback_lib.Feed(train_loader, start_step, rollbacks.offset(state),
                             on_wait=lambda s: ledger.add("data", s))
    writer.write(start_step, ledger.fields(start_step=start_step))
    ledger.start_loop()
    try:
      with stop:
        for step, batch in feed:
          if step >= t_cfg.steps:
            break
          state, stats = train_step(state, batch)
          done = step + 1
          pending.append((done, stats["loss"]))
          throughput.step(stats["loss"])
          progress.update(1)

          at_log, at_eval, at_ckpt = (itstime(done, every, t_cfg.steps) for every in (
              t_cfg.log_every, t_cfg.eval_every, t_cfg.checkpoint_every))
          stopping = stop.should_stop(done, waited=at_log or at_eval or at_ckpt)
          if (at_log or at_eval or at_ckpt or stopping) and not rollbacks.enabled:
            _check_finite(pending)  # nothing saved or logged is NaN (else: the guard's job)
          pending.clear()
          trouble = rollbacks.trouble(done, state) if at_log or at_eval or at_ckpt else None
          if trouble:  # restored from before it, the data moved past it (rollback.py)
            with ledger.section("restore"):
              state = rollbacks.roll_back(trouble, state, ledger.fields())
            feed.seek(int(jax.device_get(state["step"])), rollbacks.offset(state))
            progress.update(int(jax.device_get(state["step"])) - done)
            continue
          if at_log:
            stats = jax.device_get(stats)
            tps = throughput.read()
            last_stats = metrics_lib.step_metrics(stats, tps, done, tokens_per_step, flops)
            last_stats.update(rollbacks.log_fields(state, last_stats))
            writer.write(done, {**last_stats, **ledger.fields()})
            progress.set_postfix(loss=f"{float(stats['loss']):.3f}", tok_s=f"{tps:,.0f}",
                                 loss_tokens=last_stats["loss_tokens"])
          if at_eval:
            last_eval = run_eval(done, state["params"])
            throughput.restart()  # keep eval time out of tokens/s
          if at_ckpt or (stopping and rollbacks.may_save_at_stop(done, state)):
            with ledger.section("checkpoint"):
              checkpointer.save(done, checkpointed(setup, state), config)
            writer.flush()  # a bucket's metrics.jsonl is rewritten: every line so far
          if stopping:
            stopped_by = signal.Signals(stop.received).name
            break
        step = int(jax.device_get(state["step"]))
      ended = "stopped" if stopped_by else "finished"
    except (NonFiniteLossError, rollback_lib.DivergedError):
      ended = "diverged"
      raise
    finally:  # an error (e.g. a NaN) still lets the async saves finish
      ledger.end_loop()
      progress.close()
      with ledger.section("checkpoint"):
        checkpointer.close()
      writer.write(step, ledger.fields(end=ended))
      writer.close()

    sample = None
    if stopped_by is None and step >= t_cfg.steps and t_cfg.sample_tokens > 0:
      sample = _sample(setup, state["params"], tokenizer, t_cfg)
      if sample is not None:
        log("sample:\n" + sample)
  if stopped_by and jax.process_count() > 1:  # every process says where it stopped
    log_all(f"process {jax.process_index()}: stopped by {stopped_by} (to any of the "
            f"{jax.process_count()} processes) at step {step}; checkpoint saved, rerun to resume")
  elif stopped_by:
    log(f"stopped by {stopped_by} at step {step}; checkpoint saved, rerun to resume")
  return {"step": step, "train": last_stats, "eval_loss": last_eval, "sample": sample,
          "stopped_by": stopped_by}


def start_state(setup: Setup, checkpointer, source, *, at: int | None = None, log=print,
                log_all=print) -> tuple[int, Any]:
  """(step, state): the newest readable checkpoint (`at`: that step's, 0 for the start),
  else the run's start: train.init_from's weights or train.seed's init."""
  abstract, steps = checkpointed(setup, setup.abstract_state), checkpointer.steps()
  if steps:  # read with the guard it has (skip-step or rollbacks turned on or off since)
    abstract = spikes.readable(abstract, checkpointer.state_metadata(at or steps[-1]),
                               setup.state_shardings["step"])
  if at is None:
    restored = checkpointer.restore_latest(abstract, log=log_all)
  else:
    restored = (at, checkpointer.restore(at, abstract)) if at else None
  if restored is not None:
    step, state = restored[0], spikes.adapted(setup.config.train, restored[1],
                                              setup.state_shardings)
    if setup.lora is not None:  # the adapters were saved; the base is rebuilt
      base = (init_from.initial_state(source, setup, log=lambda *a: None, init_state=init_state)
              if source else init_state(setup, setup.config.train.seed))["params"]
      state = {**state, "params": _with_trained(setup.lora, base, state["params"])}
    return step, state
  if source is not None:  # a fine-tune's start; once it has checkpoints it resumes above
    return 0, init_from.initial_state(source, setup, log=log, init_state=init_state)
  return 0, init_state(setup, setup.config.train.seed)


def run_tokenizer(config: ml_collections.ConfigDict, workdirs: list[str],
                  source: init_from.Source | None = None):
  """The run's tokenizer, saved in each of `workdirs` (a population's members share one).
  Process 0 makes it (training it on the corpus the first time), or takes a fine-tune's
  source's (init_from.check found it); the others read the saved file, so every process has
  the same one."""
  from llama_jax import data
  is_main = jax.process_index() == 0
  tokenizer = None
  if is_main:
    tokenizer = (source.tokenizer if source is not None and source.tokenizer is not None
                 else data.make_tokenizer(config))
  if is_main:
    for workdir in workdirs:
      tokenizer.save(workdir)
  if jax.process_count() > 1:
    waiting.barrier("the run's tokenizer saved by process 0")
    if not is_main:
      tokenizer = data.tokenizer_from_path(workdirs[0])
  return tokenizer


def checkpointed(setup: Setup, state):
  """What a checkpoint holds of the train state: all of it, or under LoRA the adapters, their
  optimizer state and the step (the base comes from where it was made: train.seed's init,
  which config.json records, and which restore_params rebuilds)."""
  if setup.lora is None:
    return state
  return {**state, "params": lora_lib.adapters_of(state["params"])}


def _sample(setup: Setup, params, tokenizer, t_cfg) -> str | None:
  if jax.process_count() > 1:  # sampling would need every process; use llama_jax.generate
    return None
  from llama_jax.generate.decode import sample_text
  model = nnx.merge(setup.graphdef, params)  # stays sharded on the mesh
  # Decoding keeps the sequence whole (the context axis splits only training's sequence).
  rules = tuple((name, None if name == "act_seq" else target) for name, target in setup.rules)
  with nnx.logical_axis_rules(rules):
    return sample_text(model, tokenizer, t_cfg.sample_prompt,
                       max_new_tokens=t_cfg.sample_tokens, temperature=0.8, top_k=40,
                       seed=t_cfg.seed)


def progress_bar(start: int, total: int, enabled: bool):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
              file=sys.stderr)
