"""Iteration-0 training sets: `sft` (prompt → y) and `sft_reasoning` (prompt → reasoning + separator + y).

Both variants start from the same inputs (`policy_inputs.training_inputs`) and drop the same
examples for a target that does not fit `prompt.max_response_tokens` in the policy's tokenizer, so
they compare like with like and no training target is silently cut. `sft_reasoning` also leaves out
examples whose teacher path would teach the policy a reasoning it must not write (a small policy learns
the shape of its training rows exactly): a path that is missing, empty or flagged as copying y; one the
teacher stopped at its length cap (`finished` false: it never ended, and trimmed back it still taught
open lists that end at the cap); a degenerate one — a slot of the teacher template missing, out of order
or repeated (`prompts.SLOTS`), a line repeated, or few distinct word n-grams (a loop); and one that does
not leave slack under `prompt.max_reasoning_tokens`: at most `REASONING_FILL` of it in the policy's
tokens, so the policy learns to end its reasoning well before the cap it samples under. Every example
left out is counted under the first reason in `REASONS` that applies.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterator

import pandas as pd

from restpg import catalog, prompts
from restpg import variants as V
from restpg.config import Settings
from restpg.policy_inputs import policy_prompts, training_inputs
from restpg.tracking import say

TARGET_TOO_LONG, NO_REASONING_PATH, EMPTY, COPIED, CUT_AT_CAP = (
    "target_too_long", "no_reasoning_path", "empty", "copied", "cut_at_cap")
MISSING_SLOTS, REPEATED_LINES, REPETITIVE, REASONING_TOO_LONG = (
    "missing_slots", "repeated_lines", "repetitive", "reasoning_too_long")
REASONS = (TARGET_TOO_LONG, NO_REASONING_PATH, EMPTY, COPIED, CUT_AT_CAP, MISSING_SLOTS, REPEATED_LINES, REPETITIVE,
           REASONING_TOO_LONG)  # first that applies is counted
DEGENERATE = (MISSING_SLOTS, REPEATED_LINES, REPETITIVE)
REASONING_FILL = 0.85  # share of prompt.max_reasoning_tokens a kept reasoning may take (policy tokens)
NGRAM, MIN_DISTINCT_SHARE = 3, 0.5  # a reasoning whose distinct word 3-grams are under half of them loops

_TOKEN = re.compile(r"\S+")


def fits(n_tokens: int, budget: int) -> bool:
    """A completion of `n_tokens` fits `budget` with room for the end-of-sequence token the policy
    learns to stop with (training keeps budget - 1 completion tokens, then EOS)."""
    return n_tokens + 1 <= budget


def reasoning_limit(max_reasoning_tokens: int) -> int:
    """The most policy tokens a kept reasoning may take: `REASONING_FILL` of the reasoning budget."""
    return int(REASONING_FILL * max_reasoning_tokens)


def degeneracy(reasoning: str, slots: tuple[str, ...] = ()) -> str | None:
    """Why a reasoning is degenerate, or None: its lines must open with `slots` (when given) exactly once each
    and in order, each with words after the label; no line twice; at least `MIN_DISTINCT_SHARE` of its
    (whitespace) word `NGRAM`-grams distinct."""
    lines = [" ".join(line.split()) for line in reasoning.split("\n") if line.strip()]
    if slots:
        opened = [(s, line[len(s):]) for line in lines for s in slots if line.startswith(s)]
        if [s for s, _ in opened] != list(slots) or not all(re.search(r"\w", rest) for _, rest in opened):
            return MISSING_SLOTS
    said = [line.lower() for line in lines if re.search(r"\w", line)]
    if len(set(said)) < len(said):
        return REPEATED_LINES
    tokens = _TOKEN.findall(reasoning.lower())
    grams = [tuple(tokens[i:i + NGRAM]) for i in range(len(tokens) - NGRAM + 1)]
    if grams and len(set(grams)) < MIN_DISTINCT_SHARE * len(grams):
        return REPETITIVE
    return None


def leave_out(uses_reasoning: bool, target_fits: bool, has_path: bool = True, empty: bool = False,
              copied: bool = False, cut: bool = False, degenerate: str | None = None,
              reasoning_fits: bool = True) -> str | None:
    """Why an example is not training data for a variant (None: it is), first reason in REASONS order;
    `degenerate` is `degeneracy`'s verdict."""
    if not target_fits:
        return TARGET_TOO_LONG
    if not uses_reasoning:
        return None
    if not has_path:
        return NO_REASONING_PATH
    if empty:
        return EMPTY
    if copied:
        return COPIED
    if cut:
        return CUT_AT_CAP
    if degenerate:
        return degenerate
    if not reasoning_fits:
        return REASONING_TOO_LONG
    return None


@lru_cache(maxsize=4)
def policy_tokenizer(ref: str, env_items: tuple):
    """The policy's tokenizer on an executor (`env_items`: sorted `models.worker_env` items), loaded once."""
    from restpg import models

    return models.load_tokenizer(ref, models.worker_settings(dict(env_items)))


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


DECISIONS = "example_id string, plain_reason string, reasoning_reason string"


def _decider(policy: str, env: dict, max_reasoning: int, max_response: int, slots: tuple[str, ...] = ()):
    """mapInPandas over (example_id, target, reasoning, copied, finished): each input's leave-out reason for
    a plain and for a reasoning variant (paths checked against the teacher template's `slots`)."""
    reasoning_budget = prompts.output_budget("sft_reasoning", max_reasoning, max_response)
    limit = reasoning_limit(max_reasoning)

    def decide(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        tokenizer = policy_tokenizer(policy, tuple(sorted(env.items())))
        for pdf in batches:
            plain, reasoned = [], []
            for r in pdf.itertuples():
                target_fits = fits(n_tokens(tokenizer, r.target), max_response)
                has_path = isinstance(r.reasoning, str)
                reasoning = (r.reasoning or "").strip() if has_path else ""
                # a null `finished` (a path written before it was recorded) counts as finished
                cut = bool(reasoning) and not pd.isna(r.finished) and not bool(r.finished)
                # the reasoning leaves slack under its budget, and the whole completion fits the cap
                # training and sampling share
                reasoning_fits = has_path and n_tokens(tokenizer, reasoning) <= limit and fits(
                    n_tokens(tokenizer, prompts.join_reasoning(reasoning, r.target)), reasoning_budget)
                plain.append(leave_out(False, target_fits))
                reasoned.append(leave_out(True, target_fits, has_path, not reasoning, bool(r.copied), cut,
                                          degeneracy(reasoning, slots) if reasoning else None, reasoning_fits))
            yield pd.DataFrame({"example_id": pdf["example_id"], "plain_reason": plain, "reasoning_reason": reasoned})
    return decide


def decide(spark, settings: Settings, rows, slots: tuple[str, ...] = prompts.SLOTS["teacher_reasoning"]):
    """`rows` (example_id, target, reasoning, copied, finished, …) with plain_reason / reasoning_reason added,
    materialised once; paths must have the teacher template's `slots`."""
    from restpg import models

    policy = models.executor_path(settings.models.policy, settings)  # resolved and converted once, on the driver
    decider = _decider(policy, models.worker_env(settings), settings.prompt.max_reasoning_tokens,
                       settings.prompt.max_response_tokens, slots)
    reasons = rows.select("example_id", "target", "reasoning", "copied", "finished").mapInPandas(decider, DECISIONS)
    spark.sparkContext.setJobDescription("sft_data: fit targets and reasoning to the policy's budgets")
    return rows.drop("finished").join(reasons, "example_id").localCheckpoint()


def _decisions(spark, settings: Settings, inputs, with_reasoning: bool):
    """inputs + the teacher's path (null without one) → `decide`."""
    from pyspark.sql import functions as F

    from restpg import reason

    if with_reasoning:
        paths = (catalog.read_slice(spark, settings, "reasoning_paths", reason.path_slice(settings))
                 .select("example_id", "reasoning", "copied", "finished"))
        rows = inputs.join(paths, "example_id", "left")
    else:
        rows = (inputs.withColumn("reasoning", F.lit(None).cast("string")).withColumn("copied", F.lit(None).cast("boolean"))
                .withColumn("finished", F.lit(None).cast("boolean")))
    return decide(spark, settings, rows)


def run(spark, settings: Settings, *, run_id: str, variants: list[str] | None = None) -> dict:
    from pyspark.sql import functions as F

    names = V.check(variants or V.SFT_NAMES)
    em = [n for n in names if V.is_em(n)]
    if em:
        raise ValueError(f"iteration-0 data exists for SFT variants ({', '.join(V.SFT_NAMES)}), not {', '.join(em)}")
    inputs = training_inputs(spark, settings).select("example_id", "task", "input", "target")
    decided = _decisions(spark, settings, inputs, any(V.uses_reasoning(n) for n in names))
    n_inputs = decided.count()
    result = {"inputs": n_inputs, "rows": 0, "variants": {}}
    for name in names:
        reasoning = V.uses_reasoning(name)
        reason_col = "reasoning_reason" if reasoning else "plain_reason"
        kept = decided.where(F.col(reason_col).isNull())
        rows = policy_prompts(spark, settings, kept.select("example_id", "task", "input"), name).join(
            kept.select("example_id", "task", "target", "reasoning"), "example_id")
        completion = F.udf(lambda r, t: prompts.join_reasoning(r, t), "string")("reasoning", "target") if reasoning else F.col("target")
        out = rows.select(
            F.lit(name).alias("variant"), F.lit(0).alias("iteration"), "example_id", F.lit(-1).alias("sample_index"),
            "task", "prompt", completion.alias("completion"), F.lit(1.0).alias("weight"), F.lit("gold").alias("source"),
            "template_version", F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at"))
        slice_ = {"variant": name, "iteration": 0}
        version = catalog.replace_slice(spark, settings, out, "training_sets", slice_, run_id)
        n = catalog.read_slice(spark, settings, "training_sets", slice_).count()
        counted = {r[0]: r[1] for r in decided.where(F.col(reason_col).isNotNull()).groupBy(reason_col).count().collect()}
        left_out = {k: int(counted.get(k, 0)) for k in (REASONS if reasoning else (TARGET_TOO_LONG,))}
        if any(left_out.values()):
            say(f"sft_data {name}: {n} of {n_inputs} training inputs kept; left out {left_out}")
        result["variants"][name] = {"version": version, "rows": n, "left_out": left_out}
        result["rows"] += n
    _log_metrics(result)
    empty = {name: r["left_out"] for name, r in result["variants"].items() if r["rows"] == 0}
    if empty:
        raise ValueError("sft_data: no training rows for " + "; ".join(
            f"{name} (all {n_inputs} inputs left out: {', '.join(f'{k}={v}' for k, v in why.items() if v)})"
            for name, why in empty.items())
            + f"; the budgets are prompt.max_response_tokens={settings.prompt.max_response_tokens} and "
              f"prompt.max_reasoning_tokens={settings.prompt.max_reasoning_tokens} (end-of-sequence included; a kept "
              f"reasoning takes at most {REASONING_FILL:.0%} of it)")
    return result


def _log_metrics(result: dict) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    metrics = {"sft_data.inputs": result["inputs"]}
    for name, r in result["variants"].items():
        metrics[f"sft_data.{name}.rows"] = r["rows"]
        metrics.update({f"sft_data.{name}.left_out.{k}": v for k, v in r["left_out"].items()})
    mlflow.log_metrics(metrics)
