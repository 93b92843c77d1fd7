"""Reasoning synthesis (paper Sec. 3.1, Fig. 7): the teacher explains, from the retrieved profile,
how this user's preferences and style lead to the expected output → `reasoning_paths`.

Written for the run's training inputs (`policy_inputs.training_inputs`, so `data.max_examples`
caps the teacher's work too), at most `prompt.max_reasoning_tokens` tokens each: the same budget the
policy gets for its reasoning. A path that copies the expected output is flagged, not dropped here;
`sft_data` leaves flagged and empty paths out of the training data.
"""
from __future__ import annotations

import re
from typing import Iterator

import pandas as pd

from restpg import catalog, prompts
from restpg.config import Settings
from restpg.policy_inputs import training_inputs, with_retrievals
from restpg.tracking import say

_WORD = re.compile(r"\w+")


def copy_overlap(reasoning: str, target: str, n: int) -> float:
    """Share of the reasoning's word n-grams that also occur in the expected output (copying)."""
    def grams(text):
        words = _WORD.findall(text.lower())
        return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]

    mine = grams(reasoning)
    if not mine:
        return 0.0
    theirs = set(grams(target))
    return sum(g in theirs for g in mine) / len(mine)


def teacher_inputs(spark, settings: Settings, examples):
    """(example_id, prompt struct<head, items, tail>) for the teacher."""
    from pyspark.sql import functions as F

    max_chars = settings.prompt.max_item_chars

    def parts(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            rows = [prompts.teacher_parts(r.input, r.target, list(r.item_texts), max_chars) for r in pdf.itertuples()]
            yield pd.DataFrame({"example_id": pdf["example_id"], "head": [h for h, _, _ in rows],
                                "items": [i for _, i, _ in rows], "tail": [t for _, _, t in rows]})

    joined = with_retrievals(spark, settings, examples).select("example_id", "input", "target", "item_texts")
    return (joined.mapInPandas(parts, "example_id string, head string, items array<string>, tail string")
            .select("example_id", F.struct("head", "items", "tail").alias("prompt")))


def path_slice(settings: Settings) -> dict:
    """The (teacher, template_version) slice of `reasoning_paths` the configured teacher writes."""
    from restpg import models

    return {"teacher": models.resolve_ref(settings.models.teacher, settings),
            "template_version": prompts.template("teacher_reasoning").version}


def run(spark, settings: Settings, *, run_id: str, resume: bool = False) -> dict:
    """Teacher reasoning for every training input. By default the slice is replaced (a rerun after a
    config change regenerates everything); `resume` keeps the slice's finished paths and writes only
    the missing ones (insert-only MERGE), so an interrupted run does not pay for them twice."""
    from pyspark.sql import functions as F

    from restpg import generation

    cfg, slice_ = settings.reason, path_slice(settings)
    examples = training_inputs(spark, settings).cache()
    todo = examples
    if resume and catalog.exists(spark, settings, "reasoning_paths"):
        done = catalog.read_slice(spark, settings, "reasoning_paths", slice_).select("example_id")
        todo = examples.join(done, "example_id", "left_anti")
    samples = generation.generate_df(
        teacher_inputs(spark, settings, todo), slice_["teacher"], settings, m=1, temperature=cfg.temperature,
        top_p=cfg.top_p, max_new_tokens=settings.prompt.max_reasoning_tokens, iteration=0, seed=settings.sample.seed,
        chat=True)
    n, threshold = cfg.copy_ngram, cfg.copy_threshold
    overlap = F.udf(lambda r, t: copy_overlap(r or "", t or "", n), "double")
    out = (samples.join(todo.select("example_id", "task", "target"), "example_id")
           .select("example_id", "task", F.lit(slice_["teacher"]).alias("teacher"),
                   F.lit(slice_["template_version"]).alias("template_version"),
                   F.trim("text").alias("reasoning"), overlap(F.col("text"), F.col("target")).alias("copy_overlap"),
                   "prompt_truncated", "n_tokens", "finished")
           .withColumn("copied", F.col("copy_overlap") > threshold)
           .withColumn("run_id", F.lit(run_id)).withColumn("created_at", F.current_timestamp()))
    if resume:
        written = catalog.merge(spark, settings, out, "reasoning_paths", run_id, slice_=slice_)
    else:
        written = catalog.replace_slice(spark, settings, out, "reasoning_paths", slice_, run_id)
    mine = (catalog.read_slice(spark, settings, "reasoning_paths", slice_)
            .join(examples.select("example_id"), "example_id"))
    stats = mine.agg(
        F.count("*").alias("rows"), F.sum(F.col("copied").cast("int")).alias("copied"),
        F.sum(F.when(F.length(F.trim("reasoning")) == 0, 1).otherwise(0)).alias("empty"),
        F.sum(F.col("prompt_truncated").cast("int")).alias("prompts_truncated"),
        F.sum((~F.col("finished")).cast("int")).alias("at_length_cap"),
        F.sum(F.when(F.col("run_id") == run_id, 1).otherwise(0)).alias("generated"),
        F.avg("copy_overlap").alias("mean_copy_overlap")).first().asDict()
    inputs = examples.count()
    examples.unpersist()
    stats = {k: (v if v is not None else 0) for k, v in stats.items()}
    if stats["copied"] or stats["empty"]:
        say(f"reason: {stats['copied']} copied and {stats['empty']} empty reasoning paths of {stats['rows']}; "
            "sft_data leaves them out")
    return {"version": written, **slice_, "inputs": inputs, "max_new_tokens": settings.prompt.max_reasoning_tokens,
            "reused": stats["rows"] - stats["generated"], **stats}
