"""Top-k items of each example's own profile by embedding similarity to the input → `retrievals`.

As LongLaMP defines it: an example retrieves only from its own `profile` array (never from the
user's other examples, which may belong to another split), and never an item whose text is the
example's expected output. Items are embedded once per distinct (user, item_id, text), not once per
example; scores are computed per user with `cogroup`, each example masked to its own profile.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from restpg import catalog
from restpg.config import Settings

ITEMS_SCHEMA = "array<struct<rank:int,item_id:string,score:double,text:string>>"
OUT_SCHEMA = f"example_id string, task string, split string, user_id string, items {ITEMS_SCHEMA}, excluded int"


def normalize(text: str | None) -> str:
    """Whitespace-normalised text: runs of whitespace become one space, no leading/trailing space."""
    return " ".join((text or "").split())


def leaks_target(text: str, field_values, target: str) -> bool:
    """The item is the expected output: its text, or one of its raw fields (e.g. an Amazon item's
    `reviewText`, which the rendered text wraps in other fields), equals the target."""
    want = normalize(target)
    return bool(want) and (normalize(text) == want or any(normalize(v) == want for v in (() if field_values is None else field_values)))


def top_k(query: np.ndarray, item_vecs: np.ndarray, item_ids: list[str], item_texts: list[str], k: int) -> list[dict]:
    """Best-first items; ties broken by item_id then text, so reruns agree."""
    if len(item_ids) == 0:
        return []
    scores = item_vecs @ query
    order = sorted(range(len(item_ids)), key=lambda i: (-scores[i], item_ids[i], item_texts[i]))[:k]
    return [{"rank": r + 1, "item_id": item_ids[i], "score": float(scores[i]), "text": item_texts[i]} for r, i in enumerate(order)]


def candidates(profile, target: str, index: dict) -> tuple[list[int], int]:
    """Rows of the user's item matrix this example may retrieve (its own profile, minus items equal to
    the target), and how many profile items were left out for equalling the target."""
    rows, excluded = [], 0
    for item in profile:
        if leaks_target(item["text"], item["values"], target):
            excluded += 1
            continue
        row = index.get((item["item_id"], item["text"]))
        if row is not None and row not in rows:
            rows.append(row)
    return rows, excluded


def per_user_top_k(k: int):
    def per_user(queries: pd.DataFrame, user_items: pd.DataFrame) -> pd.DataFrame:
        user_items = user_items.sort_values(["item_id", "text"]).reset_index(drop=True)
        mat = np.stack(user_items["vec"].to_numpy()) if len(user_items) else np.zeros((0, 1), np.float32)
        ids, texts = user_items["item_id"].tolist(), user_items["text"].tolist()
        index = {(i, t): n for n, (i, t) in enumerate(zip(ids, texts))}
        items, excluded = [], []
        for q, profile, target in zip(queries["vec"], queries["profile"], queries["target"]):
            rows, n_excluded = candidates(list(profile), target, index)
            items.append(top_k(np.asarray(q), mat[rows], [ids[r] for r in rows], [texts[r] for r in rows], k) if rows else [])
            excluded.append(n_excluded)
        return pd.DataFrame({"example_id": queries["example_id"], "task": queries["task"], "split": queries["split"],
                             "user_id": queries["user_id"], "items": items, "excluded": excluded})
    return per_user


def run(spark, settings: Settings, *, run_id: str) -> dict:
    from pyspark.sql import functions as F

    from restpg.embedding import embed_column, watch

    k, retriever = settings.retrieve.k, settings.models.retriever
    examples = catalog.read(spark, settings, "examples")
    items = (examples.select("user_id", F.explode("profile").alias("item"))
             .select("user_id", "item.item_id", "item.text").dropDuplicates(["user_id", "item_id", "text"])).cache()
    spark.sparkContext.setJobDescription("retrieve: embed profile items and inputs")
    with watch(spark, "retrieve: profile items embedded", items.count()) as counter:
        item_vecs = embed_column(items, "text", "vec", settings, counter=counter).localCheckpoint()
    items.unpersist()
    profile = F.transform("profile", lambda it: F.struct(it["item_id"].alias("item_id"), it["text"].alias("text"),
                                                         F.map_values(it["fields"]).alias("values")))
    queries = examples.select("example_id", "task", "split", "user_id", "input", "target", profile.alias("profile"))
    with watch(spark, "retrieve: inputs embedded", examples.count()) as counter:
        query_vecs = embed_column(queries, "input", "vec", settings, counter=counter).drop("input").localCheckpoint()

    spark.sparkContext.setJobDescription("retrieve: top-k of each example's own profile")
    out = (query_vecs.groupBy("user_id").cogroup(item_vecs.groupBy("user_id"))
           .applyInPandas(per_user_top_k(k), OUT_SCHEMA)
           .where(F.col("example_id").isNotNull())
           .withColumn("retriever", F.lit(retriever)).withColumn("k", F.lit(k))
           .withColumn("run_id", F.lit(run_id)).withColumn("created_at", F.current_timestamp()))
    version = catalog.replace_slice(spark, settings, out, "retrievals", {"retriever": retriever}, run_id)
    stats = catalog.read_slice(spark, settings, "retrievals", {"retriever": retriever}).agg(
        F.count("*").alias("examples"), F.sum(F.size("items")).alias("items"),
        F.sum(F.when(F.size("items") == 0, 1).otherwise(0)).alias("cold_start"),
        F.sum(F.when(F.col("excluded") > 0, 1).otherwise(0)).alias("examples_with_target_in_profile")).first().asDict()
    spark.sparkContext.setJobDescription(None)
    return {"version": version, "k": k, "retriever": retriever, "items_embedded": item_vecs.count(), **stats}
