"""Sentence embeddings on Spark (retrieval; the embedding reward lives in `restpg.rewards`), model cached per worker."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd

from restpg.config import Settings


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


def embed_column(df, text_col: str, out_col: str, settings: Settings, ref: str | None = None):
    """Adds `out_col` (array<float>) holding the embedding of `text_col`."""
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    from restpg import models

    ref, env, bs = ref or settings.models.retriever, models.worker_env(settings), settings.retrieve.batch_size

    @pandas_udf("array<float>")
    def embed(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        for texts in batches:
            yield pd.Series(list(embed_texts(texts.fillna("").tolist(), ref, env, bs)))

    return df.withColumn(out_col, embed(F.col(text_col)))

