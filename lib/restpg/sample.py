"""E-step (Algorithm 1, line 5): θᵗ samples m outputs per training input → `trajectories`.

Samples belong to the policy that made them: a (variant, iteration) slice only ever holds one
policy version's rows. A run with another policy than the slice's replaces them (a scheduled re-run
after retraining re-samples); a run with the same policy samples only what is missing. Chunks are
committed with an insert-only MERGE on (variant, iteration, example_id, sample_index), confined to
the slice: a run that dies keeps every finished chunk, and the rerun fills in the rest with the same
seeds, so the same texts. From iteration 2 a PAT prompt carries the previous iteration's merged
reasoning for the same input (`policy_inputs.previous_reasoning`), which the policy revises.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from restpg import catalog, prompts
from restpg.config import Settings
from restpg.policy_inputs import policy_prompts, previous_reasoning, training_inputs
from restpg.tracking import progress, say

PARSE_COLUMNS = "reasoning string, response string, has_separator boolean, format_ok boolean, format_issue string"


def parse_frame(variant: str, texts: pd.Series, finished: pd.Series, forced: pd.Series | None = None) -> pd.DataFrame:
    """The parse columns of raw outputs (prompts.parse_output): the response is "" when the format is not ok.
    `forced`: the decoder wrote the separator (generation's reasoning_forced; none when not given)."""
    rows = []
    forced = [False] * len(texts) if forced is None else forced
    for raw, done, was_forced in zip(texts, finished, forced):
        out = prompts.parse_output(variant, raw, bool(done), bool(was_forced) if pd.notna(was_forced) else False)
        found = prompts.uses_reasoning(variant) and prompts.split_reasoning(raw or "")[2]
        rows.append((out.reasoning, out.response, bool(found), out.format_ok, out.format_issue))
    return pd.DataFrame(rows, columns=["reasoning", "response", "has_separator", "format_ok", "format_issue"])


def with_parse(df, variant: str):
    """df with `text`, `finished` and `reasoning_forced` (generation.generate_df's columns) → + reasoning,
    response, has_separator, format_ok, format_issue."""
    from pyspark.sql import functions as F

    @F.pandas_udf(PARSE_COLUMNS)
    def parse(texts: pd.Series, finished: pd.Series, forced: pd.Series) -> pd.DataFrame:
        return parse_frame(variant, texts, finished, forced)

    return (df.withColumn("_parse", parse("text", "finished", "reasoning_forced"))
            .select("*", "_parse.*").drop("_parse"))


def slice_state(spark, settings: Settings, slice_: dict, policy: str, m: int) -> tuple[set[str], int]:
    """(examples of the slice with all m samples by `policy`, rows of the slice made by other policies)."""
    from pyspark.sql import functions as F

    if not catalog.exists(spark, settings, "trajectories"):
        return set(), 0
    rows = catalog.read_slice(spark, settings, "trajectories", slice_)
    mine = F.col("policy_version") == policy
    counts = (rows.groupBy("example_id")
              .agg(F.sum((mine & (F.col("sample_index") < m)).cast("int")).alias("mine"),
                   F.sum((~mine).cast("int")).alias("others")).collect())
    return {r.example_id for r in counts if r.mine >= m}, sum(r.others for r in counts)


def keep_policy_rows(spark, settings: Settings, slice_: dict, policy: str | None, run_id: str) -> int:
    """Replace the slice with its rows made by `policy` (None: the slice is emptied); returns the new version."""
    from pyspark.sql import functions as F

    kept = catalog.read_slice(spark, settings, "trajectories", slice_)
    kept = kept.where(F.col("policy_version") == policy) if policy else kept.limit(0)
    return catalog.replace_slice(spark, settings, kept, "trajectories", slice_, run_id)


def _format_stats(spark, settings: Settings, slice_: dict) -> dict:
    """Rows, examples, separators, finished rows, format_ok_rate and rows per format issue of the slice."""
    from pyspark.sql import functions as F

    rows = catalog.read_slice(spark, settings, "trajectories", slice_)
    groups = (rows.rollup("format_issue")
              .agg(F.grouping("format_issue").alias("total"), F.count("*").alias("rows"),
                   F.countDistinct("example_id").alias("examples"),
                   F.sum(F.col("has_separator").cast("int")).alias("with_separator"),
                   F.sum(F.col("finished").cast("int")).alias("finished"),
                   F.sum(F.col("reasoning_forced").cast("int")).alias("reasoning_forced")).collect())
    total = next((g for g in groups if g.total), None)
    stats = {k: (total[k] if total else 0) or 0
             for k in ("rows", "examples", "with_separator", "finished", "reasoning_forced")}
    issues = dict.fromkeys(prompts.FORMAT_ISSUES, 0)
    issues.update({g.format_issue: g.rows for g in groups if not g.total and g.format_issue is not None})
    ok = sum(g.rows for g in groups if not g.total and g.format_issue is None)
    return {**stats, "format_ok_rate": round(ok / stats["rows"], 4) if stats["rows"] else None, "format_issues": issues}


def _sample_chunk(spark, settings: Settings, inputs, chunk: list[str], *, variant: str, iteration: int, policy: str,
                  run_id: str) -> tuple[int, int, int]:
    """Sample and commit one chunk of examples; (rows made, tokens made, table version)."""
    from pyspark.sql import functions as F

    from restpg import generation

    cfg = settings.sample
    part = inputs.where(F.col("example_id").isin(chunk))
    samples = generation.generate_df(
        part.select("example_id", "prompt"), policy, settings, m=cfg.m, temperature=cfg.temperature,
        top_p=cfg.top_p, iteration=iteration, seed=cfg.seed, **generation.limits(settings, variant))
    rows = (with_parse(samples.join(part.select("example_id", "task", "template_version"), "example_id"), variant)
            .select(F.lit(variant).alias("variant"), F.lit(iteration).alias("iteration"), "example_id", "task",
                    "sample_index", "seed", F.lit(policy).alias("policy_version"), F.col("text").alias("raw_text"),
                    "reasoning", "response", "has_separator", "format_ok", "format_issue", "n_tokens", "finished",
                    "reasoning_forced",
                    "template_version", F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at"))
            # sampled once, here: Delta's MERGE plans its source anew and so ran the sampling again when
            # it was only persisted (the generation UDF answered every prompt twice)
            .localCheckpoint())
    made = rows.agg(F.count("*").alias("n"), F.sum("n_tokens").alias("tokens")).first()
    version = catalog.merge(spark, settings, rows, "trajectories", run_id, slice_={"variant": variant, "iteration": iteration})
    return made.n, made.tokens or 0, version


def run(spark, settings: Settings, *, variant: str, iteration: int, run_id: str, policy: str | None = None,
        force: bool = False) -> dict:
    """Sample m outputs per training input from the slice's policy (default: registry.sampling_policy)
    within the variant's budgets (`generation.limits`); `force` re-samples the whole slice."""
    from pyspark.sql import functions as F

    from restpg import generation, models, registry

    cfg = settings.sample
    policy = models.resolve_ref(policy or registry.sampling_policy(settings, variant, iteration), settings)
    if Path(policy).is_dir():  # one directory, one policy version, however the caller spelt its path
        policy = str(Path(policy).resolve())
    slice_ = {"variant": variant, "iteration": iteration}
    cap = generation.output_cap(settings, variant)
    done, stale = slice_state(spark, settings, slice_, policy, cfg.m)
    version = None
    if stale or (force and catalog.exists(spark, settings, "trajectories")):
        version = keep_policy_rows(spark, settings, slice_, None if force else policy, run_id)
        done = set() if force else done
    examples = training_inputs(spark, settings)
    all_ids = sorted(r.example_id for r in examples.select("example_id").collect())
    todo = [e for e in all_ids if e not in done]
    say(f"sample {variant} t={iteration}: {len(all_ids)} inputs x m={cfg.m}, {len(all_ids) - len(todo)} already done "
        f"by {policy}, {stale} rows of another policy replaced, at most {cap} new tokens each")
    started, tokens, sampled_rows = time.time(), 0, 0
    if todo:
        examples = examples.where(F.col("example_id").isin(todo))
        previous = previous_reasoning(spark, settings, variant, iteration)
        if previous is not None:
            previous = previous.localCheckpoint()
            say(f"sample {variant} t={iteration}: {previous.count()} of {len(all_ids)} prompts carry iteration "
                f"{iteration - 1}'s merged reasoning to revise (the others had no well-formed sample)")
        inputs = (policy_prompts(spark, settings, examples, variant, previous=previous)
                  .join(examples.select("example_id", "task"), "example_id").cache())
        try:
            for start in range(0, len(todo), cfg.chunk_examples):
                made, made_tokens, version = _sample_chunk(
                    spark, settings, inputs, todo[start:start + cfg.chunk_examples], variant=variant,
                    iteration=iteration, policy=policy, run_id=run_id)
                tokens, sampled_rows = tokens + made_tokens, sampled_rows + made
                rate = tokens / max(time.time() - started, 1e-9)
                progress(f"sample {variant} t={iteration} [{rate:.0f} tokens/s] rows", sampled_rows, len(todo) * cfg.m, started)
        finally:
            inputs.unpersist()
    elapsed = time.time() - started
    return {"policy": policy, "max_new_tokens": cap, "sampled_examples": len(todo), "sampled_rows": sampled_rows,
            "replaced_rows": stale, "version": version, "seconds": round(elapsed, 1),
            "tokens_per_s": round(tokens / elapsed, 1) if todo and elapsed else None,
            **_format_stats(spark, settings, slice_)}
