"""PAT's SFT start (issue 11): teacher dual reasoning → `reasoning_paths`, then iteration 0 of `pat` →
`training_sets`.

The teacher sees what the policy will see — the user's own retrieved items and the peers' style and
topic cues of `peer_retrievals` (`policy_inputs.with_peer_items`) — plus the expected output, and
writes "Style: … Topic: … Merged: …" (template `teacher_pat`, which ends in "Style:", so the stored
path gets that prefix back; the extractive teacher writes the same slots from own items and cues). Its
paths are their own slice of `reasoning_paths` (teacher, template version), written by `reason.teacher_paths`
under the teacher's own prompt budget and flagged for copying as in `reason`. Training rows are the PAT
prompt → path + separator + expected output, left out for the same reasons and under the same budgets as
`sft_data`'s reasoning rows (its slots those of `teacher_pat`), so `pat` and `sft_reasoning` start from
comparable data.
"""
from __future__ import annotations

from restpg import catalog, prompts
from restpg.config import Settings
from restpg.policy_inputs import policy_prompts, training_inputs, with_peer_items
from restpg.tracking import say

VARIANT = "pat"
TEMPLATE = "teacher_pat"
PREFIX = prompts.SLOTS[TEMPLATE][0]


def path_slice(settings: Settings) -> dict:
    from restpg import reason

    return reason.path_slice(settings, TEMPLATE)


def write_paths(spark, settings: Settings, inputs, run_id: str) -> int:
    """Teacher dual-reasoning paths of `inputs` → their slice of reasoning_paths (replaced)."""
    from restpg.reason import teacher_paths

    slice_ = path_slice(settings)
    cued = with_peer_items(spark, settings, inputs).select("example_id", "task", "input", "target", "item_texts")
    out = teacher_paths(spark, settings, cued, slice_, run_id, TEMPLATE)
    return catalog.replace_slice(spark, settings, out, "reasoning_paths", slice_, run_id)


def run(spark, settings: Settings, *, run_id: str) -> dict:
    from pyspark.sql import functions as F

    from restpg.reason import path_stats
    from restpg.sft_data import REASONS, decide

    inputs = training_inputs(spark, settings).select("example_id", "task", "input", "target", "user_id", "split", "profile").cache()
    paths_version = write_paths(spark, settings, inputs, run_id)
    written = catalog.read_slice(spark, settings, "reasoning_paths", path_slice(settings))
    shares = {k: v for k, v in path_stats(written, run_id).items() if k.endswith("_share")}
    paths = written.select("example_id", "reasoning", "copied", "finished")
    decided = decide(spark, settings, inputs.join(paths, "example_id", "left"), prompts.SLOTS[TEMPLATE])
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
            "left_out": left_out, **shares}
