"""`python -m llama_jax.lm_eval`: lm_eval.simple_evaluate on a llama_jax run or an HF Llama
directory; prints each task's metrics as one JSON line and writes the whole result (samples
included) to --output_path when given.

    python -m llama_jax.lm_eval --workdir=runs/x --tasks=my_task --include_path=tasks/
        [--limit=N] [--num_fewshot=K] [--batch_size=8] [--step=S] [--output_path=out.json]
        [--apply_chat_template]

Guide: docs/fine_tuning.md (Evaluation with lm-evaluation-harness).
"""

from __future__ import annotations

import json

from llama_jax import errors


def evaluate(lm, tasks: list[str], *, include_path: str | None = None,
             include_defaults: bool = True, limit=None, num_fewshot: int | None = None,
             log_samples: bool = False, apply_chat_template: bool = False) -> dict:
  """lm_eval.simple_evaluate with `lm` (an adapter.LlamaJaxLM); an unknown task name is a
  UserError naming it. apply_chat_template: prompts in the model's SFT template (adapter.py).
  Built-in tasks are indexed only when include_path is not given or a
  task is not found there (indexing lm_eval's thousands of YAML files takes seconds)."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
  missing = [t for t in tasks if t not in manager.all_tasks]
  if missing and include_path is not None and include_defaults:
    manager = TaskManager(include_path=include_path, include_defaults=True)
    missing = [t for t in tasks if t not in manager.all_tasks]
  if missing:
    raise errors.UserError(f"unknown lm_eval task(s) {missing}: give tasks defined in "
                           "--include_path's YAML files or lm_eval's own (lm_eval ls tasks)")
  return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                 num_fewshot=num_fewshot, log_samples=log_samples,
                                 apply_chat_template=apply_chat_template, bootstrap_iters=0)


def main(argv):
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
  f = flags.FLAGS
  from llama_jax.lm_eval.adapter import LlamaJaxLM
  workdir = f.workdir if f.step is None else f"{f.workdir}@{f.step}"
  lm = LlamaJaxLM(workdir=workdir, hf_dir=f.hf_dir, batch_size=f.batch_size, dtype=f.dtype)
  limit = None if f.limit is None else (int(f.limit) if f.limit >= 1 else f.limit)
  results = evaluate(lm, [t for t in f.tasks.split(",") if t], include_path=f.include_path,
                     limit=limit, num_fewshot=f.num_fewshot,
                     log_samples=bool(f.output_path),
                     apply_chat_template=f.apply_chat_template)
  for task, metrics in results["results"].items():
    print(json.dumps({"task": task, **{k: v for k, v in metrics.items()
                                       if isinstance(v, (int, float, str))}}))
  if f.output_path:
    from llama_jax import storage
    from lm_eval.utils import handle_non_serializable
    storage.write_text(f.output_path, json.dumps(results, indent=2,
                                                 default=handle_non_serializable))


def _define_flags():
  from absl import flags
  flags.DEFINE_string("workdir", None, "A llama_jax run directory (DIR or DIR@STEP; hf:DIR "
                      "is --hf_dir=DIR).")
  flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step (default newest).")
  flags.DEFINE_string("hf_dir", None, "A Hugging Face Llama directory.")
  flags.DEFINE_string("dtype", None, "With --hf_dir: compute and parameter dtype.")
  flags.DEFINE_string("tasks", None, "Comma-separated lm_eval task names.", required=True)
  flags.DEFINE_string("include_path", None, "A directory of task YAML files.")
  flags.DEFINE_float("limit", None, "At most this many documents per task (< 1: a fraction).")
  flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: the task's).")
  flags.DEFINE_integer("batch_size", 8, "Rows per jitted scoring call.", lower_bound=1)
  flags.DEFINE_bool("apply_chat_template", False, "Prompts in the model's chat (SFT) "
                    "template, tokenized as in fine-tuning.")
  flags.DEFINE_string("output_path", None, "Write the full results JSON (with samples) here.")


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
