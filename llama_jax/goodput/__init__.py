"""Goodput: where a run's wall time goes, attempt by attempt.

Every run accounts for its wall time (llama_jax.goodput.ledger, kept by llama_jax.train): the
steps, compilation, restoring the state, checkpoint waits, data waits and evaluation, written to
metrics.jsonl as cumulative `goodput/...` fields on each log line, at each rollback and at the
end of each attempt. llama_jax.goodput.report splits the steps' time into productive work and
work lost (steps redone after a preemption or a rollback) and sums the attempts:

    python -m llama_jax.goodput WORKDIR          # a run: one row per attempt and the total
    python -m llama_jax.goodput SWEEP_DIR        # a sweep: one row per run

with a stacked-bar PNG (WORKDIR/goodput.png, or --png). Google's ml-goodput-measurement is not
used: it records to Cloud Logging (a GCP project and credentials, unreachable from a laptop or
a cluster without them) and reads the records back from there, its recorder and calculator
have no file backend but a test mock, and it knows preemptions but not rollbacks; the
categories here follow its badput breakdown (program startup, checkpoint save and restore,
data loading, wasted progress, custom badput for evaluation).
"""
