"""Reasoning synthesis (paper Sec. 3.1, Fig. 7): the teacher explains, from the retrieved profile,
how this user's preferences and style lead to the expected output → `reasoning_paths`.

Written for the run's training inputs (`policy_inputs.training_inputs`, so `data.max_examples`
caps the teacher's work too), in the labelled slots of the teacher template (`prompts.SLOTS`:
"Style: … / Topics: … / Plan: …"), at most `prompt.max_reasoning_tokens` tokens each: the same budget
the policy gets for its reasoning. The teacher's prompt has a budget of its own,
`reason.max_input_tokens`: its instruction, worked example, input and expected output take room the
policy's prompt does not have, and cut to the policy's budget it lost every profile item (a teacher
that cannot see the profile can only paraphrase the instruction). An answer whose slots are all there
is kept up to the end of its last slot's line and counts as finished even if the teacher went on
(`slotted`); `n_tokens` stays what the teacher generated. `models.teacher: extractive` writes the slots
without a model (`extractive`), in the same stage and rows.

A path that copies the expected output is flagged, not dropped here; `sft_data` leaves flagged, empty,
unfinished and malformed paths out of the training data. Paths are committed in chunks (insert-only
MERGE on the slice's keys), so a killed run keeps its finished chunks and the rerun writes only the
missing paths. `run` reports the share of teacher prompts that lost profile (`truncated_share`) and of
paths that ended (`finished_share`).
"""
from __future__ import annotations

import re
import time
from typing import Iterator

import pandas as pd

from restpg import catalog, extractive, prompts
from restpg.config import Settings
from restpg.policy_inputs import training_inputs, with_retrievals
from restpg.tracking import progress, say

_WORD = re.compile(r"\w+")
TEMPLATE = "teacher_reasoning"


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


def teacher_ref(settings: Settings) -> str:
    """The `teacher` its paths record: the extractive teacher's version, or the (pinned) model reference."""
    from restpg import models

    if extractive.is_extractive(settings.models.teacher):
        return extractive.VERSION
    return models.resolve_ref(settings.models.teacher, settings)


def path_slice(settings: Settings, template: str = TEMPLATE) -> dict:
    """The (teacher, template_version) slice of `reasoning_paths` the configured teacher writes."""
    return {"teacher": teacher_ref(settings), "template_version": prompts.template(template).version}


def teacher_prompts(settings: Settings, inputs, template: str = TEMPLATE):
    """(example_id, prompt struct<head, items, tail>) for the teacher, from `inputs` (example_id, input,
    target, item_texts); generation fits it to `reason.max_input_tokens`."""
    from pyspark.sql import functions as F

    max_chars, max_target = settings.prompt.max_item_chars, settings.reason.max_target_chars

    def parts(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            rows = [prompts.teacher_parts(r.input, r.target, list(r.item_texts), max_chars, max_target, template)
                    for r in pdf.itertuples()]
            yield pd.DataFrame({"example_id": pdf["example_id"], "head": [h for h, _, _ in rows],
                                "items": [i for _, i, _ in rows], "tail": [t for _, _, t in rows]})

    return (inputs.select("example_id", "input", "target", "item_texts")
            .mapInPandas(parts, "example_id string, head string, items array<string>, tail string")
            .select("example_id", F.struct("head", "items", "tail").alias("prompt")))


def slotted(raw: str | None, slots: tuple[str, ...], finished: bool) -> tuple[str, bool]:
    """(reasoning, ended) of a teacher's answer to a prompt that ends with `slots[0]`: the label put back in
    front unless the teacher wrote it itself, each label starting its own line; when every slot is there,
    once and in order, and the last slot's line ended (a line break after it, or the teacher stopped), the
    text up to that line's end and True; else the text as written and `finished`."""
    text = (raw or "").lstrip()
    if not text.strip():
        return "", bool(finished)
    if not text.startswith(slots[0]):
        text = f"{slots[0]} {text}"
    text = re.sub(r"(?<=\S)[ \t]+(?=(?:" + "|".join(re.escape(s) for s in slots) + "))", "\n", text)
    lines = text.split("\n")
    starts = [(i, s) for i, line in enumerate(lines) for s in slots if line.lstrip().startswith(s)]
    if [s for _, s in starts] != list(slots) or not (finished or starts[-1][0] < len(lines) - 1):
        return text.strip(), bool(finished)
    return "\n".join(line.strip() for line in lines[:starts[-1][0] + 1] if line.strip()), True


def teacher_paths(spark, settings: Settings, inputs, slice_: dict, run_id: str, template: str = TEMPLATE):
    """reasoning_paths rows for `inputs` (example_id, task, input, target, item_texts): the teacher's answer
    to `template` within the reasoning budget (or the extractive teacher's slots), flagged `copied` when it
    quotes the target."""
    from pyspark.sql import functions as F

    from restpg import generation

    cfg, slots = settings.reason, prompts.SLOTS[template]
    if extractive.is_extractive(settings.models.teacher):
        samples = extractive.write_df(settings, inputs, slots)
    else:
        samples = generation.generate_df(
            teacher_prompts(settings, inputs, template), slice_["teacher"], settings, m=1, temperature=cfg.temperature,
            top_p=cfg.top_p, max_new_tokens=settings.prompt.max_reasoning_tokens, iteration=0, seed=settings.sample.seed,
            chat=True, budget=cfg.max_input_tokens)
    n, threshold = cfg.copy_ngram, cfg.copy_threshold
    ended = F.udf(lambda raw, finished: slotted(raw, slots, finished), "struct<reasoning string, finished boolean>")
    overlap = F.udf(lambda r, t: copy_overlap(r or "", t or "", n), "double")
    return (samples.join(inputs.select("example_id", "task", "target"), "example_id")
            .withColumn("path", ended("text", "finished"))
            .select("example_id", "task", F.lit(slice_["teacher"]).alias("teacher"),
                    F.lit(slice_["template_version"]).alias("template_version"), F.col("path.reasoning").alias("reasoning"),
                    overlap(F.col("path.reasoning"), F.col("target")).alias("copy_overlap"),
                    "prompt_truncated", "n_tokens", F.col("path.finished").alias("finished"))
            .withColumn("copied", F.col("copy_overlap") > threshold)
            .withColumn("run_id", F.lit(run_id)).withColumn("created_at", F.current_timestamp()))


def _reason_chunk(spark, settings: Settings, part, slice_: dict, run_id: str) -> int:
    """Teacher paths of the examples in `part`, committed with an insert-only MERGE; the new version."""
    inputs = with_retrievals(spark, settings, part).select("example_id", "task", "input", "target", "item_texts")
    out = teacher_paths(spark, settings, inputs, slice_, run_id)
    return catalog.merge(spark, settings, out, "reasoning_paths", run_id, slice_=slice_)


def path_stats(paths, run_id: str) -> dict:
    """Counts and shares of a slice's paths (`truncated_share`: teacher prompts that lost profile;
    `finished_share`: paths that ended before the length cap)."""
    from pyspark.sql import functions as F

    stats = paths.agg(
        F.count("*").alias("rows"), F.sum(F.col("copied").cast("int")).alias("copied"),
        F.sum(F.when(F.length(F.trim("reasoning")) == 0, 1).otherwise(0)).alias("empty"),
        F.sum(F.col("prompt_truncated").cast("int")).alias("prompts_truncated"),
        F.sum((~F.col("finished")).cast("int")).alias("at_length_cap"),
        F.sum(F.when(F.col("run_id") == run_id, 1).otherwise(0)).alias("generated"),
        F.avg("copy_overlap").alias("mean_copy_overlap")).first().asDict()
    stats = {k: (v if v is not None else 0) for k, v in stats.items()}
    rows = stats["rows"]
    stats["truncated_share"] = stats["prompts_truncated"] / rows if rows else 0.0
    stats["finished_share"] = (rows - stats["at_length_cap"]) / rows if rows else 0.0
    return stats


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
    stats = path_stats(mine, run_id)
    examples.unpersist()
    say(f"reason: {stats['truncated_share']:.0%} of the teacher prompts lost profile items, "
        f"{stats['finished_share']:.0%} of the paths ended before the cap ({stats['rows']} paths)")
    if stats["copied"] or stats["empty"]:
        say(f"reason: {stats['copied']} copied and {stats['empty']} empty reasoning paths of {stats['rows']}; "
            "sft_data leaves them out")
    return {"version": written, **slice_, "inputs": inputs, "max_new_tokens": settings.prompt.max_reasoning_tokens,
            "reused": stats["rows"] - stats["generated"], **stats}
