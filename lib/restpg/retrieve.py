"""Top-k profile items per example by embedding similarity to the input → `retrievals`.

Profile items are embedded once per (user, item), not once per example; scores are computed per
user with `cogroup`, so an example only ever sees its own user's items.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from restpg import catalog
from restpg.config import Settings

ITEMS_SCHEMA = "array<struct<rank:int,item_id:string,score:double,text:string>>"


def top_k(query: np.ndarray, item_vecs: np.ndarray, item_ids: list[str], item_texts: list[str], k: int) -> list[dict]:
    """Best-first items; ties broken by item_id so reruns agree."""
    if len(item_ids) == 0:
        return []
    scores = item_vecs @ query
    order = sorted(range(len(item_ids)), key=lambda i: (-scores[i], item_ids[i]))[:k]
    return [{"rank": r + 1, "item_id": item_ids[i], "score": float(scores[i]), "text": item_texts[i]} for r, i in enumerate(order)]


def run(spark, settings: Settings, run_id: str = "manual") -> dict:
    from pyspark.sql import functions as F

    from restpg.embedding import embed_column

    k, retriever = settings.retrieve.k, settings.models.retriever
    examples = catalog.read(spark, settings, "examples")
    items = (examples.select("user_id", F.explode("profile").alias("item"))
             .select("user_id", "item.item_id", "item.text").dropDuplicates(["user_id", "item_id"]))
    spark.sparkContext.setJobDescription("retrieve: embed profile items and inputs")
    item_vecs = embed_column(items, "text", "vec", settings).localCheckpoint()
    query_vecs = embed_column(examples.select("example_id", "task", "split", "user_id", "input"), "input", "vec", settings).localCheckpoint()

    def per_user(queries: pd.DataFrame, user_items: pd.DataFrame) -> pd.DataFrame:
        user_items = user_items.sort_values("item_id")
        mat = np.stack(user_items["vec"].to_numpy()) if len(user_items) else np.zeros((0, 1))
        ids, texts = user_items["item_id"].tolist(), user_items["text"].tolist()
        return pd.DataFrame({
            "example_id": queries["example_id"], "task": queries["task"], "split": queries["split"],
            "user_id": queries["user_id"],
            "items": [top_k(np.asarray(q), mat, ids, texts, k) for q in queries["vec"]],
        })

    spark.sparkContext.setJobDescription("retrieve: top-k per user")
    out = (query_vecs.groupBy("user_id").cogroup(item_vecs.groupBy("user_id"))
           .applyInPandas(per_user, f"example_id string, task string, split string, user_id string, items {ITEMS_SCHEMA}")
           .where(F.col("example_id").isNotNull())
           .withColumn("retriever", F.lit(retriever)).withColumn("k", F.lit(k))
           .withColumn("run_id", F.lit(run_id)).withColumn("created_at", F.current_timestamp()))
    version = catalog.replace_slice(spark, settings, out, "retrievals", {"retriever": retriever}, run_id)
    stats = catalog.read(spark, settings, "retrievals").where(F.col("retriever") == retriever).agg(
        F.count("*").alias("examples"), F.sum(F.size("items")).alias("items"),
        F.sum(F.when(F.size("items") == 0, 1).otherwise(0)).alias("cold_start")).first().asDict()
    spark.sparkContext.setJobDescription(None)
    return {"version": version, "k": k, "retriever": retriever, **stats}
