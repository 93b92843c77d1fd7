"""Reasoning synthesis (paper Sec. 3.1, Fig. 7): the teacher explains, from the retrieved profile,
how this user's preferences and style lead to the expected output → `reasoning_paths`."""
from __future__ import annotations

import re
from typing import Iterator

import pandas as pd

from restpg import catalog, prompts
from restpg.config import Settings
from restpg.policy_inputs import with_retrievals

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


def run(spark, settings: Settings, run_id: str = "manual") -> dict:
    from pyspark.sql import functions as F

    from restpg import generation, models

    cfg, teacher = settings.reason, models.resolve_ref(settings.models.teacher, settings)
    version = prompts.template("teacher_reasoning").version
    examples = catalog.read(spark, settings, "examples").where(F.col("split") == "train")
    samples = generation.generate_df(
        teacher_inputs(spark, settings, examples), teacher, settings, m=1, temperature=cfg.temperature, top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens, iteration=0, seed=settings.sample.seed, chat=True)
    n, threshold = cfg.copy_ngram, cfg.copy_threshold
    overlap = F.udf(lambda r, t: copy_overlap(r or "", t or "", n), "double")
    out = (samples.join(examples.select("example_id", "task", "target"), "example_id")
           .select("example_id", "task", F.lit(teacher).alias("teacher"), F.lit(version).alias("template_version"),
                   F.trim("text").alias("reasoning"), overlap(F.col("text"), F.col("target")).alias("copy_overlap"),
                   F.col("prompt_truncated"))
           .withColumn("copied", F.col("copy_overlap") > threshold)
           .withColumn("run_id", F.lit(run_id)).withColumn("created_at", F.current_timestamp()))
    written = catalog.replace_slice(spark, settings, out, "reasoning_paths",
                                    {"teacher": teacher, "template_version": version}, run_id)
    stats = (catalog.read(spark, settings, "reasoning_paths")
             .where((F.col("teacher") == teacher) & (F.col("template_version") == version))
             .agg(F.count("*").alias("rows"), F.sum(F.col("copied").cast("int")).alias("copied"),
                  F.sum(F.col("prompt_truncated").cast("int")).alias("prompts_truncated"),
                  F.sum(F.when(F.length("reasoning") == 0, 1).otherwise(0)).alias("empty"),
                  F.avg("copy_overlap").alias("mean_copy_overlap")).first().asDict())
    return {"version": written, "teacher": teacher, "template_version": version, **stats}
