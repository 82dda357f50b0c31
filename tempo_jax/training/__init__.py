"""Training: set-up from the config, the one step factory, the optimizer, checkpoints,
metrics logging, the loop both stages share, the SFT and PIR-GRPO stages, evaluation during
training, the Hugging Face export and the report. `python -m tempo_jax.train` runs
`trainer.run`; the planner, the benchmarks and the scale tests take their steps from
`steps.make_steps`.

    setup.py          config -> model, mesh, tokenizer, settings
    optimizer.py      AdamW, fp32 moments
    steps.py          the jitted steps (the only place they are jitted)
    checkpoints.py    Orbax manager, metadata, restores, the reference model, reading a workdir
    metrics_logger.py metrics.jsonl and TensorBoard (process 0)
    loop.py           progress, logging and checkpoint cadence, skips, preemption
    data.py           records, PIR / contrast pairs, answer targets
    sft.py, grpo.py   the two stages
    evaluation.py     held-out evaluation (every process, through the global sampler)
    hf_export.py      the one Hugging Face export path
    report.py         baseline, curves, timeline
    trainer.py        the Trainer and `run`
"""
