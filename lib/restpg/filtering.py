"""Keep high-reward outputs (Algorithm 1, lines 7-9): reward ≥ τ, at most N per input, weight = reward
→ the training set of iteration t."""
from __future__ import annotations

from restpg import catalog
from restpg.config import Settings
from restpg.policy_inputs import policy_prompts


class NothingPassed(RuntimeError):
    pass


def keep_high_reward(scored, tau: float, cap: int):
    """Rows with reward ≥ tau, the `cap` best per example (ties: lower sample_index first)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    best_first = Window.partitionBy("example_id").orderBy(F.col("reward").desc(), F.col("sample_index").asc())
    return scored.where(F.col("reward") >= tau).withColumn("_rank", F.row_number().over(best_first)).where(F.col("_rank") <= cap).drop("_rank")


def run(spark, settings: Settings, variant: str, iteration: int, run_id: str = "manual") -> dict:
    from pyspark.sql import functions as F

    tau, cap, kind = settings.filter.tau, settings.filter.max_kept_per_input, settings.judge.reward
    in_slice = (F.col("variant") == variant) & (F.col("iteration") == iteration)
    scores = catalog.read(spark, settings, "judge_scores").where(in_slice & (F.col("reward_kind") == kind))
    traj = catalog.read(spark, settings, "trajectories").where(in_slice).select("example_id", "sample_index", "raw_text")
    scored = scores.select("example_id", "sample_index", "task", "reward").join(traj, ["example_id", "sample_index"]).cache()
    total = scored.count()
    if total == 0:
        raise LookupError(f"no {kind} judge scores for variant={variant} iteration={iteration}: run `restpg judge` first")
    kept = keep_high_reward(scored, tau, cap).cache()
    n_kept = kept.count()
    per_task = {r.task: {"samples": r.n, "passed": r.passed, "pass_rate": round(r.passed / r.n, 4)}
                for r in scored.groupBy("task").agg(F.count("*").alias("n"), F.sum((F.col("reward") >= tau).cast("int")).alias("passed")).collect()}
    if n_kept == 0:
        q = scored.agg(F.expr("percentile(reward, array(0.0, 0.25, 0.5, 0.75, 0.9, 1.0))").alias("q")).first().q
        raise NothingPassed(
            f"no {variant} output of iteration {iteration} has reward >= tau={tau} ({kind} reward, {total} samples; "
            f"min/25%/50%/75%/90%/max = {', '.join(f'{x:.3f}' for x in q)}). Lower filter.tau (e.g. --set filter.tau={q[4]:.2f}) "
            f"or sample more (sample.m) instead of training on an empty set.")
    examples = catalog.read(spark, settings, "examples").where(F.col("example_id").isin([r.example_id for r in kept.select("example_id").distinct().collect()]))
    prompts_df = policy_prompts(spark, settings, examples, variant)
    out = kept.join(prompts_df, "example_id").select(
        F.lit(variant).alias("variant"), F.lit(iteration).alias("iteration"), "example_id", "sample_index", "task", "prompt",
        F.col("raw_text").alias("completion"), F.col("reward").alias("weight"), F.lit("trajectory").alias("source"),
        "template_version", F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at"))
    version = catalog.replace_slice(spark, settings, out, "training_sets", {"variant": variant, "iteration": iteration}, run_id)
    inputs_kept = kept.select("example_id").distinct().count()
    scored.unpersist()
    kept.unpersist()
    passed = sum(t["passed"] for t in per_task.values())
    return {"version": version, "tau": tau, "samples": total, "passed": passed, "pass_rate": round(passed / total, 4), "kept": n_kept,
            "inputs_with_kept": inputs_kept, "per_task": per_task}
