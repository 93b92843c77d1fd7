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
        version = None if kind == "pat" else prompts.policy_template(kind).version
        for pdf in batches:
            out = []
            for row in pdf.itertuples():
                if kind == "pat":
                    previous = getattr(row, "previous", None) or None
                    head, items, tail = pat_parts(row.task, row.input, list(row.item_texts), max_item_chars, previous)
                    row_version = pat_template(previous).version
                else:
                    head, items, tail = prompts.policy_parts(kind, row.task, row.input, list(row.item_texts), max_item_chars)
                    row_version = version
                text, truncated = generation.fit_prompt(tokenizer, head, items, tail, budget - overhead)
                out.append((row.example_id, generation.render_chat(tokenizer, text), truncated, row_version))
            yield pd.DataFrame(out, columns=["example_id", "prompt", "prompt_truncated", "template_version"])
    return fit


def pat_template(previous: str | None = None) -> prompts.Template:
    """`policy_pat`, or `policy_pat_refine` when the prompt carries an earlier merged reasoning."""
    return prompts.template("policy_pat_refine" if previous else "policy_pat")


def pat_parts(task: str, input_text: str, item_texts: list[str], max_item_chars: int, previous: str | None = None):
    """(head, items, tail) of a PAT policy input (template `pat_template(previous)`)."""
    values = {"instruction": tasks.resolve(task).instruction, "input": input_text}
    head, tail = pat_template(previous).parts(**values, **({"previous": previous} if previous else {}))
    return head, prompts.format_items(item_texts, max_item_chars), tail


# Iterative refinement (PAT, issue 11): from this EM iteration on, a PAT prompt carries the merged reasoning
# of the previous iteration's best well-formed sample for the same input, and the policy revises it.
REFINE_FROM = 2
MERGED = "Merged:"


def merged_part(reasoning: str | None, max_chars: int) -> str:
    """The "Merged:" part of a PAT reasoning (after its last label), else the whole reasoning; at most
    `max_chars` characters, one line. "" for none."""
    text = (reasoning or "").strip()
    if MERGED in text:
        text = text.rsplit(MERGED, 1)[1]
    return " ".join(text.split())[:max_chars].strip()


def refines(settings: Settings, variant: str, iteration: int) -> bool:
    """Whether `variant`'s prompts at EM iteration `iteration` carry the previous iteration's reasoning."""
    return variants.uses_peers(variant) and settings.loop.pat_refine and iteration >= REFINE_FROM


def refines_at_evaluation(settings: Settings, variant: str) -> bool:
    """Whether the final policy was trained on refinement prompts, so evaluation answers in two passes."""
    return refines(settings, variant, settings.loop.iterations)


def previous_reasoning(spark, settings: Settings, variant: str, iteration: int):
    """DataFrame(example_id, previous) of iteration `iteration` - 1: the merged reasoning of each input's best
    well-formed judged sample (highest reward, then lowest sample index); None when `iteration` does not
    refine. Inputs whose samples were all malformed get no row (their prompt is the plain PAT prompt)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from restpg import rewards

    if not refines(settings, variant, iteration):
        return None
    prior = {"variant": variant, "iteration": iteration - 1}
    if not (catalog.exists(spark, settings, "judge_scores") and catalog.exists(spark, settings, "trajectories")):
        raise LookupError(f"refining {variant} at iteration {iteration} needs iteration {iteration - 1}'s judged samples: "
                          f"run `restpg sample` and `restpg judge` for it first")
    scored = (catalog.read_slice(spark, settings, "judge_scores", {**prior, "reward_kind": rewards.kind_label(settings)})
              .where("format_ok").select("example_id", "sample_index", "reward"))
    best = Window.partitionBy("example_id").orderBy(F.col("reward").desc(), F.col("sample_index").asc())
    top = scored.withColumn("_rank", F.row_number().over(best)).where("_rank = 1").drop("_rank", "reward")
    texts = catalog.read_slice(spark, settings, "trajectories", prior).select("example_id", "sample_index", "reasoning")
    cut = F.udf(lambda r: merged_part(r, settings.prompt.max_item_chars), "string")
    return (top.join(texts, ["example_id", "sample_index"]).select("example_id", cut("reasoning").alias("previous"))
            .where(F.col("previous") != ""))


def policy_prompts(spark, settings: Settings, examples, variant: str, previous=None):
    """DataFrame(example_id, prompt, prompt_truncated, template_version) for `examples`; `previous`
    (example_id, previous: a PAT variant's earlier merged reasoning) makes those inputs refinement prompts."""
    from pyspark.sql import functions as F

    from restpg import models

    peers = variants.uses_peers(variant)
    kind = "pat" if peers else "sft_reasoning" if prompts.uses_reasoning(variant) else "sft"
    if previous is not None and not peers:
        raise ValueError(f"{variant} does not refine earlier reasoning: only PAT variants take `previous`")
    policy = models.executor_path(settings.models.policy, settings)  # resolved and converted once, on the driver
    fit = _fitter(kind, policy, models.worker_env(settings), settings.prompt.max_input_tokens, settings.prompt.max_item_chars)
    joined = with_peer_items(spark, settings, examples) if peers else with_retrievals(spark, settings, examples)
    columns = ["example_id", "task", "input", "item_texts"]
    if peers:
        joined = (joined.join(previous.select("example_id", "previous"), "example_id", "left") if previous is not None
                  else joined.withColumn("previous", F.lit(None).cast("string")))
        columns.append("previous")
    return joined.select(*columns).mapInPandas(fit, PROMPT_COLUMNS)
