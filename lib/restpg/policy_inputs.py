"""Policy inputs: example + retrieved items → the prompt string, fitted to the token budget.

The same function builds the prompt for SFT data, E-step sampling, filtered training rows and
evaluation, so a model is always trained and queried on identical text.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import pandas as pd

from restpg import catalog, prompts, tasks, variants
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


PAT_LABELS = {"own": "own", "style": "style cue", "topic": "topic cue"}


def pat_item_texts(own: list[str], peers: list[dict]) -> list[str]:
    """PAT's profile side: the user's own retrieved items first, then style and topic cues alternating
    by rank (so when the prompt is cut from the end, both trajectories lose alike), each labelled."""
    ordered = sorted(peers, key=lambda p: (p["rank"], p["trajectory"] != "style"))
    return ([f"({PAT_LABELS['own']}) {t}" for t in own]
            + [f"({PAT_LABELS[p['trajectory']]}) {p['text']}" for p in ordered])


def with_peer_items(spark, settings: Settings, examples=None, peers=None):
    """Examples joined with PAT's labelled `item_texts`: own retrieved items + the peers' cues of `peers`
    (rows shaped like `peer_retrievals`; default its `similar` slice). Without `peers`, examples that
    already carry `item_texts` keep them; with `peers`, their `item_texts` are the own items."""
    from pyspark.sql import functions as F

    examples = examples if examples is not None else catalog.read(spark, settings, "examples")
    if "item_texts" in examples.columns and peers is None:
        return examples
    if peers is None:
        peers = catalog.read_slice(spark, settings, "peer_retrievals", {"retriever": settings.models.retriever, "mode": "similar"})
    cues = peers.groupBy("example_id").agg(F.collect_list(F.struct("trajectory", "rank", "text")).alias("peers"))
    label = F.udf(lambda own, ps: pat_item_texts(list(own or []), [p.asDict() for p in ps or []]), "array<string>")
    joined = with_retrievals(spark, settings, examples).join(cues, "example_id", "left")
    return joined.withColumn("item_texts", label("item_texts", "peers")).drop("peers")


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
        version = (prompts.template("policy_pat") if kind == "pat" else prompts.policy_template(kind)).version
        for pdf in batches:
            out = []
            for row in pdf.itertuples():
                head, items, tail = (pat_parts(row.task, row.input, list(row.item_texts), max_item_chars) if kind == "pat"
                                     else prompts.policy_parts(kind, row.task, row.input, list(row.item_texts), max_item_chars))
                text, truncated = generation.fit_prompt(tokenizer, head, items, tail, budget - overhead)
                out.append((row.example_id, generation.render_chat(tokenizer, text), truncated, version))
            yield pd.DataFrame(out, columns=["example_id", "prompt", "prompt_truncated", "template_version"])
    return fit


def pat_parts(task: str, input_text: str, item_texts: list[str], max_item_chars: int):
    """(head, items, tail) of a PAT policy input (template `policy_pat`)."""
    head, tail = prompts.template("policy_pat").parts(instruction=tasks.resolve(task).instruction, input=input_text)
    return head, prompts.format_items(item_texts, max_item_chars), tail


def policy_prompts(spark, settings: Settings, examples, variant: str):
    """DataFrame(example_id, prompt, prompt_truncated, template_version) for `examples`."""
    from restpg import models

    peers = variants.uses_peers(variant)
    kind = "pat" if peers else "sft_reasoning" if prompts.uses_reasoning(variant) else "sft"
    policy = models.resolve_ref(settings.models.policy, settings)
    models.checkpoint_dir(policy, settings)  # convert the packaged base once, on the driver
    fit = _fitter(kind, policy, models.worker_env(settings), settings.prompt.max_input_tokens, settings.prompt.max_item_chars)
    joined = with_peer_items(spark, settings, examples) if peers else with_retrievals(spark, settings, examples)
    return joined.select("example_id", "task", "input", "item_texts").mapInPandas(fit, PROMPT_COLUMNS)
