"""Skip-step and the rollback bookkeeping, without training: llama_jax/spikes.py's decision on
hand-made losses and grad norms, llama_jax/rollback.py's trouble, offsets and data feed, and
the config checks of the robustness keys."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import config as config_lib
from llama_jax import rollback, spikes
from llama_jax.errors import UserError
from llama_jax.metrics import read_metrics
from llama_jax.data.loader import SyntheticLoader


def _t_cfg(**kw):
  t = config_lib.defaults().train
  t.update({**dict(spike_sigma=3.0, spike_window=8, max_skips=2, max_rollbacks=1), **kw})
  return t


def _run(t, values):
  """Feeds (loss, grad_norm) pairs through spikes.guard as a train step would; returns the
  skip flags, the params after each step and the final guard. The 'update' adds 1 to the
  param, so the param counts the applied steps."""
  state = {"params": jnp.zeros(()), "opt_state": jnp.zeros(()), "step": jnp.zeros((), jnp.int32),
           "guard": spikes.init(t)}

  @jax.jit
  def step(state, loss, gnorm):
    new = {"params": state["params"] + 1, "opt_state": state["opt_state"] + 1,
           "step": state["step"] + 1}
    return spikes.guard(t, state, new, {"loss": loss, "grad_norm": gnorm})

  skips, params = [], []
  for loss, gnorm in values:
    state, stats = step(state, jnp.float32(loss), jnp.float32(gnorm))
    skips.append(int(stats["skipped"]))
    params.append(float(state["params"]))
  return skips, params, jax.device_get(state)


def test_skip_step_on_loss_grad_norm_and_non_finite_values():
  t = _t_cfg()
  calm = [(3.0 + 0.01 * (i % 3), 1.0 + 0.01 * (i % 2)) for i in range(6)]
  values = calm + [(9.0, 1.0), (3.0, 1.0), (3.0, 50.0), (float("nan"), 1.0), (3.0, 1.0)]
  skips, params, g = _run(t, values)
  assert skips == [0] * 6 + [1, 0, 1, 1, 0]
  # A skipped step leaves the 'params' (and opt_state) as they were; the counter goes on.
  assert params == [1, 2, 3, 4, 5, 6, 6, 7, 7, 7, 8]
  assert int(g["step"]) == 11 and int(g["guard"]["skipped"]) == 3
  assert int(g["guard"]["accepted"]) == 8
  # Only accepted values enter the window: the spikes are not in it.
  assert 9.0 not in g["guard"]["losses"] and 50.0 not in g["guard"]["grad_norms"]
  # Skipped steps are marked at step % window: steps 6, 8 and 9 (0-based).
  assert [int(x) for x in g["guard"]["skips"]] == [1, 1, 0, 0, 0, 0, 1, 0]
  assert int(g["guard"]["first_bad"]) == 0  # skip-step on: the NaN was skipped, not applied


def test_no_judging_before_half_the_window_and_none_when_off():
  # Fewer than half the window (8 / 2) accepted: nothing is judged, however large.
  skips, _, _ = _run(_t_cfg(), [(1.0, 1.0), (1.0, 1.0), (100.0, 1.0)])
  assert skips == [0, 0, 0]
  skips, _, _ = _run(_t_cfg(), [(1.0, 1.0)] * 4 + [(100.0, 1.0)])
  assert skips == [0, 0, 0, 0, 1]
  # Rollbacks without skip-step: nothing is skipped; a NaN that was applied is remembered.
  skips, params, g = _run(_t_cfg(spike_sigma=0.0), [(1.0, 1.0), (float("inf"), 1.0), (1.0, 1.0)])
  assert skips == [0, 0, 0] and params == [1, 2, 3]
  assert int(g["guard"]["first_bad"]) == 2


def test_lr_scale_after_rollbacks():
  t = _t_cfg(rollback_lr_scale=0.5)
  state = {"guard": {**spikes.init(t), "rollbacks": jnp.int32(2)}}
  out = spikes.scale_updates(t, state, {"w": jnp.full((2,), 8.0)})
  np.testing.assert_array_equal(out["w"], [2.0, 2.0])
  # No scaling asked for: the very same updates (bitwise: nothing multiplies them).
  same = {"w": jnp.full((2,), 8.0)}
  assert spikes.scale_updates(_t_cfg(), state, same) is same


def test_find_trouble_counts_the_window_and_names_the_steps():
  t = _t_cfg()
  skips = np.zeros(8, np.int32)
  g = {"first_bad": 0, "skips": skips}
  assert rollback.find_trouble(t, g, 10) is None
  skips[[11 % 8, 12 % 8]] = 1  # steps 11, 12 (0-based) skipped: 2 <= max_skips
  assert rollback.find_trouble(t, g, 14) is None
  skips[13 % 8] = 1
  trouble = rollback.find_trouble(t, g, 14)
  assert (trouble.found, trouble.first) == (14, 12)
  assert "3 of the last 8 steps" in trouble.cause and "steps 12-14" in trouble.cause
  # 8 steps later those skips have left the window.
  assert rollback.find_trouble(t, {"first_bad": 0, "skips": np.zeros(8, np.int32)}, 22) is None
  nan = rollback.find_trouble(_t_cfg(spike_sigma=0.0), {"first_bad": 5, "skips": skips}, 6)
  assert (nan.first, nan.found) == (5, 6) and "not finite at step 5" in nan.cause


def test_rolled_guard_moves_the_data_past_what_was_read():
  g = {"offset": 3, "rollbacks": 1, "skipped": 7}
  # Trouble found after 30 steps (data position 33), restored to step 20: step 20 now reads
  # position 33, the batch step 30 would have read next.
  assert rollback.rolled_guard(g, 30, 20) == {"offset": 13, "rollbacks": 2, "skipped": 7}


def test_feed_seeks_to_a_new_position():
  loader = SyntheticLoader(vocab_size=50, seed=0, seq_len=4, batch_size=2)
  waits = []
  feed = rollback.Feed(loader, 3, offset=2, on_wait=waits.append)
  seen = []
  for step, batch in feed:
    seen.append(step)
    np.testing.assert_array_equal(batch["inputs"], loader.batch(step + feed.offset)["inputs"])
    if step == 5 and feed.offset == 2:
      feed.seek(1, 10)  # a rollback: back to step 1, reading position 11
    if len(seen) == 6:
      break
  assert seen == [3, 4, 5, 1, 2, 3]
  assert len(waits) == 6 and all(w >= 0 for w in waits)


@pytest.mark.parametrize("change, message", [
    ({"spike_sigma": -1.0}, "train.spike_sigma=-1.0 must be >= 0"),
    ({"max_rollbacks": -1}, "train.max_rollbacks=-1 must be >= 0"),
    ({"rollback_lr_scale": 0.0}, "train.rollback_lr_scale=0.0 must be in (0, 1]"),
    ({"spike_sigma": 6.0, "spike_window": 1}, "train.spike_window=1 must be >= 2"),
    ({"spike_sigma": 6.0, "max_rollbacks": 2, "spike_window": 128, "checkpoint_every": 10,
      "keep_checkpoints": 3}, "keep at least 15"),
])
def test_config_checks(change, message):
  c = config_lib.defaults()
  c.train.update(change)
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(c)


def test_the_defaults_with_skip_step_and_rollbacks_on_are_valid():
  c = config_lib.defaults()
  c.train.update(spike_sigma=6.0, max_rollbacks=2)
  config_lib.validate(c)


def test_a_checkpoint_gets_the_guard_the_config_asks_for():
  t_on, t_off = _t_cfg(), _t_cfg(spike_sigma=0.0, max_rollbacks=0)
  rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = {"guard": jax.tree.map(lambda _: rep, spikes.init(t_on))}
  plain = {"step": jnp.int32(5)}
  on = spikes.adapted(t_on, plain, shardings)  # turned on: a fresh guard
  assert int(on["guard"]["accepted"]) == 0 and on["guard"]["losses"].shape == (8,)
  assert spikes.adapted(t_on, on, shardings) is on  # unchanged: the very same state
  moved = {**on, "guard": {**on["guard"], "offset": jnp.int32(4), "accepted": jnp.int32(7)}}
  wider = spikes.adapted(_t_cfg(spike_window=16), moved, shardings | {"guard": jax.tree.map(
      lambda _: rep, spikes.init(_t_cfg(spike_window=16)))})
  assert wider["guard"]["losses"].shape == (16,) and int(wider["guard"]["accepted"]) == 0
  assert int(wider["guard"]["offset"]) == 4  # a new window keeps where the data is
  assert "guard" not in spikes.adapted(t_off, on, shardings)  # turned off, offset 0: dropped
  with pytest.raises(UserError, match="data moved on by 4 steps by a rollback"):
    spikes.adapted(t_off, moved, shardings)


def test_a_checkpoint_saved_without_the_guard_is_read_and_given_one(tmp_path):
  """Skip-step turned on for a run whose checkpoints have no guard: the state is read as it
  was saved (not taken for unreadable and moved aside) and gets a fresh guard."""
  from llama_jax import checkpoint
  rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  t = _t_cfg()
  saved = {"params": {"w": jnp.arange(6.0)}, "step": jnp.int32(3)}
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(3, saved, config_lib.defaults())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          spikes.with_guard(t, saved))
  assert "guard" in abstract
  readable = spikes.readable(abstract, ckpt.state_metadata(3), rep)
  assert "guard" not in readable
  state = spikes.adapted(t, ckpt.restore(3, readable), {"guard": jax.tree.map(
      lambda _: rep, spikes.init(t))})
  ckpt.close()
  np.testing.assert_array_equal(state["params"]["w"], np.arange(6.0))
  assert int(state["step"]) == 3 and int(state["guard"]["offset"]) == 0
  # Saved with the guard: read with the guard's own shapes (a window of 8 here).
  ckpt = checkpoint.Checkpointer(str(tmp_path / "b"), async_save=False)
  ckpt.save(3, state, config_lib.defaults())
  again = spikes.readable({k: v for k, v in abstract.items() if k != "guard"},
                          ckpt.state_metadata(3), rep)
  assert again["guard"]["losses"].shape == (8,)
  ckpt.close()
