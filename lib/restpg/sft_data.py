"""Iteration-0 training sets: `sft` (prompt → y) and `sft_reasoning` (prompt → reasoning + separator + y).

Both variants start from the same inputs (`policy_inputs.training_inputs`) and drop the same
examples for a target that does not fit `prompt.max_response_tokens` in the policy's tokenizer, so
they compare like with like and no training target is silently cut. `sft_reasoning` also leaves out
examples whose reasoning path is missing, empty, flagged as copying y, or longer than
`prompt.max_reasoning_tokens`; every example left out is counted under one reason. A path the teacher
stopped at its length cap ends mid-thought: it is cut back to its last complete sentence or line
(`prompts.complete_part`, counted as `trimmed_at_cap`), so the policy does not learn a reasoning that
breaks off into the separator. A path without one complete sentence has nothing shorter to keep and is
used as written (leaving it out would cost `sft_reasoning` the example that `sft` trains on).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import pandas as pd

from restpg import catalog, prompts
from restpg import variants as V
from restpg.config import Settings
from restpg.policy_inputs import policy_prompts, training_inputs
from restpg.tracking import say

TARGET_TOO_LONG, NO_REASONING_PATH, EMPTY, COPIED, REASONING_TOO_LONG = (
    "target_too_long", "no_reasoning_path", "empty", "copied", "reasoning_too_long")
REASONS = (TARGET_TOO_LONG, NO_REASONING_PATH, EMPTY, COPIED, REASONING_TOO_LONG)  # first that applies is counted


def fits(n_tokens: int, budget: int) -> bool:
    """A completion of `n_tokens` fits `budget` with room for the end-of-sequence token the policy
    learns to stop with (training keeps budget - 1 completion tokens, then EOS)."""
    return n_tokens + 1 <= budget


def leave_out(uses_reasoning: bool, target_fits: bool, has_path: bool = True, empty: bool = False,
              copied: bool = False, reasoning_fits: bool = True) -> str | None:
    """Why an example is not training data for a variant (None: it is), first reason in REASONS order."""
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
    if not reasoning_fits:
        return REASONING_TOO_LONG
    return None


@lru_cache(maxsize=4)
def _tokenizer(ref: str, env_items: tuple):
    from restpg import models

    return models.load_tokenizer(ref, models.worker_settings(dict(env_items)))


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


DECISIONS = "example_id string, plain_reason string, reasoning_reason string, reasoning string, trimmed boolean"


def _decider(policy: str, env: dict, max_reasoning: int, max_response: int):
    """mapInPandas over (example_id, target, reasoning, copied, finished): each input's leave-out reason for
    a plain and for a reasoning variant, and the reasoning to train on (cut back to its last complete
    sentence when the teacher stopped at its cap; `trimmed` says so)."""
    reasoning_budget = prompts.output_budget("sft_reasoning", max_reasoning, max_response)

    def decide(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        tokenizer = _tokenizer(policy, tuple(sorted(env.items())))
        for pdf in batches:
            plain, reasoned, kept, trimmed = [], [], [], []
            for r in pdf.itertuples():
                target_fits = fits(_n_tokens(tokenizer, r.target), max_response)
                has_path = isinstance(r.reasoning, str)
                reasoning = (r.reasoning or "").strip() if has_path else ""
                # a null `finished` (a path written before it was recorded) counts as finished
                at_cap = bool(reasoning) and not pd.isna(r.finished) and not bool(r.finished)
                complete = (prompts.complete_part(reasoning) if at_cap else "") or reasoning
                # the teacher wrote the path within the reasoning budget (its own cap); what must fit in
                # the policy's tokens is the whole completion, under the cap training and sampling share
                reasoning_fits = has_path and fits(
                    _n_tokens(tokenizer, prompts.join_reasoning(complete, r.target)), reasoning_budget)
                plain.append(leave_out(False, target_fits))
                reasoned.append(leave_out(True, target_fits, has_path, not reasoning, bool(r.copied), reasoning_fits))
                kept.append(complete if has_path else None)
                trimmed.append(complete != reasoning)
            yield pd.DataFrame({"example_id": pdf["example_id"], "plain_reason": plain, "reasoning_reason": reasoned,
                                "reasoning": kept, "trimmed": trimmed})
    return decide


def decide(spark, settings: Settings, rows):
    """`rows` (example_id, target, reasoning, copied, finished, …) with `reasoning` replaced by the one to
    train on and plain_reason / reasoning_reason / trimmed added, materialised once."""
    from restpg import models

    policy = models.resolve_ref(settings.models.policy, settings)
    models.checkpoint_dir(policy, settings)  # convert the packaged base once, on the driver
    decider = _decider(policy, models.worker_env(settings), settings.prompt.max_reasoning_tokens, settings.prompt.max_response_tokens)
    reasons = rows.select("example_id", "target", "reasoning", "copied", "finished").mapInPandas(decider, DECISIONS)
    spark.sparkContext.setJobDescription("sft_data: fit targets and reasoning to the policy's budgets")
    return rows.drop("reasoning", "finished").join(reasons, "example_id").localCheckpoint()


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
        if reasoning:
            result["variants"][name]["trimmed_at_cap"] = kept.where("trimmed").count()
        result["rows"] += n
    _log_metrics(result)
    empty = {name: r["left_out"] for name, r in result["variants"].items() if r["rows"] == 0}
    if empty:
        raise ValueError("sft_data: no training rows for " + "; ".join(
            f"{name} (all {n_inputs} inputs left out: {', '.join(f'{k}={v}' for k, v in why.items() if v)})"
            for name, why in empty.items())
            + f"; the budgets are prompt.max_response_tokens={settings.prompt.max_response_tokens} and "
              f"prompt.max_reasoning_tokens={settings.prompt.max_reasoning_tokens} (end-of-sequence included)")
    return result


def _log_metrics(result: dict) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    metrics = {"sft_data.inputs": result["inputs"]}
    for name, r in result["variants"].items():
        metrics[f"sft_data.{name}.rows"] = r["rows"]
        metrics.update({f"sft_data.{name}.left_out.{k}": v for k, v in r["left_out"].items()})
        if "trimmed_at_cap" in r:
            metrics[f"sft_data.{name}.trimmed_at_cap"] = r["trimmed_at_cap"]
    mlflow.log_metrics(metrics)
