"""Use the champion: requests (a Delta table or a JSON-lines file) → the `@champion` policy's answers → `generations`.

A request is ``{request_id, user_id, task, input}``. Each is answered as evaluation answers an example: the
top-k items of the user's profile (every profile item of the user's rows in `examples`, embedded with the
retriever and ranked by `retrieve.top_k`), the policy prompt of the champion's variant (`policy_prompts`,
the variant read from the version's tags with `get_model_version`), decoded at the evaluation temperature
within the variant's budgets, split into reasoning and response and format-checked by `prompts.parse_output`.

Every keyed request gets one row per model version (keys request_id, model_version), with a status:
``ok`` (answered), ``no_profile`` (the user has no profile items: nothing to personalise from) or
``invalid`` (missing field, unknown task, empty or over-long input; `reason` says which). A record without a
request id (or not a JSON object, or a repeated request id) cannot be keyed: it goes to `quarantine`, as
ingest's refused records do. A rerun answers only what has no `ok` row for the current champion (a user who
since got a profile is answered then); a new champion version answers every request again, next to the old
rows. Answers are committed in chunks of `evaluate.chunk_examples`, so a killed run keeps what it finished.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import astuple

import numpy as np
import pandas as pd

from restpg import catalog, prompts, registry, tasks, variants
from restpg.config import Settings
from restpg.retrieve import top_k
from restpg.tracking import progress, say

OK, NO_PROFILE, INVALID = "ok", "no_profile", "invalid"
FIELDS = ("request_id", "user_id", "task", "input")
PARSED_SCHEMA = "record_number long, raw_record string, request_id string, user_id string, task string, input string, reason string"
ITEMS_SCHEMA = "request_id string, items array<string>"


class NoChampion(LookupError):
    """The policy model has no `champion` alias yet."""


def parse_request(line: str, max_chars: int = 0) -> tuple[dict, str | None]:
    """One raw record → (its fields, None) or (whatever fields it has, why it cannot be answered).
    The fields hold `request_id` only when the record can be keyed; the task is its canonical name."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, TypeError) as e:
        return {}, f"not JSON: {getattr(e, 'msg', e)}"
    if not isinstance(rec, dict):
        return {}, f"not a JSON object but {type(rec).__name__}"
    if "\x00" in line or any(isinstance(v, str) and "\x00" in v for v in rec.values()):
        return {}, "contains NUL characters"
    fields = {}
    for key in FIELDS:
        value = rec.get(key)
        reason = (f"missing {key}" if value is None
                  else f"{key} is a {type(value).__name__}, not a string" if isinstance(value, bool) or not isinstance(value, (str, int))
                  else f"empty {key}" if str(value).strip() == "" else None)
        if reason:
            return fields, reason if key != "request_id" else f"request without a usable request_id ({reason})"
        fields[key] = str(value)
    spec = tasks.resolve(fields["task"])
    if spec is None:
        return fields, f"unknown task {fields['task']!r}; known: {', '.join(tasks.TASKS)}"
    fields["task"] = spec.name
    if not isinstance(rec["input"], str):
        return fields, "input is not a string"
    if max_chars > 0 and len(fields["input"]) > max_chars:
        return fields, f"input too long: {len(fields['input'])} characters (data.max_field_chars {max_chars})"
    return fields, None


def champion(settings: Settings) -> tuple[str, str]:
    """(model URI, variant) of the policy model's `champion` version; NoChampion names the stage that makes one."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from restpg.promote import CHAMPION, variant_of
    from restpg.runtime import setup_mlflow

    setup_mlflow(settings)
    name, client = settings.mlflow.policy_model_name, MlflowClient()
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        aliases = {}
    if CHAMPION not in aliases:
        raise NoChampion(f"policy model {name!r} has no @{CHAMPION} version: run `restpg promote` first "
                         f"(it crowns the evaluated candidate), then `restpg generate` again")
    version = str(aliases[CHAMPION])
    variant = variant_of(client, name, version)
    if variants.uses_peers(variant):
        raise ValueError(f"{name} v{version} (@{CHAMPION}) is a {variant} policy: its prompts carry peers' style and "
                         f"topic cues, which generate does not retrieve (it reads the user's own profile only)")
    return registry.model_uri(settings, version), variant


def table_name(settings: Settings, name: str) -> str:
    """A requests table's name in Spark SQL: a bare name is a table of the tables' own catalog and schema
    (as the bundle job passes it), a qualified one is taken as given."""
    return name if "." in name else ".".join((*catalog.namespace(settings), catalog.identifier(name, "requests table")))


def _source_records(spark, settings: Settings, source: str):
    """(raw JSON text, record number) of every non-blank request: a JSON-lines file, a Delta directory, or
    a table name (a row becomes the JSON of its columns; a null column is a missing field)."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    if os.path.isfile(source):
        lines = spark.sparkContext.textFile(source).map(lambda t: t.lstrip("\ufeff"))
    else:
        df = spark.read.format("delta").load(source) if os.path.isdir(source) and DeltaTable.isDeltaTable(spark, source) \
            else spark.table(table_name(settings, source))
        lines = df.select(F.to_json(F.struct(*df.columns))).rdd.map(lambda r: r[0])
    return lines.zipWithIndex().filter(lambda p: p[0].strip() != "").map(lambda p: (p[0], p[1] + 1))


def read_requests(spark, settings: Settings, source: str):
    """DataFrame(PARSED_SCHEMA), one row per record; a repeated request id after its first record gets a reason."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    max_chars = settings.data.max_field_chars

    def parse(pair):
        line, number = pair
        fields, reason = parse_request(line, max_chars)
        return (number, line, *(fields.get(k) for k in FIELDS), reason)

    parsed = spark.createDataFrame(_source_records(spark, settings, source).map(parse), PARSED_SCHEMA)
    first = F.min("record_number").over(Window.partitionBy("request_id"))
    repeated = F.when(F.col("request_id").isNotNull() & (F.col("record_number") != first),
                      F.concat(F.lit("request_id repeated: first given in record "), first.cast("string")))
    return parsed.withColumn("reason", F.coalesce("reason", repeated))


def per_user_top_k(k: int):
    """cogroup function: each request of a user → the texts of its top-k profile items (retrieve's ranking)."""
    def per_user(queries: pd.DataFrame, user_items: pd.DataFrame) -> pd.DataFrame:
        user_items = user_items.sort_values(["item_id", "text"]).reset_index(drop=True)
        mat = np.stack(user_items["vec"].to_numpy()) if len(user_items) else np.zeros((0, 1), np.float32)
        ids, texts = user_items["item_id"].tolist(), user_items["text"].tolist()
        items = [[it["text"] for it in top_k(np.asarray(q), mat, ids, texts, k)] for q in queries["vec"]]
        return pd.DataFrame({"request_id": queries["request_id"], "items": items})
    return per_user


def retrieve_items(spark, settings: Settings, requests):
    """DataFrame(request_id, items): the top-k profile texts of each request's user (users without
    profile items get no row)."""
    from pyspark.sql import functions as F

    from restpg.embedding import embed_column

    users = requests.select("user_id").distinct()
    items = (catalog.read(spark, settings, "examples").join(F.broadcast(users), "user_id")
             .select("user_id", F.explode("profile").alias("item"))
             .select("user_id", "item.item_id", "item.text").dropDuplicates(["user_id", "item_id", "text"]))
    item_vecs = embed_column(items, "text", "vec", settings).localCheckpoint()
    query_vecs = embed_column(requests.select("request_id", "user_id", "input"), "input", "vec", settings).drop("input")
    return (query_vecs.groupBy("user_id").cogroup(item_vecs.groupBy("user_id"))
            .applyInPandas(per_user_top_k(settings.retrieve.k), ITEMS_SCHEMA)
            .where(F.col("request_id").isNotNull() & (F.size("items") > 0)))


def _outcome_rows(df, uri: str, variant: str, status: str, reason, source: str, run_id: str):
    """Rows of `generations` for requests that get no answer (`reason`: a column or a literal)."""
    from pyspark.sql import functions as F

    answer = {c["name"]: F.lit(None).cast(c["type"]) for c in catalog.spec("generations").columns
              if c["name"] in ("reasoning", "response", "raw_text", "format_ok", "format_issue", "n_tokens", "finished",
                               "reasoning_forced", "items_retrieved", "prompt_truncated", "template_version")}
    return df.select("request_id", F.lit(uri).alias("model_version"), F.lit(variant).alias("variant"), "user_id",
                     "task", "input", F.lit(status).alias("status"),
                     (reason if not isinstance(reason, str) else F.lit(reason)).alias("reason"),
                     *[col.alias(name) for name, col in answer.items()],
                     F.lit(source).alias("source"), F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at"))


def answer(spark, settings: Settings, requests, uri: str, variant: str, source: str, run_id: str):
    """`generations` rows of answered requests: columns request_id, user_id, task, input, items (retrieved)."""
    from pyspark.sql import functions as F

    from restpg import generation
    from restpg.evaluate import PARSED
    from restpg.policy_inputs import policy_prompts

    cfg = settings.evaluate
    examples = requests.select(F.col("request_id").alias("example_id"), "task", "input", F.col("items").alias("item_texts"))
    inputs = policy_prompts(spark, settings, examples, variant)
    out = generation.generate_df(inputs.select("example_id", "prompt"), uri, settings, m=1, temperature=cfg.temperature,
                                 top_p=cfg.top_p, iteration=-1, seed=settings.sample.seed, **generation.limits(settings, variant))
    parse = F.udf(lambda text, finished, forced: astuple(prompts.parse_output(variant, text, bool(finished), bool(forced))), PARSED)
    return (out.drop("prompt_truncated").join(inputs.select("example_id", "prompt_truncated", "template_version"), "example_id")
            .withColumn("parsed", parse("text", "finished", "reasoning_forced"))
            .join(requests.withColumnRenamed("request_id", "example_id"), "example_id")
            .select(F.col("example_id").alias("request_id"), F.lit(uri).alias("model_version"), F.lit(variant).alias("variant"),
                    "user_id", "task", "input", F.lit(OK).alias("status"), F.lit(None).cast("string").alias("reason"),
                    "parsed.reasoning", "parsed.response", F.col("text").alias("raw_text"), "parsed.format_ok",
                    "parsed.format_issue", "n_tokens", "finished", "reasoning_forced", F.size("items").alias("items_retrieved"),
                    "prompt_truncated", "template_version", F.lit(source).alias("source"), F.lit(run_id).alias("run_id"),
                    F.current_timestamp().alias("created_at")))


def _quarantine_rows(bad, source: str, run_id: str):
    from pyspark.sql import functions as F

    return bad.select(
        F.substring(F.sha1(F.concat_ws("\x1f", F.lit(source), F.col("record_number").cast("string"), "raw_record")), 1, 16)
        .alias("quarantine_id"), F.lit(source).alias("source_file"), "record_number", "task", "raw_record",
        F.concat(F.lit("generate: "), F.col("reason")).alias("reason"), F.lit(run_id).alias("run_id"),
        F.current_timestamp().alias("created_at"))


def run(spark, settings: Settings, *, requests: str, run_id: str) -> dict:
    """Answer every request of `requests` that the champion has not answered yet → `generations`."""
    from pyspark.sql import functions as F

    uri, variant = champion(settings)
    say(f"generate: answering {requests} with the champion {uri} ({variant})")
    parsed = read_requests(spark, settings, requests).localCheckpoint()
    repeated = F.coalesce(F.col("reason").startswith("request_id repeated"), F.lit(False))
    unkeyed = parsed.where(F.col("request_id").isNull() | repeated)
    todo = parsed.where(F.col("request_id").isNotNull() & ~repeated)
    standing = (catalog.read_slice(spark, settings, "generations", {"model_version": uri})
                if catalog.exists(spark, settings, "generations") else None)
    if standing is not None:
        todo = todo.join(standing.where(F.col("status") == OK).select("request_id"), "request_id", "left_anti")
    todo = todo.localCheckpoint()
    valid = todo.where(F.col("reason").isNull()).drop("reason", "raw_record", "record_number")
    items = (retrieve_items(spark, settings, valid).localCheckpoint() if not valid.isEmpty()
             else spark.createDataFrame([], ITEMS_SCHEMA))  # nothing to answer: no model loads
    answerable = valid.join(items, "request_id").localCheckpoint()
    no_profile = valid.join(items, "request_id", "left_anti")

    outcomes = _outcome_rows(todo.where(F.col("reason").isNotNull()), uri, variant, INVALID, F.col("reason"), requests, run_id)
    outcomes = outcomes.unionByName(_outcome_rows(no_profile, uri, variant, NO_PROFILE, F.concat(
        F.lit("user "), F.col("user_id"), F.lit(" has no profile items in examples: ingest the user's history first")),
        requests, run_id))
    if standing is not None:  # an unchanged outcome stands: a rerun rewrites nothing
        outcomes = outcomes.join(standing.select("request_id", "status", "reason"), ["request_id", "status", "reason"], "left_anti")
    outcomes = outcomes.localCheckpoint()
    quarantined = _quarantine_rows(unkeyed, requests, run_id)
    if catalog.exists(spark, settings, "quarantine"):  # a record quarantined before is not merged again
        quarantined = quarantined.join(catalog.read(spark, settings, "quarantine").select("quarantine_id"), "quarantine_id", "left_anti")
    quarantined = quarantined.localCheckpoint()
    totals = parsed.agg(F.count("*").alias("requests"), F.count(F.when(F.col("request_id").isNull() | repeated, 1)).alias("unkeyed"),
                        F.count(F.when(F.col("request_id").isNotNull() & ~repeated, 1)).alias("keyed")).first()
    counts = {"requests": totals.requests, "quarantined": totals.unkeyed, "already_answered": totals.keyed - todo.count(),
              "invalid": 0, "no_profile": 0, "newly_quarantined": quarantined.count()}
    counts.update({r.status: r.n for r in outcomes.groupBy("status").agg(F.count("*").alias("n")).collect()})
    version = None
    if counts["newly_quarantined"]:
        catalog.merge(spark, settings, quarantined, "quarantine", run_id)
    if counts["invalid"] or counts["no_profile"]:
        version = catalog.merge(spark, settings, outcomes, "generations", run_id, slice_={"model_version": uri}, update=True)

    ids, started = sorted(r.request_id for r in answerable.select("request_id").collect()), time.time()
    size = max(1, settings.evaluate.chunk_examples)
    for start in range(0, len(ids), size):
        chunk = answerable.where(F.col("request_id").isin(ids[start:start + size]))
        rows = answer(spark, settings, chunk, uri, variant, requests, run_id)
        version = catalog.merge(spark, settings, rows, "generations", run_id, slice_={"model_version": uri}, update=True)
        progress(f"generate {len(ids)} requests with {uri}", min(start + size, len(ids)), len(ids), started)
    catalog.register_tables(spark, settings)
    result = {"source": requests, "model_version": uri, "variant": variant, **counts, "answered": len(ids),
              "generations_version": version}
    say(f"generate {requests}: {result['requests']} requests: {len(ids)} answered now, {result['already_answered']} "
        f"answered before by {uri}, {counts['no_profile']} new without profile, {counts['invalid']} new invalid, "
        f"{counts['quarantined']} quarantined")
    return result
