"""Judge stage (Algorithm 1, line 6): the reward of every trajectory of one (variant, iteration) →
`judge_scores`. The reward (`restpg.rewards`) sees the response only, never the reasoning: an output
whose format leaves no response to judge (`prompts.parse_output`) gets reward 0, no score and no model
call, and the filter never keeps it.

Scores are committed in chunks of examples (insert-only MERGE on the keys, confined to the slice): a
judge killed half way keeps every finished chunk and its rerun judges only what is missing.
"""
from __future__ import annotations

import time
from typing import Iterator

import pandas as pd

from restpg import catalog, prompts, rewards
from restpg.config import Settings
from restpg.tracking import progress, say

FORMAT_FIELDS = "reasoning string, response string, format_ok boolean, format_issue string"


def with_output_format(pdf: pd.DataFrame, variant: str) -> pd.DataFrame:
    """Trajectory rows (raw_text, finished, reasoning_forced) + reasoning, response, format_ok, format_issue,
    recomputed from the raw text so the judged response never depends on how the sampler split it (a null
    reasoning_forced, from a row sampled before the column existed, counts as not forced)."""
    forced = [bool(f) if pd.notna(f) else False for f in pdf["reasoning_forced"]]
    outs = [prompts.parse_output(variant, raw, bool(done), was_forced)
            for raw, done, was_forced in zip(pdf["raw_text"], pdf["finished"], forced)]
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


def standing_scores(spark, settings: Settings, slice_: dict, trajectories, rewarder: rewards.Rewarder):
    """(example_id, sample_index) of the slice's scores that still stand: by this judge model and
    template, and made after the trajectory they score was sampled (a re-sampled row is judged again)."""
    from pyspark.sql import functions as F

    keys = ["example_id", "sample_index"]
    scores = catalog.read_slice(spark, settings, "judge_scores", slice_)
    sampled = trajectories.select(*keys, F.col("created_at").alias("_sampled"))
    return (scores.join(sampled, keys)
            .where((F.col("judge_model") == rewarder.ref)
                   & F.col("template_version").eqNullSafe(F.lit(rewarder.template_version).cast("string"))
                   & (F.col("created_at") >= F.col("_sampled")))
            .select(*keys))


def _judge_chunk(spark, settings: Settings, part, rewarder: rewards.Rewarder, variant: str, slice_: dict,
                 run_id: str) -> int:
    """Reward the trajectory rows of `part` and commit them with an insert-only MERGE; the new version."""
    from pyspark.sql import functions as F

    examples = catalog.read(spark, settings, "examples").select("example_id", "input", "target")
    judged = judge_rows(part.join(examples, "example_id"), rewarder, variant)
    out = judged.select(
        "variant", "iteration", "example_id", "task", "sample_index", "reward_kind", "judge_model", "template_version",
        "reward", "score", "criterion_logprobs", "reward_terms", "format_ok", "format_issue",
        F.length("response").alias("response_chars"), F.coalesce(F.length("reasoning"), F.lit(0)).alias("reasoning_chars"),
        F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at"))
    return catalog.merge(spark, settings, out, "judge_scores", run_id, slice_=slice_)


def run(spark, settings: Settings, *, variant: str, iteration: int, run_id: str, force: bool = False) -> dict:
    """Reward every trajectory of the slice, committed in chunks of `judge.chunk_examples` examples
    (insert-only MERGE): a rerun judges only what has no standing score (`standing_scores`), so a killed
    run keeps its finished chunks. `force` re-judges the whole slice (the pipeline forces when the
    judge's config changed)."""
    from pyspark.sql import functions as F

    kind = rewards.kind_label(settings)
    slice_ = {"variant": variant, "iteration": iteration}
    mine = {**slice_, "reward_kind": kind}
    columns = ("variant", "iteration", "example_id", "task", "sample_index", "raw_text", "finished", "reasoning_forced",
               "created_at")
    traj = catalog.read_slice(spark, settings, "trajectories", slice_).select(*columns)
    if traj.limit(1).count() == 0:
        raise LookupError(f"no trajectories for variant={variant} iteration={iteration}: run `restpg sample` first")
    rewarder = rewards.Rewarder.from_settings(settings)
    version, replaced = None, 0
    todo = traj
    if catalog.exists(spark, settings, "judge_scores"):
        standing = standing_scores(spark, settings, mine, traj, rewarder).cache()
        held, kept = catalog.read_slice(spark, settings, "judge_scores", mine).count(), standing.count()
        if force or kept < held:  # drop scores of re-sampled rows or of another judge before adding new ones
            rows = catalog.read_slice(spark, settings, "judge_scores", mine).join(standing, ["example_id", "sample_index"])
            version = catalog.replace_slice(spark, settings, rows.limit(0) if force else rows, "judge_scores", mine, run_id)
            replaced, kept = held - (0 if force else kept), 0 if force else kept
        todo = traj.join(standing, ["example_id", "sample_index"], "left_anti") if kept else traj
    todo = todo.drop("created_at").cache()
    ids = sorted(r.example_id for r in todo.select("example_id").distinct().collect())
    say(f"judge {variant} t={iteration}: {len(ids)} examples to judge with {rewarder.ref} ({kind}), "
        f"{replaced} stale scores replaced")
    started, chunk_size = time.time(), settings.judge.chunk_examples
    try:
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start:start + chunk_size]
            version = _judge_chunk(spark, settings, todo.where(F.col("example_id").isin(chunk)), rewarder, variant,
                                   mine, run_id)
            progress(f"judge {variant} t={iteration} examples", start + len(chunk), len(ids), started)
    finally:
        todo.unpersist()
    written = catalog.read_slice(spark, settings, "judge_scores", mine)
    groups = written.groupBy("task", "format_issue").agg(F.count("*").alias("n"), F.sum("reward").alias("total")).toPandas()
    quantiles = written.agg(F.expr("percentile(reward, array(0.1, 0.5, 0.9))")).first()[0]
    by_task = groups.groupby("task")[["n", "total"]].sum()
    issues = groups.dropna(subset=["format_issue"]).groupby("format_issue")["n"].sum().to_dict()
    n = int(groups.n.sum())
    return {"version": version if version is not None else catalog.version(spark, settings, "judge_scores"),
            "reward_kind": kind, "judge_model": rewards.judge_model(settings), "rows": n,
            "judged_examples": len(ids), "replaced_rows": replaced,
            "mean_reward": float(groups.total.sum()) / n, "p10_p50_p90": quantiles,
            "per_task_mean": {t: round(float(r.total) / r.n, 4) for t, r in by_task.iterrows()}, **format_report(n, issues)}
