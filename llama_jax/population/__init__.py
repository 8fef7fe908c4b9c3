"""Population training: K runs of one model shape that differ only in their seed and per-run
hyperparameters train as one jitted program, with a leading `runs` axis on the parameters and
the optimizer state (jax.vmap over the members' train steps).

Which runs may share a program (llama_jax.population.members): every config value must be the
same except those in VARYING: optim.lr, optim.weight_decay, optim.warmup_steps (traced inside
the step, so one compile serves every value), train.seed and model.init_scale (applied when
the members are initialised, together, under vmap). The data config is shared, so the members
see the same batches, each step's batch loaded once.

Each member writes its own workdir exactly as a run trained alone would: config.json (its own
config), metrics.jsonl, TensorBoard events, the tokenizer and Orbax checkpoints of its own,
unstacked train state, so `python -m llama_jax.sweep --collect`, results.csv, the scaling
tools, evaluate and generate read it unchanged, and the member can be resumed alone (`python
-m llama_jax --workdir=MEMBER`) or in the population again (every member at the same step).

A member whose loss turns NaN / Inf (a learning-rate sweep's largest lrs) stops being logged
and saved at that step, as a run alone would stop; the others train on, and the program ends
with the same one-line error naming it (exit status 2).

The mesh: `runs_devices` = R splits the devices into R groups along a leading `runs` mesh axis
(vmap's spmd_axis_name), K/R members on each group, each member sharded over its group as
config.mesh says. R = 1 (the default) gives every member the whole mesh; R = K puts one member
on each group of devices, which is K runs sharing a slice.

    python -m llama_jax.sweep experiments/X.py --workdir DIR --population [--population_size K]
        [--population_devices R]

runs the sweep's same-shape runs as populations (llama_jax.sweep.local); `python -m
llama_jax.population SPEC.json` is the program it starts (SPEC: {"members": [{"name", "workdir",
"config"}], "runs_devices": R}). Modules: members (grouping, the checks), loop (the training
loop), __main__ (the program).
"""
