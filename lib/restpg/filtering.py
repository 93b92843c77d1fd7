"""Keep high-reward outputs (Algorithm 1, lines 7-9): well-formed outputs with reward ≥ τ, at most N per
input, weight = reward → the training set of iteration t. An output whose format is not ok (format_ok =
false, decided by the judge with `prompts.parse_output`: no response to judge, a separator the decoder
wrote or one written twice, cut at the cap) is never kept, whatever τ is.

When nothing passes, the slice's training set is emptied and `NothingPassed` says why: an M-step never
trains on an empty set, nor on an older filter's rows that the current scores no longer pass."""
from __future__ import annotations

from restpg import catalog
from restpg.config import Settings
from restpg.judge import format_counts
from restpg.rewards import kind_label
from restpg.policy_inputs import policy_prompts, previous_reasoning

QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


class NothingPassed(RuntimeError):
    pass


def keep_high_reward(scored, tau: float, cap: int):
    """Rows with format_ok and reward ≥ tau, the `cap` best per example (ties: lower sample_index first)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    best_first = Window.partitionBy("example_id").orderBy(F.col("reward").desc(), F.col("sample_index").asc())
    passed = scored.where(F.col("format_ok") & (F.col("reward") >= tau))
    return passed.withColumn("_rank", F.row_number().over(best_first)).where(F.col("_rank") <= cap).drop("_rank")


def nothing_passed_message(variant: str, iteration: int, tau: float, kind: str, samples: int,
                           quantiles: list[float] | None, format_issues: dict) -> str:
    """Why the filter kept nothing: the well-formed rewards' distribution and a τ that would keep some."""
    bad = sum(format_issues.values())
    issues = ", ".join(f"{k}={v}" for k, v in format_issues.items() if v)
    head = f"no {variant} output of iteration {iteration} has reward >= tau={tau} ({kind} reward, {samples} samples"
    if not quantiles:
        return (f"{head}, none well-formed: {issues}). No output has a response of its own to judge; give the policy "
                f"room to finish (prompt.max_reasoning_tokens, prompt.max_response_tokens) or check the SFT data's "
                f"separator (forced_separator: the decoder wrote it at the reasoning budget).")
    return (f"{head}, {samples - bad} well-formed{f'; {issues}' if issues else ''}; well-formed "
            f"min/25%/50%/75%/90%/max = {', '.join(f'{x:.3f}' for x in quantiles)}). Lower filter.tau "
            f"(e.g. --set filter.tau={quantiles[4]:.2f} keeps about the top 10%) or sample more (sample.m) "
            f"instead of training on an empty set.")


def run(spark, settings: Settings, *, variant: str, iteration: int, run_id: str) -> dict:
    from pyspark.sql import functions as F

    tau, cap, kind = settings.filter.tau, settings.filter.max_kept_per_input, kind_label(settings)
    slice_ = {"variant": variant, "iteration": iteration}
    scored = (catalog.read_slice(spark, settings, "judge_scores", {**slice_, "reward_kind": kind})
              .select("example_id", "sample_index", "task", "reward", "format_ok", "format_issue").cache())
    total = scored.count()
    if total == 0:
        raise LookupError(f"no {kind} judge scores for variant={variant} iteration={iteration}: run `restpg judge` first")
    formats = format_counts(scored)
    raw = catalog.read_slice(spark, settings, "trajectories", slice_).select("example_id", "sample_index", "raw_text")
    kept = keep_high_reward(scored, tau, cap).join(raw, ["example_id", "sample_index"]).cache()
    n_kept = kept.count()
    passing = (F.col("format_ok") & (F.col("reward") >= tau)).cast("int")
    per_task = {r.task: {"samples": r.n, "passed": r.passed, "pass_rate": round(r.passed / r.n, 4)}
                for r in scored.groupBy("task").agg(F.count("*").alias("n"), F.sum(passing).alias("passed")).collect()}
    if n_kept == 0:
        q = scored.where("format_ok").agg(F.expr(f"percentile(reward, array{QUANTILES})").alias("q")).first().q
        scored.unpersist()
        if catalog.exists(spark, settings, "training_sets"):
            empty = spark.createDataFrame([], catalog.spec("training_sets").struct())
            catalog.replace_slice(spark, settings, empty, "training_sets", slice_, run_id)
        raise NothingPassed(nothing_passed_message(variant, iteration, tau, kind, total, q, formats["format_issues"]))
    examples = catalog.read(spark, settings, "examples").join(kept.select("example_id").distinct(), "example_id")
    previous = previous_reasoning(spark, settings, variant, iteration)  # the prompts the samples were drawn with
    out = kept.join(policy_prompts(spark, settings, examples, variant, previous=previous), "example_id").select(
        F.lit(variant).alias("variant"), F.lit(iteration).alias("iteration"), "example_id", "sample_index", "task", "prompt",
        F.col("raw_text").alias("completion"), F.col("reward").alias("weight"), F.lit("trajectory").alias("source"),
        "template_version", F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at"))
    version = catalog.replace_slice(spark, settings, out, "training_sets", slice_, run_id)
    inputs_kept = kept.select("example_id").distinct().count()
    scored.unpersist()
    kept.unpersist()
    passed = sum(t["passed"] for t in per_task.values())
    return {"version": version, "tau": tau, "reward_kind": kind, "samples": total, "passed": passed,
            "pass_rate": round(passed / total, 4), "kept": n_kept, "inputs_with_kept": inputs_kept, "per_task": per_task,
            **formats}
