"""E-step (Algorithm 1, line 5): θᵗ samples m outputs per training input → `trajectories`.

Committed in chunks with an insert-only MERGE on (variant, iteration, example_id, sample_index): a
run that dies keeps every finished chunk, and the rerun samples only what is missing.
"""
from __future__ import annotations

import time

from restpg import catalog, prompts
from restpg.config import Settings
from restpg.policy_inputs import policy_prompts
from restpg.tracking import progress, say


def train_inputs(spark, settings: Settings):
    from pyspark.sql import functions as F

    examples = catalog.read(spark, settings, "examples").where(F.col("split") == "train")
    if settings.data.max_examples:
        examples = examples.orderBy("example_id").limit(settings.data.max_examples)
    return examples


def _with_parts(df, variant: str):
    """Adds reasoning / response / has_separator from the raw text (reasoning variants only split)."""
    from pyspark.sql import functions as F

    if not prompts.uses_reasoning(variant):
        return (df.withColumn("reasoning", F.lit(None).cast("string")).withColumn("response", F.trim("text"))
                .withColumn("has_separator", F.lit(False)))
    split = F.udf(lambda t: prompts.split_reasoning(t or ""), "struct<reasoning:string,response:string,found:boolean>")
    return (df.withColumn("_p", split("text")).withColumn("reasoning", F.col("_p.reasoning"))
            .withColumn("response", F.col("_p.response")).withColumn("has_separator", F.col("_p.found")).drop("_p"))


def missing_examples(spark, settings: Settings, variant: str, iteration: int, example_ids: list[str], m: int) -> list[str]:
    """Example ids of the slice that do not have all m samples yet."""
    from pyspark.sql import functions as F

    done = (catalog.read(spark, settings, "trajectories")
            .where((F.col("variant") == variant) & (F.col("iteration") == iteration) & (F.col("sample_index") < m))
            .groupBy("example_id").count().where(F.col("count") >= m).select("example_id").collect())
    done = {r.example_id for r in done}
    return [e for e in example_ids if e not in done]


def run(spark, settings: Settings, variant: str, iteration: int, *, policy: str | None = None,
        run_id: str = "manual", force: bool = False) -> dict:
    from pyspark.sql import functions as F

    from restpg import generation, registry

    cfg = settings.sample
    policy = policy or registry.sampling_policy(settings, variant, iteration)
    slice_ = {"variant": variant, "iteration": iteration}
    if force:
        empty = spark.createDataFrame([], catalog.spec("trajectories").struct())
        catalog.replace_slice(spark, settings, empty, "trajectories", slice_, run_id)
    examples = train_inputs(spark, settings)
    inputs = policy_prompts(spark, settings, examples, variant).join(examples.select("example_id", "task"), "example_id").cache()
    all_ids = sorted(r.example_id for r in inputs.select("example_id").collect())
    todo = missing_examples(spark, settings, variant, iteration, all_ids, cfg.m)
    say(f"sample {variant} t={iteration}: {len(all_ids)} inputs x m={cfg.m}, {len(all_ids) - len(todo)} already done, policy {policy}")
    started, version = time.time(), None
    for start in range(0, len(todo), cfg.chunk_examples):
        chunk = todo[start:start + cfg.chunk_examples]
        part = inputs.where(F.col("example_id").isin(chunk))
        samples = generation.generate_df(
            part.select("example_id", "prompt"), policy, settings, m=cfg.m, temperature=cfg.temperature, top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens, iteration=iteration, seed=cfg.seed)
        rows = (_with_parts(samples.join(part.select("example_id", "task", "template_version", "prompt_truncated").withColumnRenamed("prompt_truncated", "fit_truncated"), "example_id"), variant)
                .select(F.lit(variant).alias("variant"), F.lit(iteration).alias("iteration"), "example_id", "task",
                        "sample_index", "seed", F.lit(policy).alias("policy_version"), F.col("text").alias("raw_text"),
                        "reasoning", "response", "has_separator", "n_tokens", "finished", "template_version",
                        F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at")))
        version = catalog.merge_insert(spark, settings, rows, "trajectories", run_id)
        progress(f"sample {variant} t={iteration}", min(start + cfg.chunk_examples, len(todo)), len(todo), started)
    inputs.unpersist()
    in_slice = (F.col("variant") == variant) & (F.col("iteration") == iteration)
    stats = (catalog.read(spark, settings, "trajectories").where(in_slice)
             .agg(F.count("*").alias("rows"), F.countDistinct("example_id").alias("examples"),
                  F.sum(F.col("has_separator").cast("int")).alias("with_separator"),
                  F.sum(F.col("finished").cast("int")).alias("finished"),
                  F.sum(F.when(F.col("example_id").isin(todo), F.col("n_tokens"))).alias("tokens_this_run")).first().asDict())
    elapsed = time.time() - started
    return {"policy": policy, "sampled_examples": len(todo), "version": version, "seconds": round(elapsed, 1),
            "tokens_per_s": round((stats["tokens_this_run"] or 0) / elapsed, 1) if todo and elapsed else None,
            "missing_separator": (stats["rows"] - (stats["with_separator"] or 0)) if prompts.uses_reasoning(variant) else None,
            **stats}
