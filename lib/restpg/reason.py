"""Reasoning synthesis (paper Sec. 3.1, Fig. 7): the teacher explains, from the retrieved profile,
how this user's preferences and style lead to the expected output → `reasoning_paths`.

Written for the run's training inputs (`policy_inputs.training_inputs`, so `data.max_examples`
caps the teacher's work too), at most `prompt.max_reasoning_tokens` tokens each: the same budget the
policy gets for its reasoning. A path that copies the expected output is flagged, not dropped here;
`sft_data` leaves flagged and empty paths out of the training data. Paths are committed in chunks
(insert-only MERGE on the slice's keys), so a killed run keeps its finished chunks and the rerun
writes only the missing paths.
"""
from __future__ import annotations

import re
import time
from typing import Iterator

import pandas as pd

from restpg import catalog, prompts
from restpg.config import Settings
from restpg.policy_inputs import training_inputs, with_retrievals
from restpg.tracking import progress, say

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


def with_prefix(text, prefix: str):
    """`prefix` before a non-empty text (the teacher's prompt ended with it, so its answer continues it),
    unless a chat-tuned teacher answered by writing the prefix itself; empty stays empty."""
    from pyspark.sql import functions as F

    return (F.when(F.length(text) == 0, F.lit("")).when(text.startswith(prefix), text)
            .otherwise(F.concat(F.lit(prefix + " "), text)))


def teacher_paths(spark, settings: Settings, teacher_prompts, part, slice_: dict, run_id: str, prefix: str = ""):
    """reasoning_paths rows: the teacher's answer to each of `teacher_prompts` (example_id, prompt) within
    the reasoning budget, `prefix` before a non-empty one, flagged `copied` when it quotes `part`'s target."""
    from pyspark.sql import functions as F

    from restpg import generation

    cfg = settings.reason
    samples = generation.generate_df(
        teacher_prompts, slice_["teacher"], settings, m=1, temperature=cfg.temperature, top_p=cfg.top_p,
        max_new_tokens=settings.prompt.max_reasoning_tokens, iteration=0, seed=settings.sample.seed, chat=True)
    n, threshold = cfg.copy_ngram, cfg.copy_threshold
    overlap = F.udf(lambda r, t: copy_overlap(r or "", t or "", n), "double")
    reasoning = with_prefix(F.trim("text"), prefix) if prefix else F.trim("text")
    return (samples.join(part.select("example_id", "task", "target"), "example_id")
            .select("example_id", "task", F.lit(slice_["teacher"]).alias("teacher"),
                    F.lit(slice_["template_version"]).alias("template_version"),
                    reasoning.alias("reasoning"), overlap(F.col("text"), F.col("target")).alias("copy_overlap"),
                    "prompt_truncated", "n_tokens", "finished")
            .withColumn("copied", F.col("copy_overlap") > threshold)
            .withColumn("run_id", F.lit(run_id)).withColumn("created_at", F.current_timestamp()))


def _reason_chunk(spark, settings: Settings, part, slice_: dict, run_id: str) -> int:
    """Teacher paths of the examples in `part`, committed with an insert-only MERGE; the new version."""
    out = teacher_paths(spark, settings, teacher_inputs(spark, settings, part), part, slice_, run_id)
    return catalog.merge(spark, settings, out, "reasoning_paths", run_id, slice_=slice_)


def missing_inputs(spark, settings: Settings, examples, slice_: dict) -> list[str]:
    """Sorted ids of `examples` without a path in the slice (only ids come to the driver)."""
    todo = examples.select("example_id")
    if catalog.exists(spark, settings, "reasoning_paths"):
        done = catalog.read_slice(spark, settings, "reasoning_paths", slice_).select("example_id")
        todo = todo.join(done, "example_id", "left_anti")
    return sorted(r.example_id for r in todo.collect())


def run(spark, settings: Settings, *, run_id: str, force: bool = False) -> dict:
    """Teacher reasoning for every training input, committed in chunks of `reason.chunk_examples`
    (insert-only MERGE on the slice's keys): a rerun — after a kill, or with more inputs — writes only
    the paths still missing, so an interrupted run does not pay for its finished chunks twice. `force`
    empties the slice first (the pipeline forces when the teacher's config changed)."""
    from pyspark.sql import functions as F

    cfg, slice_ = settings.reason, path_slice(settings)
    written = None
    if force and catalog.exists(spark, settings, "reasoning_paths"):
        empty = spark.createDataFrame([], catalog.spec("reasoning_paths").struct())
        written = catalog.replace_slice(spark, settings, empty, "reasoning_paths", slice_, run_id)
    examples = training_inputs(spark, settings).cache()
    todo = missing_inputs(spark, settings, examples, slice_)
    inputs = examples.count()
    say(f"reason: {inputs} training inputs, {inputs - len(todo)} already have a path by {slice_['teacher']}")
    started = time.time()
    for start in range(0, len(todo), cfg.chunk_examples):
        chunk = todo[start:start + cfg.chunk_examples]
        written = _reason_chunk(spark, settings, examples.where(F.col("example_id").isin(chunk)), slice_, run_id)
        progress("reason paths", start + len(chunk), len(todo), started)
    if written is None:
        written = catalog.version(spark, settings, "reasoning_paths")
    mine = (catalog.read_slice(spark, settings, "reasoning_paths", slice_)
            .join(examples.select("example_id"), "example_id"))
    stats = mine.agg(
        F.count("*").alias("rows"), F.sum(F.col("copied").cast("int")).alias("copied"),
        F.sum(F.when(F.length(F.trim("reasoning")) == 0, 1).otherwise(0)).alias("empty"),
        F.sum(F.col("prompt_truncated").cast("int")).alias("prompts_truncated"),
        F.sum((~F.col("finished")).cast("int")).alias("at_length_cap"),
        F.sum(F.when(F.col("run_id") == run_id, 1).otherwise(0)).alias("generated"),
        F.avg("copy_overlap").alias("mean_copy_overlap")).first().asDict()
    examples.unpersist()
    stats = {k: (v if v is not None else 0) for k, v in stats.items()}
    if stats["copied"] or stats["empty"]:
        say(f"reason: {stats['copied']} copied and {stats['empty']} empty reasoning paths of {stats['rows']}; "
            "sft_data leaves them out")
    return {"version": written, **slice_, "inputs": inputs, "max_new_tokens": settings.prompt.max_reasoning_tokens,
            "reused": stats["rows"] - stats["generated"], **stats}
