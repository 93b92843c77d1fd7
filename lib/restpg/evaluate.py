"""Evaluation (paper Sec. 4, Table 1): each variant's final policy answers the evaluation split at
temperature 0.1; responses (reasoning stripped) get the judge score, ROUGE-1, ROUGE-L and METEOR;
the summary holds per-task and macro means and paired t-tests between variants.

A policy answers within its variant's budget (`prompts.output_budget`: the response budget for plain
variants, reasoning + response for reasoning variants) and every answer is checked with
`prompts.parse_output`: an output whose format is not ok (no separator, empty part, cut at the length
cap) counts as an empty response — judge score 0, ROUGE and METEOR 0 — so a variant cannot gain by
rambling past its cap. The run also hands the promotion step its candidate: the version number of
the final policy of `candidate_variant(...)`, published as the task value `candidate_version`.
"""
from __future__ import annotations

from dataclasses import astuple
from pathlib import Path
from typing import Iterator

import pandas as pd

from restpg import catalog, metrics, prompts, registry
from restpg.config import Settings
from restpg.policy_inputs import policy_prompts
from restpg.tracking import publish_task_value, say
from restpg.variants import check as check_variants, is_em

CANDIDATE_VERSION = "candidate_version"
# Task values `run` publishes; the bundle test resolves every `{{tasks.evaluate.values.<key>}}` against it.
PUBLISHES = (CANDIDATE_VERSION,)
PARSED = "struct<reasoning:string,response:string,format_ok:boolean,format_issue:string>"


def candidate_variant(names) -> str | None:
    """The variant proposed for promotion: rest_pg when present, else the last EM variant, else the last."""
    names = [n for n in names if ":" not in n]  # ablation-tagged systems are never candidates
    if not names:
        return None
    if "rest_pg" in names:
        return "rest_pg"
    em = [n for n in names if is_em(n)]
    return em[-1] if em else names[-1]


def registry_version(uri: str) -> str | None:
    """'7' of ``models:/<name>/7``; None for anything else (a path, an alias, a run URI)."""
    if not uri.startswith("models:/"):
        return None
    tail = uri.rsplit("/", 1)[1]
    return tail if tail.isdigit() else None


def predict(spark, settings: Settings, variant: str, policy: str, split: str, ablation: str, run_id: str,
            examples=None) -> int:
    """`policy` answers every example of `split` → the (ablation, variant, split) slice of eval_predictions."""
    from pyspark.sql import functions as F

    from restpg import generation

    cfg = settings.evaluate
    # `examples` replaces the split's rows, e.g. with profiles cut short (restpg.sparse_eval)
    examples = examples if examples is not None else catalog.read_slice(spark, settings, "examples", {"split": split})
    inputs = policy_prompts(spark, settings, examples, variant)
    out = generation.generate_df(inputs.select("example_id", "prompt"), policy, settings, m=1, temperature=cfg.temperature,
                                 top_p=cfg.top_p, iteration=-1, seed=settings.sample.seed,
                                 **generation.limits(settings, variant))
    parse = F.udf(lambda text, finished: astuple(prompts.parse_output(variant, text, bool(finished))), PARSED)
    rows = (out.withColumn("parsed", parse("text", "finished"))
            .join(inputs.select("example_id", "template_version"), "example_id")
            .join(examples.select("example_id", "task", "user_id"), "example_id")
            .select(F.lit(ablation).alias("ablation"), F.lit(variant).alias("variant"), F.lit(policy).alias("model_version"),
                    F.lit(split).alias("split"), "example_id", "task", "user_id", F.col("text").alias("raw_text"),
                    "parsed.reasoning", "parsed.response", "parsed.format_ok", "parsed.format_issue", "n_tokens",
                    "finished", "reasoning_forced", "template_version", F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at")))
    return catalog.replace_slice(spark, settings, rows, "eval_predictions", {"ablation": ablation, "variant": variant, "split": split}, run_id)


def score(spark, settings: Settings, variant: str, split: str, ablation: str, run_id: str) -> int:
    """Judge score, ROUGE and METEOR of one eval_predictions slice → the same slice of eval_scores.
    A format failure is scored as the empty response it stands for: 0 on every metric."""
    from pyspark.sql import functions as F

    from restpg.rewards import add_rewards

    slice_ = {"ablation": ablation, "variant": variant, "split": split}
    preds = (catalog.read_slice(spark, settings, "eval_predictions", slice_)
             .withColumn("response", F.when(F.col("format_ok"), F.coalesce("response", F.lit(""))).otherwise(F.lit(""))))
    examples = catalog.read(spark, settings, "examples").select("example_id", "input", "target")

    def overlap(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            r = [metrics.rouge(p, t) for p, t in zip(pdf["response"], pdf["target"])]
            yield pd.DataFrame({"example_id": pdf["example_id"], "rouge1": [x["rouge1"] for x in r],
                                "rougeL": [x["rougeL"] for x in r],
                                "meteor": [metrics.meteor(p, t) for p, t in zip(pdf["response"], pdf["target"])]})

    joined = preds.join(examples, "example_id")
    lexical = joined.select("example_id", "response", "target").mapInPandas(overlap, "example_id string, rouge1 double, rougeL double, meteor double")
    rewarded = add_rewards(spark, settings, joined.select("ablation", "variant", "model_version", "split", "example_id", "task",
                                                          "input", "target", "response"))
    rows = rewarded.join(lexical, "example_id").select(
        "ablation", "variant", "model_version", "split", "example_id", "task", "reward_kind",
        F.when(F.col("response") == "", F.lit(0.0)).otherwise(F.col("reward")).alias("judge_score"),
        "rouge1", "rougeL", "meteor", F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at"))
    return catalog.replace_slice(spark, settings, rows, "eval_scores", slice_, run_id)


def summarize(spark, settings: Settings, split: str, ablation: str, run_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    scores = (catalog.read_slice(spark, settings, "eval_scores", {"ablation": ablation, "split": split})
              .drop("run_id", "created_at").toPandas())
    summary, tests = metrics.summarize(scores), metrics.pairwise_tests(scores, alpha=settings.evaluate.alpha)
    stamp = {"run_id": run_id, "created_at": pd.Timestamp.now(tz="UTC").tz_localize(None)}
    for name, pdf in (("eval_summary", summary), ("eval_tests", tests)):
        df = spark.createDataFrame(pdf.assign(**stamp), catalog.spec(name).struct()) if len(pdf) else \
            spark.createDataFrame([], catalog.spec(name).struct())
        catalog.replace_slice(spark, settings, df, name, {"ablation": ablation, "split": split}, run_id)
    return summary, tests


def output_report(spark, settings: Settings, split: str, ablation: str, names: list[str]) -> dict:
    """metrics.output_report of these variants' eval_predictions (format ok rate, issues, lengths)."""
    from pyspark.sql import functions as F

    pdf = (catalog.read_slice(spark, settings, "eval_predictions", {"ablation": ablation, "split": split})
           .where(F.col("variant").isin(names))
           .select("variant", "format_ok", "format_issue", "n_tokens", "reasoning", "response").toPandas())
    return metrics.output_report(pdf)


def reward_plot(spark, settings: Settings, split: str, ablation: str) -> str:
    pdf = (catalog.read_slice(spark, settings, "eval_scores", {"ablation": ablation, "split": split})
           .select("variant", "judge_score").toPandas())
    out = settings.home_dir / "reports" / f"eval_{split}{'_' + ablation.replace(':', '_') if ablation else ''}_reward_hist.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    groups = {v: g["judge_score"].tolist() for v, g in pdf.groupby("variant")}
    return metrics.reward_histogram_png(groups, out, f"evaluation reward ({settings.judge.reward}) on {split}")


def publish_candidate(policies: dict[str, str]) -> tuple[str | None, str]:
    """Publish the candidate's version number as the task value `candidate_version` ('' when the
    candidate is not a registered version: promote then chooses the candidate itself)."""
    variant = candidate_variant(policies)
    version = registry_version(policies[variant]) if variant else None
    if variant and version is None:
        say(f"candidate {variant} ({policies[variant]}) is not a registered model version: publishing ''")
    publish_task_value(CANDIDATE_VERSION, version or "")
    return variant, version or ""


def run(spark, settings: Settings, *, run_id: str, variants: list[str] | None = None,
        policies: dict[str, str] | None = None, split: str | None = None, ablation: str = "") -> dict:
    """Evaluate `variants` (default settings.loop.variants, or the keys of `policies`) on `split`
    (default settings.evaluate.split). `policies` maps a variant to a model URI; a variant without one
    gets its final policy (registry.final_policy). Writes eval_predictions, eval_scores, eval_summary,
    eval_tests; on the main table (ablation '') publishes `candidate_version`."""
    split = split or settings.evaluate.split
    names = list(variants or (policies.keys() if policies else settings.loop.variants))
    policies = {v: (policies or {}).get(v) or registry.final_policy(settings, v, settings.loop.iterations)
                for v in check_variants(names)}
    for variant, policy in policies.items():
        say(f"evaluate {variant} on {split}: {policy}")
        predict(spark, settings, variant, policy, split, ablation, run_id)
        score(spark, settings, variant, split, ablation, run_id)
    summary, tests = summarize(spark, settings, split, ablation, run_id)
    outputs = output_report(spark, settings, split, ablation, list(policies))
    plot = reward_plot(spark, settings, split, ablation)
    try:
        import mlflow

        if mlflow.active_run():
            mlflow.log_artifact(plot, "plots")
            mlflow.log_dict(outputs, f"outputs_{split}{'_' + ablation.replace(':', '_') if ablation else ''}.json")
    except Exception as e:  # a plot that cannot be logged is not worth failing an evaluation
        say(f"could not log {plot} to MLflow: {e}")
    result = {"split": split, "ablation": ablation, "policies": policies, "outputs": outputs,
              "table1": metrics.format_table1(summary, tests, ablation=ablation),
              "output_table": metrics.format_output_report(outputs), "plot": str(Path(plot))}
    if not ablation:
        result["candidate_variant"], result[CANDIDATE_VERSION] = publish_candidate(policies)
    return result
