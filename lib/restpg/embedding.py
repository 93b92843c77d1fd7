"""Sentence embeddings on Spark (retrieval; the embedding reward lives in `restpg.rewards`), model cached per worker."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import numpy as np
import pandas as pd

from restpg.config import Settings
from restpg.tracking import progress


def embed_texts(texts: list[str], ref: str, env: dict, batch_size: int = 64) -> np.ndarray:
    """Unit-normalised embeddings, so a dot product is the cosine."""
    from restpg import models

    return embed_with(models.cached_embedder(ref, models.worker_settings(env)), texts, batch_size)


def embed_with(model, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-normalised embeddings of `texts` under a loaded SentenceTransformer."""
    if not texts:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    return model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False)


def spread(df, workers: int):
    """df in at least `workers` partitions: a small table read from one file is one partition, and a
    pandas UDF over one partition runs on one Python worker however many cores there are."""
    return df if df.rdd.getNumPartitions() >= workers else df.repartition(workers)


PROGRESS_STEPS = 4
# texts encoded per call in a worker: encode sorts its input by length before batching, so one call over
# many Arrow batches pads less than one call per batch (400 texts on one thread: 44 texts/s at once, 37
# in calls of 32)
POOL_TEXTS = 1024


def pooled(batches: Iterator[pd.Series], size: int) -> Iterator[list[pd.Series]]:
    """Consecutive batches, pooled until a pool holds at least `size` rows (the last one may hold fewer)."""
    pool, rows = [], 0
    for batch in batches:
        pool.append(batch)
        rows += len(batch)
        if rows >= size:
            yield pool
            pool, rows = [], 0
    if pool:
        yield pool


def embed_column(df, text_col: str, out_col: str, settings: Settings, ref: str | None = None, counter=None):
    """Adds `out_col` (array<float>) holding the embedding of `text_col`, on at least one partition per
    core. `counter` (a Spark accumulator, see `watch`) gets the rows embedded; with it, every core gets
    `PROGRESS_STEPS` partitions so the progress line moves before the end."""
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    from restpg import models

    ref = models.executor_path(ref or settings.models.retriever, settings)  # resolved on the driver: executors load the path
    env, bs = models.worker_env(settings), settings.retrieve.batch_size
    pool_texts = POOL_TEXTS

    @pandas_udf("array<float>")
    def embed(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        for pool in pooled(batches, pool_texts):  # one encode call per pool, one output per input batch
            vecs = embed_texts(pd.concat(pool).fillna("").tolist(), ref, env, bs)
            start = 0
            for texts in pool:
                yield pd.Series(list(vecs[start:start + len(texts)]))
                start += len(texts)
            if counter is not None:
                counter.add(start)

    workers = df.sparkSession.sparkContext.defaultParallelism
    # an accumulator reports when a task ends: with a counter, PROGRESS_STEPS tasks per core let the count move
    return spread(df, workers * (PROGRESS_STEPS if counter is not None else 1)).withColumn(out_col, embed(F.col(text_col)))


@contextlib.contextmanager
def watch(spark, label: str, total: int, every_s: float = 15.0):
    """Yields an accumulator for the executors to add finished rows to; while the body runs a driver
    thread prints rows done of `total`, rows/s and time left every `every_s` seconds, and once at the end.
    Executors report an accumulator when a task ends, so the count moves partition by partition."""
    counter = spark.sparkContext.accumulator(0)
    stop, started = threading.Event(), time.time()

    def report() -> None:
        rate = counter.value / max(time.time() - started, 1e-9)
        progress(f"{label} [{rate:.1f} rows/s]", counter.value, total, started)

    def loop() -> None:
        while not stop.wait(every_s):
            report()

    thread = threading.Thread(target=loop, name=f"progress {label}", daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join()
        report()
