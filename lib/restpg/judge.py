"""Judge stage (Algorithm 1, line 6): the reward of every trajectory of one (variant, iteration) →
`judge_scores`. The reward (`restpg.rewards`) sees the response only, never the reasoning: an output
whose format leaves no response to judge (`prompts.parse_output`) gets reward 0, no score and no model
call, and the filter never keeps it."""
from __future__ import annotations

from typing import Iterator

import pandas as pd

from restpg import catalog, prompts, rewards
from restpg.config import Settings

FORMAT_FIELDS = "reasoning string, response string, format_ok boolean, format_issue string"


def with_output_format(pdf: pd.DataFrame, variant: str) -> pd.DataFrame:
    """Trajectory rows (raw_text, finished) + reasoning, response, format_ok, format_issue, recomputed from
    the raw text so the judged response never depends on how the sampler split it."""
    outs = [prompts.parse_output(variant, raw, bool(done)) for raw, done in zip(pdf["raw_text"], pdf["finished"])]
    return pdf.assign(reasoning=[o.reasoning for o in outs], response=[o.response for o in outs],
                      format_ok=[o.format_ok for o in outs], format_issue=[o.format_issue for o in outs])


def judge_rows(trajectories, rewarder: rewards.Rewarder, variant: str):
    """Trajectories joined with their examples' input and target → + FORMAT_FIELDS and the reward columns;
    parsing and rewarding share one pass over the rows (one Python worker per task)."""
    from pyspark.sql.types import StructType, _parse_datatype_string

    def judged(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            yield rewarder.assign(with_output_format(pdf, variant))

    added = _parse_datatype_string(f"{FORMAT_FIELDS}, {rewards.REWARD_FIELDS}").fields
    return rewarder.with_lineage(trajectories.mapInPandas(judged, StructType(trajectories.schema.fields + added)))


def format_report(rows: int, issue_counts: dict) -> dict:
    """{format_issues: {issue: n} over every known issue, format_ok_rate} of `rows` outputs."""
    issues = {issue: int(issue_counts.get(issue, 0)) for issue in prompts.FORMAT_ISSUES}
    bad = sum(issues.values())
    return {"format_issues": issues, "format_ok_rate": round((rows - bad) / rows, 4) if rows else None}


def format_counts(df) -> dict:
    """format_report of a DataFrame with format_issue (null when format_ok), in one pass."""
    counts = {r.format_issue: r["count"] for r in df.groupBy("format_issue").count().collect()}
    return format_report(sum(counts.values()), {k: v for k, v in counts.items() if k is not None})


def run(spark, settings: Settings, *, variant: str, iteration: int, run_id: str) -> dict:
    from pyspark.sql import functions as F

    slice_ = {"variant": variant, "iteration": iteration}
    traj = catalog.read_slice(spark, settings, "trajectories", slice_)
    if traj.limit(1).count() == 0:
        raise LookupError(f"no trajectories for variant={variant} iteration={iteration}: run `restpg sample` first")
    examples = catalog.read(spark, settings, "examples").select("example_id", "input", "target")
    columns = ("variant", "iteration", "example_id", "task", "sample_index", "raw_text", "finished")
    judged = judge_rows(traj.select(*columns).join(examples, "example_id"), rewards.Rewarder.from_settings(settings), variant)
    out = judged.select(
        "variant", "iteration", "example_id", "task", "sample_index", "reward_kind", "judge_model", "template_version",
        "reward", "score", "criterion_logprobs", "format_ok", "format_issue",
        F.length("response").alias("response_chars"), F.coalesce(F.length("reasoning"), F.lit(0)).alias("reasoning_chars"),
        F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at"))
    kind = settings.judge.reward
    version = catalog.replace_slice(spark, settings, out, "judge_scores", {**slice_, "reward_kind": kind}, run_id)
    written = catalog.read_slice(spark, settings, "judge_scores", {**slice_, "reward_kind": kind})
    groups = written.groupBy("task", "format_issue").agg(F.count("*").alias("n"), F.sum("reward").alias("total")).toPandas()
    quantiles = written.agg(F.expr("percentile(reward, array(0.1, 0.5, 0.9))")).first()[0]
    by_task = groups.groupby("task")[["n", "total"]].sum()
    issues = groups.dropna(subset=["format_issue"]).groupby("format_issue")["n"].sum().to_dict()
    n = int(groups.n.sum())
    return {"version": version, "reward_kind": kind, "judge_model": rewards.judge_model(settings), "rows": n,
            "mean_reward": float(groups.total.sum()) / n, "p10_p50_p90": quantiles,
            "per_task_mean": {t: round(float(r.total) / r.n, 4) for t, r in by_task.iterrows()}, **format_report(n, issues)}
