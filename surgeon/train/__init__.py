"""Continued pretraining (DESIGN §7): `surgeon train`.

    recipe.py      the YAML recipe: batch, steps, learning rates, schedule, held-out split, objectives
    data.py        token windows streamed from the corpus, held-out split, seeded order, rank shards
    objectives.py  the loss: LM, self-distillation, outlier pressure, QAT, GLU α schedule
    measure.py     what training exists to change, on the held-out windows (residual max |h|, sinks, max/RMS)
    engine.py      DeepSpeed: process group, config, AdamW groups (new vs pretrained), warmup + cosine
    loop.py        steps, measurement, checkpoints, exact resume, metrics.jsonl, run.json
    curves.py      PNG curves from metrics.jsonl
    rundir.py      the run directory's file names and metrics reader (export and the pipeline read runs too)
"""
