"""Promotion: compare a candidate policy version with the `champion` alias and move aliases.

Validation decides, this step acts (mlops-stacks style): the candidate becomes `champion` when there
is none yet, or when its macro judge score on the promotion split is higher with a paired two-tailed
t-test p < alpha on the examples both were scored on; otherwise it gets `challenger`. The old
champion keeps its version, it only loses the alias. With dry_run nothing moves and no tag is set;
the decision is still reported and recorded in the `promotions` table (dry_run = true).
"""
from __future__ import annotations

import datetime as dt

from restpg import catalog, metrics, runtime
from restpg.config import Settings

CHAMPION, CHALLENGER = "champion", "challenger"


def model_uri(name: str, version: str) -> str:
    return f"models:/{name}/{version}"


def eval_scores_fn(spark, settings: Settings, ablation: str | None = None):
    """Default evidence: eval_scores rows of ``models:/<name>/<version>`` on settings.promote.split,
    of one `ablation` tag if given (otherwise several rows of one example are averaged)."""
    from pyspark.sql import functions as F

    def scores(version: str):
        uri = model_uri(settings.mlflow.policy_model_name, version)
        where = (F.col("model_version") == uri) & (F.col("split") == settings.promote.split)
        if ablation is not None:
            where = where & (F.col("ablation") == ablation)
        df = (catalog.read(spark, settings, "eval_scores").where(where)
              .groupBy("example_id", "task").agg(F.avg("judge_score").alias("judge_score")))
        return df.toPandas()
    return scores


def macro_judge_score(scores) -> float | None:
    """Mean of per-task mean judge scores (None without rows)."""
    if scores is None or len(scores) == 0:
        return None
    return float(scores.groupby("task")["judge_score"].mean().mean())


def decide(candidate, champion, alpha: float) -> dict:
    """Pure decision on two per-example score frames [example_id, task, judge_score]; champion None
    means there is no champion yet."""
    if champion is None:
        return {"decision": CHAMPION, "reason": "no champion yet", "candidate_score": macro_judge_score(candidate),
                "champion_score": None, "p_value": None, "n_paired": 0}
    paired = candidate.merge(champion[["example_id", "judge_score"]], on="example_id", suffixes=("", "_champion"))
    cand = paired[["task", "judge_score"]]
    champ = paired[["task", "judge_score_champion"]].rename(columns={"judge_score_champion": "judge_score"})
    cand_score, champ_score = macro_judge_score(cand), macro_judge_score(champ)
    _, p = metrics.paired_ttest(paired["judge_score"], paired["judge_score_champion"]) if len(paired) else (None, None)
    if len(paired) < 2:
        decision, reason = CHALLENGER, f"{len(paired)} paired examples: no evidence"
    elif cand_score > champ_score and p is not None and p < alpha:
        decision, reason = CHAMPION, f"better macro judge score, p={p:.3g} < {alpha}"
    elif cand_score > champ_score:
        decision, reason = CHALLENGER, f"better but not significant (p={p:.3g}, alpha {alpha})"
    else:
        decision, reason = CHALLENGER, "not better than the champion"
    return {"decision": decision, "reason": reason, "candidate_score": cand_score, "champion_score": champ_score,
            "p_value": p, "n_paired": int(len(paired))}


def _tag(value) -> str:
    return "" if value is None else str(value)


def run(spark, settings: Settings, candidate_version: str, *, scores_fn=None, run_id: str,
        dry_run: bool | None = None) -> dict:
    """Decide for `candidate_version` of settings.mlflow.policy_model_name, move aliases (unless
    dry run), tag the version and append the decision to `promotions`. Returns the decision."""
    from mlflow import MlflowClient

    runtime.setup_mlflow(settings)
    dry_run = settings.promote.dry_run if dry_run is None else dry_run
    name, candidate_version = settings.mlflow.policy_model_name, str(candidate_version)
    client = MlflowClient()
    client.get_model_version(name, candidate_version)  # fails early on an unknown version
    scores_fn = scores_fn or eval_scores_fn(spark, settings)

    champion_version = None
    if CHAMPION in client.get_registered_model(name).aliases:
        champion_version = str(client.get_model_version_by_alias(name, CHAMPION).version)
    if champion_version == candidate_version:
        result = {"decision": CHAMPION, "reason": "already champion", "candidate_score": None,
                  "champion_score": None, "p_value": None, "n_paired": 0}
    else:
        result = decide(scores_fn(candidate_version), scores_fn(champion_version) if champion_version else None,
                        settings.promote.alpha)
    result.update(model_name=name, candidate_version=candidate_version, champion_version=champion_version,
                  split=settings.promote.split, dry_run=dry_run, moved=[])

    if not dry_run:
        if result["decision"] == CHAMPION and champion_version != candidate_version:
            client.set_registered_model_alias(name, CHAMPION, candidate_version)
            result["moved"].append(CHAMPION)
            if str(client.get_registered_model(name).aliases.get(CHALLENGER)) == candidate_version:
                client.delete_registered_model_alias(name, CHALLENGER)
        elif result["decision"] == CHALLENGER:
            client.set_registered_model_alias(name, CHALLENGER, candidate_version)
            result["moved"].append(CHALLENGER)
        for key in ("decision", "p_value", "candidate_score", "champion_score", "champion_version", "reason"):
            client.set_model_version_tag(name, candidate_version, f"promotion_{key}", _tag(result[key]))

    row = (name, candidate_version, champion_version, result["decision"], settings.promote.split,
           result["candidate_score"], result["champion_score"], result["p_value"], dry_run, run_id, dt.datetime.now())
    df = spark.createDataFrame([row], schema=catalog.spec("promotions").struct())
    catalog.merge_insert(spark, settings, df, "promotions", run_id)
    return result
