"""Evaluation (paper Sec. 4, Table 1): each variant's final policy answers the evaluation split at
temperature 0.1; responses (reasoning stripped) get the judge score, ROUGE-1, ROUGE-L and METEOR;
the summary holds per-task and macro means and paired t-tests between variants.

A policy answers within its variant's budget (`prompts.output_budget`: the response budget for plain
variants, reasoning + response for reasoning variants) and every answer is checked with
`prompts.parse_output`: an output whose format is not ok (no separator, a separator the decoder had to
write or one written twice, an empty part, cut at the length cap) counts as an empty response — judge
score 0, ROUGE and METEOR 0 — so a variant cannot gain by rambling past its cap. A PAT policy trained
with iterative refinement (`loop.pat_refine`, T ≥ 2) answers in two passes, as it was trained: the
first writes a merged reasoning, the second prompt carries it (`policy_pat_refine`) and its answer is
the prediction; an input whose first answer is malformed gets the plain PAT prompt again. The run also hands the promotion step its candidate: the version number of
the final policy of `candidate_variant(...)`, published as the task value `candidate_version`.
"""
from __future__ import annotations

import time
from dataclasses import astuple
from pathlib import Path
from typing import Iterator

import pandas as pd

from restpg import catalog, metrics, prompts, registry
from restpg.config import Settings
from restpg.policy_inputs import merged_part, policy_prompts, refines_at_evaluation
from restpg.rewards import kind_label
from restpg.tracking import progress, publish_task_value, say
from restpg.variants import check as check_variants, is_em

CANDIDATE_VERSION = "candidate_version"
# Task values `run` publishes; the bundle test resolves every `{{tasks.evaluate.values.<key>}}` against it.
PUBLISHES = (CANDIDATE_VERSION,)
PARSED = "struct<reasoning:string,response:string,format_ok:boolean,format_issue:string>"


def candidate_variant(names) -> str | None:
    """The variant proposed for promotion: rest_pg when present, else the last EM variant, else the last."""
    names = [n for n in names if ":" not in n]  # ablation-tagged systems are never candidates
    if not names:
        return None
    if "rest_pg" in names:
        return "rest_pg"
    em = [n for n in names if is_em(n)]
    return em[-1] if em else names[-1]


def registry_version(uri: str) -> str | None:
    """'7' of ``models:/<name>/7``; None for anything else (a path, an alias, a run URI)."""
    if not uri.startswith("models:/"):
        return None
    tail = uri.rsplit("/", 1)[1]
    return tail if tail.isdigit() else None


def _standing(spark, settings: Settings, name: str, slice_: dict, labels: list[str], stands, force: bool, run_id: str):
    """(variant, example_id) of the rows of these systems (`variant` in `labels`) in the slice that still
    stand (`stands(rows)` keeps them), or None when the table does not exist yet. A system whose rows do
    not all stand has the others removed first (all of them with `force`), so the chunks that follow only
    ever insert."""
    from pyspark.sql import functions as F

    if not catalog.exists(spark, settings, name):
        return None
    rows = catalog.read_slice(spark, settings, name, slice_).where(F.col("variant").isin(labels))
    kept = rows.limit(0) if force else stands(rows)
    have = {r.variant: r.n for r in rows.groupBy("variant").count().withColumnRenamed("count", "n").collect()}
    good = {r.variant: r.n for r in kept.groupBy("variant").count().withColumnRenamed("count", "n").collect()}
    for label in sorted(v for v, n in have.items() if good.get(v, 0) < n):
        catalog.replace_slice(spark, settings, kept.where(F.col("variant") == label), name, {**slice_, "variant": label}, run_id)
    return catalog.read_slice(spark, settings, name, slice_).where(F.col("variant").isin(labels)) if have != good else kept


def _commit_chunks(pairs: list[tuple[str, str]], size: int, label: str, commit) -> int | None:
    """`commit(chunk)` for each chunk of `size` (system, example_id) pairs, with a progress line; the last
    version written."""
    version, started = None, time.time()
    for start in range(0, len(pairs), size):
        chunk = pairs[start:start + size]
        version = commit(chunk)
        progress(label, start + len(chunk), len(pairs), started)
    return version


def _missing(ids, labels: list[str], standing) -> list[tuple[str, str]]:
    """Sorted (system, example_id) pairs of `labels` × the example ids of `ids` without a standing row
    (only ids come to the driver)."""
    wanted = sorted(r.example_id for r in ids.select("example_id").distinct().collect())
    have = set() if standing is None else {(r.variant, r.example_id) for r in standing.select("variant", "example_id").collect()}
    return [(v, e) for v in labels for e in wanted if (v, e) not in have]


def _systems_label(labels) -> str:
    return labels[0] if len(labels) == 1 else f"{len(labels)} systems"


def evaluation_examples(spark, settings: Settings, split: str):
    """The split's examples, capped at `evaluate.max_examples` (lowest example ids first; 0 = all)."""
    examples = catalog.read_slice(spark, settings, "examples", {"split": split})
    if settings.evaluate.max_examples:
        examples = examples.orderBy("example_id").limit(settings.evaluate.max_examples)
    return examples


def predict(spark, settings: Settings, policies: dict[str, str], split: str, ablation: str, run_id: str,
            force: bool = False, examples=None) -> int:
    """Each system of `policies` (its label, which names its variant, → the model URI that answers) answers
    every example of `split` → its (ablation, variant, split) slice of eval_predictions. The answers are
    committed in chunks of `evaluate.chunk_examples` answers, each chunk one Spark job over all its systems
    and one insert-only MERGE. Answers by another model version are replaced; a rerun (after a kill)
    answers only the examples still missing; `force` answers all again."""
    from functools import reduce

    from pyspark.sql import functions as F

    from restpg import generation

    cfg, slice_, labels = settings.evaluate, {"ablation": ablation, "split": split}, list(policies)
    # `examples` replaces the split's rows, e.g. with profiles cut short (restpg.sparse_eval)
    examples = examples if examples is not None else evaluation_examples(spark, settings, split)
    answered_by = spark.createDataFrame(list(policies.items()), "variant string, _policy string")
    standing = _standing(spark, settings, "eval_predictions", slice_, labels,
                         lambda rows: rows.join(F.broadcast(answered_by), "variant")
                         .where(F.col("model_version") == F.col("_policy")).drop("_policy"), force, run_id)
    parse = F.udf(lambda variant, text, finished, forced:
                  astuple(prompts.parse_output(variant, text, bool(finished), bool(forced))), PARSED)

    def answer(inputs, variant: str, iteration: int):
        return generation.generate_df(inputs.select("example_id", "prompt"), policies[variant], settings, m=1,
                                      temperature=cfg.temperature, top_p=cfg.top_p, iteration=iteration,
                                      seed=settings.sample.seed, **generation.limits(settings, variant))

    def answers(variant: str, ids: list[str]):
        part = examples.where(F.col("example_id").isin(ids))
        inputs = policy_prompts(spark, settings, part, variant)
        if refines_at_evaluation(settings, variant):  # PAT trained to revise its merged reasoning: a first pass writes one
            first = (answer(inputs, variant, -2)
                     .withColumn("parsed", parse(F.lit(variant), "text", "finished", "reasoning_forced")))
            cut = F.udf(lambda r: merged_part(r, settings.prompt.max_item_chars), "string")
            previous = (first.where("parsed.format_ok").select("example_id", cut("parsed.reasoning").alias("previous"))
                        .where(F.col("previous") != "").localCheckpoint())
            inputs = policy_prompts(spark, settings, part, variant, previous=previous)
        return (answer(inputs, variant, -1).withColumn("variant", F.lit(variant))
                .join(inputs.select("example_id", "template_version"), "example_id")
                .join(part.select("example_id", "task", "user_id"), "example_id"))

    def commit(chunk: list[tuple[str, str]]) -> int:
        systems = sorted({v for v, _ in chunk}, key=labels.index)
        out = reduce(lambda a, b: a.unionByName(b), [answers(v, [e for w, e in chunk if w == v]) for v in systems])
        rows = (out.join(F.broadcast(answered_by), "variant")
                .withColumn("parsed", parse("variant", "text", "finished", "reasoning_forced"))
                .select(F.lit(ablation).alias("ablation"), "variant", F.col("_policy").alias("model_version"),
                        F.lit(split).alias("split"), "example_id", "task", "user_id", F.col("text").alias("raw_text"),
                        "parsed.reasoning", "parsed.response", "parsed.format_ok", "parsed.format_issue", "n_tokens",
                        "finished", "reasoning_forced", "template_version", F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at")))
        return catalog.merge(spark, settings, rows, "eval_predictions", run_id, slice_=slice_)

    version = _commit_chunks(_missing(examples, labels, standing), cfg.chunk_examples,
                             f"evaluate {_systems_label(labels)} on {split}: predictions", commit)
    return version if version is not None else catalog.version(spark, settings, "eval_predictions")


def _lexical(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for pdf in batches:
        r = [metrics.rouge(p, t) for p, t in zip(pdf["response"], pdf["target"])]
        yield pd.DataFrame({"variant": pdf["variant"], "example_id": pdf["example_id"], "rouge1": [x["rouge1"] for x in r],
                            "rougeL": [x["rougeL"] for x in r],
                            "meteor": [metrics.meteor(p, t) for p, t in zip(pdf["response"], pdf["target"])]})


def score(spark, settings: Settings, labels: list[str], split: str, ablation: str, run_id: str, force: bool = False) -> int:
    """Judge score, ROUGE and METEOR of these systems' eval_predictions slices → the same slices of
    eval_scores, committed in chunks like `predict` (one Spark job and one MERGE per chunk, all systems
    together). A score stands when it has the configured reward kind and was made for the prediction now
    in the slice (same model version, scored after it was written). A format failure is scored as the
    empty response it stands for: 0 on every metric."""
    from pyspark.sql import functions as F

    from restpg.rewards import add_rewards

    slice_, labels = {"ablation": ablation, "split": split}, list(labels)
    preds = (catalog.read_slice(spark, settings, "eval_predictions", slice_).where(F.col("variant").isin(labels))
             .withColumn("response", F.when(F.col("format_ok"), F.coalesce("response", F.lit(""))).otherwise(F.lit(""))))
    examples = catalog.read(spark, settings, "examples").select("example_id", "input", "target")
    written = preds.select("variant", "example_id", F.col("model_version").alias("_model"), F.col("created_at").alias("_predicted"))

    def stands(rows):
        return (rows.join(written, ["variant", "example_id"])
                .where((F.col("model_version") == F.col("_model")) & (F.col("created_at") >= F.col("_predicted"))
                       & (F.col("reward_kind") == kind_label(settings)))
                .drop("_model", "_predicted"))

    standing = _standing(spark, settings, "eval_scores", slice_, labels, stands, force, run_id)
    have = set() if standing is None else {(r.variant, r.example_id) for r in standing.select("variant", "example_id").collect()}
    todo = sorted(((r.variant, r.example_id) for r in preds.select("variant", "example_id").collect()),
                  key=lambda p: (labels.index(p[0]), p[1]))

    def commit(chunk: list[tuple[str, str]]) -> int:
        pairs = spark.createDataFrame(chunk, "variant string, example_id string")
        joined = preds.join(F.broadcast(pairs), ["variant", "example_id"]).join(examples, "example_id")
        lexical = joined.select("variant", "example_id", "response", "target").mapInPandas(
            _lexical, "variant string, example_id string, rouge1 double, rougeL double, meteor double")
        rewarded = add_rewards(spark, settings, joined.select("ablation", "variant", "model_version", "split", "example_id",
                                                              "task", "input", "target", "response"))
        rows = rewarded.join(lexical, ["variant", "example_id"]).select(
            "ablation", "variant", "model_version", "split", "example_id", "task", "reward_kind",
            F.when(F.col("response") == "", F.lit(0.0)).otherwise(F.col("reward")).alias("judge_score"),
            "rouge1", "rougeL", "meteor", F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at"))
        return catalog.merge(spark, settings, rows, "eval_scores", run_id, slice_=slice_)

    version = _commit_chunks([p for p in todo if p not in have], settings.evaluate.chunk_examples,
                             f"evaluate {_systems_label(labels)} on {split}: scores", commit)
    return version if version is not None else catalog.version(spark, settings, "eval_scores")


def summarize(spark, settings: Settings, split: str, ablation: str, run_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    scores = (catalog.read_slice(spark, settings, "eval_scores", {"ablation": ablation, "split": split})
              .drop("run_id", "created_at").toPandas())
    summary, tests = metrics.summarize(scores), metrics.pairwise_tests(scores, alpha=settings.evaluate.alpha)
    stamp = {"run_id": run_id, "created_at": pd.Timestamp.now(tz="UTC").tz_localize(None)}
    for name, pdf in (("eval_summary", summary), ("eval_tests", tests)):
        df = spark.createDataFrame(pdf.assign(**stamp), catalog.spec(name).struct()) if len(pdf) else \
            spark.createDataFrame([], catalog.spec(name).struct())
        catalog.replace_slice(spark, settings, df, name, {"ablation": ablation, "split": split}, run_id)
    return summary, tests


def output_report(spark, settings: Settings, split: str, ablation: str, names: list[str]) -> dict:
    """metrics.output_report of these variants' eval_predictions (format ok rate, issues, lengths)."""
    from pyspark.sql import functions as F

    pdf = (catalog.read_slice(spark, settings, "eval_predictions", {"ablation": ablation, "split": split})
           .where(F.col("variant").isin(names))
           .select("variant", "format_ok", "format_issue", "n_tokens", "reasoning", "response", "reasoning_forced")
           .toPandas())
    return metrics.output_report(pdf)


def reward_plot(spark, settings: Settings, split: str, ablation: str) -> str:
    pdf = (catalog.read_slice(spark, settings, "eval_scores", {"ablation": ablation, "split": split})
           .select("variant", "judge_score").toPandas())
    out = settings.home_dir / "reports" / f"eval_{split}{'_' + ablation.replace(':', '_') if ablation else ''}_reward_hist.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    groups = {v: g["judge_score"].tolist() for v, g in pdf.groupby("variant")}
    return metrics.reward_histogram_png(groups, out, f"evaluation reward ({kind_label(settings)}) on {split}")


def publish_candidate(policies: dict[str, str]) -> tuple[str | None, str]:
    """Publish the candidate's version number as the task value `candidate_version` ('' when the
    candidate is not a registered version: promote then chooses the candidate itself)."""
    variant = candidate_variant(policies)
    version = registry_version(policies[variant]) if variant else None
    if variant and version is None:
        say(f"candidate {variant} ({policies[variant]}) is not a registered model version: publishing ''")
    publish_task_value(CANDIDATE_VERSION, version or "")
    return variant, version or ""


def run(spark, settings: Settings, *, run_id: str, variants: list[str] | None = None,
        policies: dict[str, str] | None = None, split: str | None = None, ablation: str = "", force: bool = False) -> dict:
    """Evaluate `variants` (default settings.loop.variants, or the keys of `policies`) on `split`
    (default settings.evaluate.split). `policies` maps a variant to a model URI; a variant without one
    gets its final policy (registry.final_policy). Writes eval_predictions, eval_scores, eval_summary,
    eval_tests; on the main table (ablation '') publishes `candidate_version`. Predictions and scores are
    committed in chunks, so a rerun after a kill does only what is missing; `force` redoes them all."""
    split = split or settings.evaluate.split
    names = list(variants or (policies.keys() if policies else settings.loop.variants))
    policies = {v: (policies or {}).get(v) or registry.final_policy(settings, v, settings.loop.iterations)
                for v in check_variants(names)}
    for variant, policy in policies.items():
        say(f"evaluate {variant} on {split}: {policy}")
    predict(spark, settings, policies, split, ablation, run_id, force=force)
    score(spark, settings, list(policies), split, ablation, run_id, force=force)
    summary, tests = summarize(spark, settings, split, ablation, run_id)
    outputs = output_report(spark, settings, split, ablation, list(policies))
    plot = reward_plot(spark, settings, split, ablation)
    import mlflow

    if mlflow.active_run():  # an artifact store that refuses them is an error: the rerun resumes from the tables
        mlflow.log_artifact(plot, "plots")
        mlflow.log_dict(outputs, f"outputs_{split}{'_' + ablation.replace(':', '_') if ablation else ''}.json")
    result = {"split": split, "ablation": ablation, "policies": policies, "outputs": outputs,
              "table1": metrics.format_table1(summary, tests, ablation=ablation),
              "output_table": metrics.format_output_report(outputs), "plot": str(Path(plot))}
    if not ablation:
        result["candidate_variant"], result[CANDIDATE_VERSION] = publish_candidate(policies)
    return result
