"""PAT's SFT start (issue 11): teacher dual reasoning → `reasoning_paths`, then iteration 0 of `pat` →
`training_sets`.

The teacher sees what the policy will see — the user's own retrieved items and the peers' style and
topic cues of `peer_retrievals` (`policy_inputs.with_peer_items`) — plus the expected output, and
writes "Style: … Topic: … Merged: …" (template `teacher_pat`, which ends in "Style:", so the stored
path gets that prefix back). Its paths are their own slice of `reasoning_paths` (teacher, template
version), flagged for copying as in `reason`. Training rows are the PAT prompt → path + separator +
expected output, left out for the same reasons and under the same budgets as `sft_data`'s reasoning
rows, so `pat` and `sft_reasoning` start from comparable data.
"""
from __future__ import annotations

from typing import Iterator

import pandas as pd

from restpg import catalog, prompts
from restpg.config import Settings
from restpg.policy_inputs import policy_prompts, training_inputs, with_peer_items
from restpg.tracking import say

VARIANT = "pat"
PREFIX = "Style:"


def teacher_parts(input_text: str, target: str, item_texts: list[str], max_item_chars: int):
    """(head, items, tail) of the teacher's dual-reasoning prompt; items one line each, '|'-separated."""
    head, tail = prompts.template("teacher_pat").parts(input=input_text, target=target)
    return head, [t[:max_item_chars].replace("\n", " ").strip() + " | " for t in item_texts], tail


def path_slice(settings: Settings) -> dict:
    from restpg import models

    return {"teacher": models.resolve_ref(settings.models.teacher, settings),
            "template_version": prompts.template("teacher_pat").version}


def _teacher_inputs(spark, settings: Settings, examples):
    from pyspark.sql import functions as F

    max_chars = settings.prompt.max_item_chars

    def parts(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            rows = [teacher_parts(r.input, r.target, list(r.item_texts), max_chars) for r in pdf.itertuples()]
            yield pd.DataFrame({"example_id": pdf["example_id"], "head": [h for h, _, _ in rows],
                                "items": [i for _, i, _ in rows], "tail": [t for _, _, t in rows]})

    joined = with_peer_items(spark, settings, examples).select("example_id", "input", "target", "item_texts")
    return (joined.mapInPandas(parts, "example_id string, head string, items array<string>, tail string")
            .select("example_id", F.struct("head", "items", "tail").alias("prompt")))


def write_paths(spark, settings: Settings, inputs, run_id: str) -> int:
    """Teacher dual-reasoning paths of `inputs` → their slice of reasoning_paths (replaced)."""
    from restpg.reason import teacher_paths

    slice_ = path_slice(settings)
    out = teacher_paths(spark, settings, _teacher_inputs(spark, settings, inputs), inputs, slice_, run_id, prefix=PREFIX)
    return catalog.replace_slice(spark, settings, out, "reasoning_paths", slice_, run_id)


def run(spark, settings: Settings, *, run_id: str) -> dict:
    from pyspark.sql import functions as F

    from restpg.sft_data import REASONS, decide

    inputs = training_inputs(spark, settings).select("example_id", "task", "input", "target", "user_id", "split", "profile").cache()
    paths_version = write_paths(spark, settings, inputs, run_id)
    paths = (catalog.read_slice(spark, settings, "reasoning_paths", path_slice(settings))
             .select("example_id", "reasoning", "copied", "finished"))
    decided = decide(spark, settings, inputs.join(paths, "example_id", "left"))
    kept = decided.where(F.col("reasoning_reason").isNull())
    completion = F.udf(lambda r, t: prompts.join_reasoning(r, t), "string")("reasoning", "target")
    out = (policy_prompts(spark, settings, kept.select("example_id", "task", "input", "user_id", "split", "profile"), VARIANT)
           .join(kept.select("example_id", "task", "target", "reasoning"), "example_id")
           .select(F.lit(VARIANT).alias("variant"), F.lit(0).alias("iteration"), "example_id", F.lit(-1).alias("sample_index"),
                   "task", "prompt", completion.alias("completion"), F.lit(1.0).alias("weight"), F.lit("gold").alias("source"),
                   "template_version", F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at")))
    slice_ = {"variant": VARIANT, "iteration": 0}
    version = catalog.replace_slice(spark, settings, out, "training_sets", slice_, run_id)
    n = catalog.read_slice(spark, settings, "training_sets", slice_).count()
    counted = {r[0]: r[1] for r in decided.where(F.col("reasoning_reason").isNotNull()).groupBy("reasoning_reason").count().collect()}
    left_out = {k: int(counted.get(k, 0)) for k in REASONS}
    n_inputs = inputs.count()
    inputs.unpersist()
    if any(left_out.values()):
        say(f"pat_sft: {n} of {n_inputs} training inputs kept; left out {left_out}")
    return {"version": version, "paths_version": paths_version, **path_slice(settings), "inputs": n_inputs, "rows": n,
            "left_out": left_out, "trimmed_at_cap": kept.where("trimmed").count()}
