"""Training stage: one (variant, iteration) slice of ``training_sets`` → selected checkpoint → MLflow model version.

The stage decides what the job starts from (`start_ref`), reads its slice, tokenizes it the way
inference does, builds the fixed validation sample that selects the checkpoint, and runs
`restpg.training.trainer.fit` for exactly `train.steps` steps — resuming from the job's latest
resume state if an earlier attempt was killed. It logs into the caller's active MLflow run and
registers the selected checkpoint, tagged with its lineage.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import torch

from restpg import catalog, generation, models, registry, variants
from restpg.config import Settings
from restpg.training import checkpoints, selection, trainer
from restpg.training.data import featurize


def start_ref(settings: Settings, variant: str, iteration: int) -> str:
    """The checkpoint a job starts from: the base policy for SFT (iteration 0) and, as in the paper,
    for every M-step (train.restart_from = base: a fresh base each iteration); with
    restart_from = previous, θᵗ — the policy that sampled iteration t."""
    if iteration == 0 or settings.train.restart_from == "base":
        return settings.models.policy
    return registry.sampling_policy(settings, variant, iteration)


def read_rows(spark, settings: Settings, variant: str, iteration: int) -> tuple[int, Iterator[tuple[str, str, float]]]:
    """(Delta version read, (prompt, completion, weight) of the slice's rows with weight > 0, in a
    fixed order). Rows of weight 0 are left out: they would cost compute and change nothing. The rows
    stream to the driver one partition at a time (`toLocalIterator`), so the caller can tokenize them
    as they arrive instead of holding the whole slice's text at once."""
    from pyspark.sql import functions as F

    version = catalog.version(spark, settings, "training_sets")
    rows = (catalog.read_slice(spark, settings, "training_sets", {"variant": variant, "iteration": iteration}, version=version)
            .where(F.col("weight") > 0).orderBy("example_id", "sample_index")
            .select("prompt", "completion", "weight"))
    if rows.limit(1).count() == 0:
        raise ValueError(f"training_sets has no rows with weight > 0 for variant={variant!r} iteration={iteration} "
                         f"(table version {version}); run the stage that builds this slice first")
    return version, ((r.prompt, r.completion, r.weight) for r in rows.toLocalIterator())


def _check_active_run(run_id: str) -> None:
    import mlflow

    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        raise ValueError(f"train.run logs into the caller's active MLflow run, and run_id={run_id!r} is not it "
                         f"(active: {active.info.run_id if active else None})")


def run(spark, settings: Settings, *, variant: str, iteration: int = 0, run_id: str, init_ref: str | None = None,
        register: bool = True, score: selection.Score | None = None) -> dict:
    """Train on the (variant, iteration) slice from `start_ref` (or `init_ref`), keep the checkpoint
    whose outputs earn the best selection reward, and register it (`register`). `score` replaces
    `restpg.rewards.score` (same signature) as the selection reward."""
    import mlflow

    variants.get(variant)
    _check_active_run(run_id)
    cfg = settings.train
    version, rows = read_rows(spark, settings, variant, iteration)  # an empty slice fails before any start lookup
    init_ref = models.resolve_ref(init_ref or start_ref(settings, variant, iteration), settings)
    tokenizer = models.load_tokenizer(init_ref, settings)
    cap = generation.output_cap(settings, variant)
    data = featurize(tokenizer, rows, max_prompt_tokens=settings.prompt.max_input_tokens, max_completion_tokens=cap)
    if not data.features:
        raise ValueError(f"all {data.dropped_too_long} rows of training_sets variant={variant!r} iteration={iteration} have "
                         f"completions longer than the output budget of {cap} tokens (longest {data.longest_dropped}); "
                         "raise prompt.max_response_tokens / prompt.max_reasoning_tokens or rebuild the slice")
    sample = selection.selection_sample(spark, settings, variant)
    selector = selection.Selector(sample, tokenizer, settings, variant, score) if sample.example_ids else None
    job = checkpoints.job_dir(settings, variant=variant, iteration=iteration, training_set_version=version,
                              init_ref=init_ref)
    lineage = {"variant": variant, "iteration": iteration, "init_ref": init_ref, "training_set_version": version,
               "run_id": run_id}
    # the stage's own arguments (init_ref as asked, often None) are params of this run already: the
    # checkpoint it resolved to is logged as start_ref, since MLflow never lets a param change value
    params = {k: v for k, v in lineage.items() if k != "init_ref"}
    mlflow.log_params({**params, "start_ref": init_ref, "train_rows": len(data.features), "dropped_too_long": data.dropped_too_long,
                       "prompts_over_budget": data.prompts_over_budget,
                       "selection_examples": len(sample.example_ids), "checkpoint_job": job.name,
                       **{f"train.{k}": v for k, v in dataclasses.asdict(cfg).items()}}, run_id=run_id)

    store = checkpoints.ResumeStore(job / "resume") if cfg.checkpoint_every > 0 else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start_dir = models.checkpoint_dir(init_ref, settings)
    if cfg.num_workers > 1:
        from restpg.training import distributed

        model, fit, metrics = distributed.fit(start_dir, data.features, cfg, num_workers=cfg.num_workers, pad_id=pad_id,
                                              select=selector, store_root=store and store.root, out_dir=job / "distributed",
                                              local_mode=spark.sparkContext.master.startswith("local"))
        for values, step in metrics:
            mlflow.log_metrics(values, step=step, run_id=run_id)
    else:
        torch.manual_seed(cfg.seed)
        model = checkpoints.load_for_training(start_dir, cfg)
        fit = trainer.fit(model, data.features, cfg, pad_id=pad_id, select=selector, store=store,
                          log_metrics=lambda metrics, step: mlflow.log_metrics(metrics, step=step, run_id=run_id))

    summary = {**lineage, "steps": fit.steps, "best_step": fit.best_step, "first_loss": fit.first_loss,
               "final_loss": fit.final_loss, "initial_reward": fit.initial_reward, "best_reward": fit.best_reward,
               "selection_curve": fit.curve, "selection_examples": len(sample.example_ids),
               "tokens_per_s": fit.tokens_per_s, "device": fit.device, "workers": fit.workers,
               "compilations": fit.compilations,
               "train_rows": len(data.features), "dropped_too_long": data.dropped_too_long,
               "epochs": round(fit.epochs, 4), "resumed_from": fit.resumed_from}
    out = checkpoints.save_model(model, tokenizer, job / "model",
                                 {**summary, "train_config": dataclasses.asdict(cfg), "reward": settings.judge.reward})
    final = {"best_step": fit.best_step, "train_tokens_per_s": fit.tokens_per_s, "xla_compilations": fit.compilations,
             "epochs": fit.epochs, "dropped_too_long": data.dropped_too_long}
    if not math.isnan(fit.best_reward):
        final.update(best_selection_reward=fit.best_reward, initial_selection_reward=fit.initial_reward)
    mlflow.log_metrics(final, run_id=run_id)
    model_uri = model_version = None
    if register:
        model_uri, model_version = registry.register_checkpoint(settings, out, {
            **lineage, "selection_reward": f"{fit.best_reward:.6f}", "best_step": fit.best_step})
    if store is not None:
        store.clear()  # the job is done: its selected checkpoint is saved (and registered)
    return {**summary, "model_uri": model_uri, "version": model_version, "checkpoint_dir": str(out)}
