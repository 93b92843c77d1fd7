"""PAT's two retrieval trajectories (issue 11) → `peer_retrievals`.

For each example, from the peer pool of its task (users of `user_profiles` with no example outside
the train split, never the example's own user):

- **style** cues: the k users whose standardised style vector is nearest the example user's;
- **topic** context: the k users whose preference (topic) vector is most aligned with the example
  user's;

and from each peer the item most relevant to the example's input (cosine under the retriever),
never an item equal to the example's expected output (`retrieve.leaks_target`). The example user is
represented by what the example itself carries — its own profile — so a train user and a test user
are treated alike and no target is ever read: style from the authored text of the profile items,
preference from the mean embedding of their texts (the input's embedding when the profile is empty;
an empty profile's style sits at the pool mean, whose nearest peers are the most typical writers).
k per trajectory is `retrieve.k`. Mode `random` (the `random_peers` control) draws the k peers of
each trajectory uniformly from the same pool with a seed of the example id, through the same code.
Ties break on user id, item id and text, so reruns agree.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import pandas as pd

from restpg import catalog, retrieve, user_profiles
from restpg.config import Settings

TRAJECTORIES = ("style", "topic")
SIMILAR, RANDOM = "similar", "random"
PEERS_SCHEMA = ("example_id string, task string, split string, user_id string, trajectory string, rank int, "
                "peer_user_id string, style_similarity double, topic_similarity double, input_vec array<float>, target string")
COLUMNS = ("example_id", "task", "split", "user_id", "mode", "trajectory", "rank", "peer_user_id", "item_id", "text",
           "style_similarity", "topic_similarity", "item_score")


def seed_of(example_id: str, trajectory: str) -> int:
    """A per-(example, trajectory) seed that does not depend on the process (unlike hash())."""
    return int.from_bytes(hashlib.sha1(f"{example_id}/{trajectory}".encode()).digest()[:8], "big")


def choose_peers(example_id: str, user_id: str, style_q: np.ndarray, topic_q: np.ndarray, pool: dict, k: int,
                 mode: str) -> list[dict]:
    """[{trajectory, rank, peer_user_id, style_similarity, topic_similarity}] for one example: k peers
    per trajectory from `pool` (ids, style z-vectors, topic vectors of one task), never `user_id`."""
    ids = pool["ids"]
    allowed = [i for i in range(len(ids)) if ids[i] != user_id]
    style = user_profiles.style_similarity(style_q, pool["style"]) if len(ids) else np.zeros(0)
    topic = pool["topic"] @ topic_q if len(ids) else np.zeros(0)
    out = []
    for trajectory, sims in zip(TRAJECTORIES, (style, topic)):
        if mode == RANDOM:
            ranked = [allowed[i] for i in np.random.default_rng(seed_of(example_id, trajectory)).permutation(len(allowed))]
        else:
            ranked = sorted(allowed, key=lambda i: (-sims[i], ids[i]))
        out += [{"trajectory": trajectory, "rank": r + 1, "peer_user_id": ids[i], "style_similarity": float(style[i]),
                 "topic_similarity": float(topic[i])} for r, i in enumerate(ranked[:k])]
    return out


def load_pool(spark, settings: Settings) -> dict:
    """task → {ids, style (standardised over the task's pool), mean, scale, topic}: the peer pool, users
    without any evaluation-split example, in user id order."""
    from pyspark.sql import functions as F

    rows = (catalog.read_slice(spark, settings, "user_profiles", {"retriever": settings.models.retriever})
            .where(~F.col("eval_user") & (F.size("topic") > 0)).orderBy("task", "user_id")
            .select("task", "user_id", "style", "topic").toPandas())
    pools = {}
    for task, g in rows.groupby("task", sort=True):
        raw = np.stack(g["style"].map(np.asarray).to_list())
        mean, scale = user_profiles.standardize(raw)
        pools[task] = {"ids": g["user_id"].tolist(), "style": user_profiles.zscore(raw, mean, scale), "mean": mean,
                       "scale": scale, "topic": np.stack(g["topic"].map(lambda v: np.asarray(v, dtype=np.float32)).to_list())}
    return pools


def _peer_finder(pools_bc, ref: str, env: dict, k: int, mode: str, batch_size: int):
    def find(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from restpg.embedding import embed_texts

        pools = pools_bc.value
        for pdf in batches:
            inputs = embed_texts(pdf["input"].fillna("").tolist(), ref, env, batch_size)
            rows = []
            for n, r in enumerate(pdf.itertuples()):
                pool = pools.get(r.task)
                if pool is None:
                    continue
                profile = list(r.profile)
                style_raw = user_profiles.style_features(
                    [user_profiles.authored_text(r.task, it["text"], it["fields"]) for it in profile])
                style_q = user_profiles.zscore(style_raw, pool["mean"], pool["scale"]) if profile else np.zeros(len(pool["mean"]))
                texts = [it["text"] for it in profile]
                topic_q = (np.asarray(user_profiles.mean_unit(list(embed_texts(texts, ref, env, batch_size))))
                           if texts else inputs[n])
                for peer in choose_peers(r.example_id, r.user_id, style_q, topic_q, pool, k, mode):
                    rows.append({"example_id": r.example_id, "task": r.task, "split": r.split, "user_id": r.user_id,
                                 **peer, "input_vec": inputs[n].tolist(), "target": r.target})
            yield pd.DataFrame(rows, columns=[c.split()[0] for c in PEERS_SCHEMA.split(", ")])
    return find


def peer_items(spark, settings: Settings):
    """Every training-split text of every user with its embedding: what peers' cues are chosen from."""
    from pyspark.sql import functions as F

    from restpg.embedding import embed_column

    texts = user_profiles.user_texts(catalog.read(spark, settings, "examples"))
    return embed_column(texts.select("task", F.col("user_id").alias("peer_user_id"), F.col("text_id").alias("item_id"),
                                     "text", "values"), "text", "vec", settings)


def peer_rows(spark, settings: Settings, examples, mode: str = SIMILAR, k: int | None = None, items=None):
    """`COLUMNS` of the peer retrievals of `examples` (any examples-shaped DataFrame, e.g. with
    truncated profiles): no write, so the sparse-profile evaluation reuses it. `items` (`peer_items`,
    embedded once by a caller that asks several times) saves embedding the pool again."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from restpg import models

    if mode not in (SIMILAR, RANDOM):
        raise ValueError(f"mode is {SIMILAR!r} or {RANDOM!r}, not {mode!r}")
    k = k or settings.retrieve.k
    pools_bc = spark.sparkContext.broadcast(load_pool(spark, settings))
    retriever = models.executor_path(settings.models.retriever, settings)  # resolved on the driver: executors load the path
    find = _peer_finder(pools_bc, retriever, models.worker_env(settings), k, mode, settings.retrieve.batch_size)
    peers = (examples.select("example_id", "task", "split", "user_id", "input", "target", "profile")
             .mapInPandas(find, PEERS_SCHEMA))
    items = items if items is not None else peer_items(spark, settings)
    leaks = F.udf(lambda text, values, target: retrieve.leaks_target(text, values, target), "boolean")
    score = F.expr("aggregate(zip_with(input_vec, vec, (a, b) -> a * b), 0D, (acc, x) -> acc + x)")
    best = Window.partitionBy("example_id", "trajectory", "rank").orderBy(F.desc("item_score"), "item_id", "text")
    return (peers.join(items, ["task", "peer_user_id"])
            .where(~leaks("text", "values", "target"))
            .withColumn("item_score", score)
            .withColumn("n", F.row_number().over(best)).where(F.col("n") == 1)
            .withColumn("mode", F.lit(mode)).select(*COLUMNS))


def run(spark, settings: Settings, *, run_id: str) -> dict:
    from pyspark.sql import functions as F

    k, retriever = settings.retrieve.k, settings.models.retriever
    spark.sparkContext.setJobDescription("peer_retrieve: style and topic trajectories")
    rows = peer_rows(spark, settings, catalog.read(spark, settings, "examples"), SIMILAR, k)
    out = (rows.withColumn("k", F.lit(k)).withColumn("retriever", F.lit(retriever))
           .withColumn("run_id", F.lit(run_id)).withColumn("created_at", F.current_timestamp()))
    slice_ = {"retriever": retriever, "mode": SIMILAR}
    version = catalog.replace_slice(spark, settings, out, "peer_retrievals", slice_, run_id)
    stats = catalog.read_slice(spark, settings, "peer_retrievals", slice_).groupBy("trajectory").agg(
        F.countDistinct("example_id").alias("examples"), F.count("*").alias("items"),
        F.avg("style_similarity").alias("mean_style_similarity"), F.avg("topic_similarity").alias("mean_topic_similarity"),
        F.avg("item_score").alias("mean_item_score")).collect()
    spark.sparkContext.setJobDescription(None)
    return {"version": version, "k": k, "retriever": retriever,
            "trajectories": {r["trajectory"]: {c: r[c] for c in r.asDict() if c != "trajectory"} for r in stats}}
