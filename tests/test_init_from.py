"""train.init_from: a fine-tune starts from a workdir's or a Hugging Face directory's params,
with a fresh optimizer, and a model mismatch is one line before anything is compiled."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from llama_jax import checkpoint, hf, init_from, train
from llama_jax import config as config_lib
from llama_jax.config import ConfigError
from llama_jax.data import make_loaders
from llama_jax.loss import batch_loss
from llama_jax.model.config import ModelConfig
from llama_jax.model.llama import Llama
from tests.test_sft import SEQ, sft_config, write_chat
from tests.test_train import tiny_config

# The source run and the fine-tune are SFT runs on tests/test_sft.py's records (byte tokens,
# packed, grad_accum 2): they also check a masked run end to end.
RUN = {"train.checkpoint_every": 2, "train.eval_every": 2, "train.eval_steps": 1,
       "optim.grad_accum": 2, "data.batch_size": 16}


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
  root = tmp_path_factory.mktemp("chat")
  return root / "data", write_chat(root)


def run_config(chat, **kw):
  return sft_config(*chat, **{**RUN, **kw})


@pytest.fixture(scope="module")
def source(chat, tmp_path_factory):
  """A tiny 2-step SFT run: the workdir a fine-tune starts from."""
  workdir = tmp_path_factory.mktemp("source")
  lines = []
  train.train(run_config(chat), str(workdir), log=lines.append)
  # The run logs the dropped long prompts and counts only the completions.
  assert any(line.startswith("data: text_files train: skipped") for line in lines)
  metrics = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [m for m in metrics if "loss" in m]
  assert len(steps) == 2 and all(0 < m["loss_tokens"] < 16 * SEQ for m in steps)
  return str(workdir)


def _first_batch_loss(model, config) -> float:
  """The model's (masked) loss on batch 0 of config's data, on one device."""
  _, loader, _ = make_loaders(config)
  batch = loader.batch(0)
  assert "weights" in batch
  return float(batch_loss(model, batch)[1])


def _fine_tune(tmp_path, chat, spec: str):
  lines = []
  config = run_config(chat, **{"train.steps": 1, "train.checkpoint_every": 1,
                               "train.eval_every": 1, "train.init_from": spec})
  config_lib.validate(config)
  summary = train.train(config, str(tmp_path), log=lines.append)
  return config, summary, lines


def _assert_fresh(state, want_params) -> None:
  """Params bitwise those of the source, in the run's shardings; the optimizer at step 0."""
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state["params"], want_params)
  assert int(state["step"]) == 0
  counts = [int(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) == 0]
  assert counts and all(c == 0 for c in counts)
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
  assert moments and all(not np.asarray(m).any() for m in moments)


@pytest.mark.slow
def test_init_from_workdir_fresh_optimizer_and_resume(chat, source, tmp_path):
  config = run_config(chat, **{"train.init_from": f"{source}@2"})
  setup = train.make_setup(config)
  state = init_from.initial_state(init_from.check(config), setup, log=lambda *a: None)
  src_model, _, step = checkpoint.restore_params(source, 2)
  assert step == 2
  _assert_fresh(state, nnx.to_pure_dict(nnx.state(src_model)))
  # Control: the source's own optimizer state after 2 steps is not fresh.
  src_ckpt = checkpoint.Checkpointer(source, read_only=True)
  try:
    full = src_ckpt.restore(2, setup.abstract_state)
  finally:
    src_ckpt.close()
  assert any(np.asarray(m).any() for m in jax.tree.leaves(full["opt_state"]) if np.ndim(m) > 0)

  # The fine-tune's first logged loss is the source model's loss on that batch (masked, and
  # exact over the two microbatches of grad_accum).
  ft_config, summary, lines = _fine_tune(tmp_path, chat, source)
  assert any(line.startswith(f"init_from: params of workdir {source} step 2") for line in lines)
  assert summary["train"]["loss"] == pytest.approx(_first_batch_loss(src_model, ft_config),
                                                   rel=1e-5)
  # Control: the run's own init (train.seed) would have started elsewhere.
  fresh = Llama(ModelConfig.from_dict(ft_config.model), rngs=nnx.Rngs(ft_config.train.seed))
  assert abs(_first_batch_loss(fresh, ft_config) - summary["train"]["loss"]) > 1e-3
  # Rerun: it resumes its own checkpoint (step 1), not init_from's weights.
  _, summary, lines = _fine_tune(tmp_path, chat, source)
  assert summary["step"] == 1
  assert any(line.startswith("resumed from step 1") for line in lines)
  assert not any(line.startswith("init_from:") for line in lines)


def test_init_from_hf(tmp_path):
  config = tiny_config(**{"train.init_from": f"hf:{tmp_path}"})
  model_cfg = ModelConfig.from_dict(config.model)
  model = Llama(model_cfg, rngs=nnx.Rngs(7))
  hf.save_hf(model, model_cfg, str(tmp_path))
  lines = []
  state = init_from.initial_state(init_from.check(config), train.make_setup(config),
                                  log=lines.append)
  assert lines == [f"init_from: params of hf {tmp_path}; optimizer state fresh, step 0"]
  _assert_fresh(state, nnx.to_pure_dict(nnx.state(model)))


def test_init_from_mismatch_and_syntax(chat, source, tmp_path):
  config = run_config(chat, **{"train.init_from": source, "model.ffn_dim": 96})
  with pytest.raises(ConfigError) as e:
    init_from.check(config)
  assert str(e.value) == (f"train.init_from: model.ffn_dim is 96 in the config but 88 in "
                          f"{source}/config.json: set --config.model.ffn_dim=88")
  config = run_config(chat, **{"train.init_from": source, "model.tie_embeddings": True})
  with pytest.raises(ConfigError, match="model.tie_embeddings is true in the config but false"):
    train.train(config, str(tmp_path / "run"), log=lambda *a: None)
  assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the state was made
  with pytest.raises(ConfigError, match="the step after '@' must be an integer"):
    init_from.check(tiny_config(**{"train.init_from": f"{source}@last"}))
  with pytest.raises(ConfigError, match="is not a llama_jax workdir"):
    init_from.check(tiny_config(**{"train.init_from": str(tmp_path / "nothing")}))
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint of step 5"):
    init_from.load_params(init_from.parse(f"{source}@5"), train.make_setup(run_config(chat)))


@pytest.mark.slow
def test_fine_tune_reads_the_source_tokenizer(chat, tmp_path):
  """With data.tokenizer left at 'spm', a fine-tune from hf:DIR takes DIR's tokenizer.model
  (not one trained on the fine-tuning data, which would read the embeddings through other
  ids), saves it in its workdir, and evaluate reads it there once the source is gone; a
  data.tokenizer naming another one is refused in one line before anything is built."""
  from llama_jax import evaluate
  from tests.test_lm_eval import _spm
  hf_dir, workdir = tmp_path / "hf", tmp_path / "run"
  hf_dir.mkdir()
  tok = _spm(hf_dir / "tokenizer.model")  # trained on other text than the chat records
  config = run_config(chat, **{"data.tokenizer": "spm", "data.data_dir": str(tmp_path / "data"),
                               "model.vocab_size": tok.vocab_size, "train.steps": 1,
                               "train.eval_every": 1, "train.checkpoint_every": 1,
                               "train.init_from": f"hf:{hf_dir}"})
  model_cfg = ModelConfig.from_dict(config.model)
  hf.save_hf(Llama(model_cfg, rngs=nnx.Rngs(3)), model_cfg, str(hf_dir))
  config_lib.validate(config)

  byte = run_config(chat, **{k: config[k.split(".")[0]][k.split(".")[1]] for k in (
      "data.data_dir", "model.vocab_size", "train.init_from")})  # data.tokenizer='byte'
  with pytest.raises(ConfigError) as e:
    train.train(byte, str(tmp_path / "refused"), log=lambda *a: None)
  assert str(e.value) == (
      f"train.init_from: data.tokenizer='byte' (ByteTokenizer byte, 259 ids) is not the "
      f"tokenizer hf:{hf_dir} was trained with (SpmTokenizer {tok.key}, {tok.vocab_size} ids), "
      "so its ids would read other embeddings; leave data.tokenizer at 'spm' to fine-tune "
      "with the source's")
  assert not (tmp_path / "refused" / "config.json").exists()  # refused before the run began
  assert not (tmp_path / "data").exists()

  summary = train.train(config, str(workdir), log=lambda *a: None)
  assert (workdir / "tokenizer.model").read_bytes() == (hf_dir / "tokenizer.model").read_bytes()
  assert not (tmp_path / "data" / "llama_jax" / "tokenizers").exists()  # none was trained
  import shutil
  shutil.rmtree(hf_dir)
  result = evaluate.evaluate_workdir(str(workdir), max_batches=int(config.train.eval_steps))
  assert result["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
  assert not (tmp_path / "data" / "llama_jax" / "tokenizers").exists()
