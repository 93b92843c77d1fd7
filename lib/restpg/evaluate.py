"""Evaluation (paper Sec. 4, Table 1): each variant's final policy answers the evaluation split at
temperature 0.1; responses (reasoning stripped) get the judge score, ROUGE-1, ROUGE-L and METEOR;
the summary holds per-task and macro means and paired t-tests between variants."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pandas as pd

from restpg import catalog, metrics
from restpg.config import Settings
from restpg.policy_inputs import policy_prompts
from restpg.sample import _with_parts
from restpg.tracking import say


def predict(spark, settings: Settings, variant: str, policy: str, split: str, ablation: str, run_id: str) -> int:
    from pyspark.sql import functions as F

    from restpg import generation

    cfg = settings.evaluate
    examples = catalog.read(spark, settings, "examples").where(F.col("split") == split)
    inputs = policy_prompts(spark, settings, examples, variant)
    out = generation.generate_df(inputs.select("example_id", "prompt"), policy, settings, m=1, temperature=cfg.temperature,
                                 top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, iteration=-1, seed=settings.sample.seed)
    rows = (_with_parts(out.join(inputs.select("example_id", "template_version"), "example_id"), variant)
            .join(examples.select("example_id", "task", "user_id"), "example_id")
            .select(F.lit(ablation).alias("ablation"), F.lit(variant).alias("variant"), F.lit(policy).alias("model_version"),
                    F.lit(split).alias("split"), "example_id", "task", "user_id", F.col("text").alias("raw_text"), "reasoning",
                    "response", "template_version", F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at")))
    return catalog.replace_slice(spark, settings, rows, "eval_predictions", {"ablation": ablation, "variant": variant, "split": split}, run_id)


def score(spark, settings: Settings, variant: str, split: str, ablation: str, run_id: str) -> int:
    from pyspark.sql import functions as F

    from restpg.judge import add_rewards

    preds = catalog.read(spark, settings, "eval_predictions").where(
        (F.col("ablation") == ablation) & (F.col("variant") == variant) & (F.col("split") == split))
    examples = catalog.read(spark, settings, "examples").select("example_id", "input", "target")

    def overlap(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            r = [metrics.rouge(p or "", t) for p, t in zip(pdf["response"], pdf["target"])]
            yield pd.DataFrame({"example_id": pdf["example_id"], "rouge1": [x["rouge1"] for x in r],
                                "rougeL": [x["rougeL"] for x in r],
                                "meteor": [metrics.meteor(p or "", t) for p, t in zip(pdf["response"], pdf["target"])]})

    joined = preds.join(examples, "example_id")
    lexical = joined.select("example_id", "response", "target").mapInPandas(overlap, "example_id string, rouge1 double, rougeL double, meteor double")
    rewarded = add_rewards(spark, settings, joined.select("ablation", "variant", "model_version", "split", "example_id", "task",
                                                          "input", "target", "response"))
    rows = rewarded.join(lexical, "example_id").select(
        "ablation", "variant", "model_version", "split", "example_id", "task", "reward_kind",
        F.col("reward").alias("judge_score"), "rouge1", "rougeL", "meteor", F.lit(run_id).alias("run_id"),
        F.current_timestamp().alias("created_at"))
    return catalog.replace_slice(spark, settings, rows, "eval_scores", {"ablation": ablation, "variant": variant, "split": split}, run_id)


def summarize(spark, settings: Settings, split: str, ablation: str, run_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    from pyspark.sql import functions as F

    scores = (catalog.read(spark, settings, "eval_scores").where((F.col("ablation") == ablation) & (F.col("split") == split))
              .drop("run_id", "created_at").toPandas())
    summary, tests = metrics.summarize(scores), metrics.pairwise_tests(scores, alpha=settings.evaluate.alpha)
    stamp = {"run_id": run_id, "created_at": pd.Timestamp.now(tz="UTC").tz_localize(None)}
    for name, pdf in (("eval_summary", summary), ("eval_tests", tests)):
        df = spark.createDataFrame(pdf.assign(**stamp), catalog.spec(name).struct()) if len(pdf) else \
            spark.createDataFrame([], catalog.spec(name).struct())
        catalog.replace_slice(spark, settings, df, name, {"ablation": ablation, "split": split}, run_id)
    return summary, tests


def reward_plot(spark, settings: Settings, split: str, ablation: str) -> str:
    from pyspark.sql import functions as F

    pdf = (catalog.read(spark, settings, "eval_scores").where((F.col("ablation") == ablation) & (F.col("split") == split))
           .select("variant", "judge_score").toPandas())
    out = settings.home_dir / "reports" / f"eval_{split}{'_' + ablation.replace(':', '_') if ablation else ''}_reward_hist.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    groups = {v: g["judge_score"].tolist() for v, g in pdf.groupby("variant")}
    return metrics.reward_histogram_png(groups, out, f"evaluation reward ({settings.judge.reward}) on {split}")


def run(spark, settings: Settings, policies: dict[str, str], *, split: str | None = None, ablation: str = "",
        run_id: str = "manual") -> dict:
    """`policies`: variant → model URI. Writes eval_predictions, eval_scores, eval_summary, eval_tests."""
    split = split or settings.evaluate.split
    for variant, policy in policies.items():
        say(f"evaluate {variant} on {split}: {policy}")
        predict(spark, settings, variant, policy, split, ablation, run_id)
        score(spark, settings, variant, split, ablation, run_id)
    summary, tests = summarize(spark, settings, split, ablation, run_id)
    plot = reward_plot(spark, settings, split, ablation)
    try:
        import mlflow

        if mlflow.active_run():
            mlflow.log_artifact(plot, "plots")
    except Exception as e:  # a plot that cannot be logged is not worth failing an evaluation
        say(f"could not log {plot} to MLflow: {e}")
    return {"split": split, "ablation": ablation, "table1": metrics.format_table1(summary, tests, ablation=ablation),
            "plot": str(Path(plot))}
