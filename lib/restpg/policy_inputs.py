"""Policy inputs: example + retrieved items → the prompt string, fitted to the token budget.

The same function builds the prompt for SFT data, E-step sampling, filtered training rows and
evaluation, so a model is always trained and queried on identical text.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import pandas as pd

from restpg import catalog, prompts
from restpg.config import Settings

PROMPT_COLUMNS = "example_id string, prompt string, prompt_truncated boolean, template_version string"


def training_inputs(spark, settings: Settings):
    """The run's training inputs, one definition for every stage (reasoning synthesis, SFT data,
    sampling): the train split, capped at `data.max_examples` (lowest example ids first)."""
    from pyspark.sql import functions as F

    examples = catalog.read(spark, settings, "examples").where(F.col("split") == "train")
    if settings.data.max_examples:
        examples = examples.orderBy("example_id").limit(settings.data.max_examples)
    return examples


def with_retrievals(spark, settings: Settings, examples=None):
    """Examples joined with their retrieved items (`item_texts`, best first; empty when none).
    Examples that already carry `item_texts` (e.g. the profile-shuffle check) keep them."""
    from pyspark.sql import functions as F

    examples = examples if examples is not None else catalog.read(spark, settings, "examples")
    if "item_texts" in examples.columns:
        return examples
    retrieved = (catalog.read(spark, settings, "retrievals").where(F.col("retriever") == settings.models.retriever)
                 .select("example_id", F.transform("items", lambda it: it["text"]).alias("item_texts")))
    joined = examples.join(retrieved, "example_id", "left")
    return joined.withColumn("item_texts", F.coalesce("item_texts", F.array().cast("array<string>")))


@lru_cache(maxsize=4)
def _tokenizer(ref: str, env_items: tuple):
    from restpg import models

    return models.load_tokenizer(ref, models.worker_settings(dict(env_items)))


def _fitter(kind: str, policy_ref: str, env: dict, budget: int, max_item_chars: int):
    def fit(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from restpg import generation

        tokenizer = _tokenizer(policy_ref, tuple(sorted(env.items())))
        overhead = generation.count_tokens(tokenizer, generation.render_chat(tokenizer, "")) - \
            generation.count_tokens(tokenizer, "")
        version = prompts.policy_template(kind).version
        for pdf in batches:
            out = []
            for row in pdf.itertuples():
                head, items, tail = prompts.policy_parts(kind, row.task, row.input, list(row.item_texts), max_item_chars)
                text, truncated = generation.fit_prompt(tokenizer, head, items, tail, budget - overhead)
                out.append((row.example_id, generation.render_chat(tokenizer, text), truncated, version))
            yield pd.DataFrame(out, columns=["example_id", "prompt", "prompt_truncated", "template_version"])
    return fit


def policy_prompts(spark, settings: Settings, examples, variant: str):
    """DataFrame(example_id, prompt, prompt_truncated, template_version) for `examples`."""
    from restpg import models

    kind = "sft_reasoning" if prompts.uses_reasoning(variant) else "sft"
    policy = models.resolve_ref(settings.models.policy, settings)
    models.checkpoint_dir(policy, settings)  # convert the packaged base once, on the driver
    fit = _fitter(kind, policy, models.worker_env(settings), settings.prompt.max_input_tokens, settings.prompt.max_item_chars)
    return with_retrievals(spark, settings, examples).select("example_id", "task", "input", "item_texts").mapInPandas(fit, PROMPT_COLUMNS)
