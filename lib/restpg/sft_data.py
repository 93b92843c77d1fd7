"""Iteration-0 training sets: `sft` (prompt → y) and `sft_reasoning` (prompt → reasoning + separator + y)."""
from __future__ import annotations

from restpg import catalog, prompts
from restpg.config import Settings
from restpg.policy_inputs import policy_prompts


def run(spark, settings: Settings, variant: str, run_id: str = "manual") -> dict:
    from pyspark.sql import functions as F

    if variant not in ("sft", "sft_reasoning"):
        raise ValueError(f"iteration-0 data exists for sft and sft_reasoning, not {variant!r}")
    examples = catalog.read(spark, settings, "examples").where(F.col("split") == "train")
    if settings.data.max_examples:
        examples = examples.orderBy("example_id").limit(settings.data.max_examples)
    rows = policy_prompts(spark, settings, examples, variant).join(examples.select("example_id", "task", "target"), "example_id")
    if variant == "sft_reasoning":
        from restpg import models

        teacher = models.resolve_ref(settings.models.teacher, settings)
        paths = (catalog.read(spark, settings, "reasoning_paths")
                 .where((F.col("teacher") == teacher) & (F.col("template_version") == prompts.template("teacher_reasoning").version))
                 .select("example_id", "reasoning"))
        rows = rows.join(paths, "example_id")  # an example without a reasoning path cannot train this variant
        join = F.udf(prompts.join_reasoning, "string")
        rows = rows.withColumn("completion", join("reasoning", "target"))
    else:
        rows = rows.withColumn("completion", F.col("target"))
    out = rows.select(
        F.lit(variant).alias("variant"), F.lit(0).alias("iteration"), "example_id", F.lit(-1).alias("sample_index"),
        "task", "prompt", "completion", F.lit(1.0).alias("weight"), F.lit("gold").alias("source"),
        "template_version", F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at"))
    version = catalog.replace_slice(spark, settings, out, "training_sets", {"variant": variant, "iteration": 0}, run_id)
    n = catalog.read(spark, settings, "training_sets").where(f"variant = '{variant}' AND iteration = 0").count()
    expected = examples.count()
    if n < expected:
        from restpg.tracking import say

        say(f"build-sft {variant}: {expected - n} training examples have no reasoning path and are left out")
    return {"version": version, "variant": variant, "rows": n, "train_examples": expected}
