"""User representations for peer retrieval (PAT, issue 11) → `user_profiles`.

Two vectors per (task, user), built from training-split rows only (the user's train examples: their
profile items and their expected outputs), each with the number of texts behind it:

- **style**: stylometric rates meant to be independent of what the text is about — sentence and
  word length, punctuation marks per character, capitalisation and digits, and the rates of common
  function words (`FEATURES`). No content words and no character n-grams: those carry topic, and the
  style trajectory should find users who *write* alike, not users who review the same products.
  Only the text the user wrote is used (`AUTHORED` fields of an item, e.g. an Amazon item's
  `summary` and `reviewText`, never the product `description`). The stored vector is raw; peer
  retrieval standardises it over the peer pool (`standardize`) and compares with `style_similarity`.
- **topic** (preference): the mean retriever embedding (`embedding.py`) of the user's texts, unit
  length, so a dot product is the cosine.

`eval_user` marks users with any example outside the train split: peer retrieval never uses them as
peers, so no evaluation user's data reaches another evaluation target.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from restpg import catalog
from restpg.config import Settings

STYLE_VERSION = "stylometric-v1"
FUNCTION_WORDS = ("the", "a", "and", "but", "of", "to", "in", "for", "with", "it", "this", "that", "i", "you", "we",
                  "my", "not", "very", "so", "just", "is", "was", "would", "really")
PUNCTUATION = (".", ",", "!", "?", ";", ":", "-", "(", "'", '"')
FEATURES = (("words_per_sentence", "sentence_length_sd", "chars_per_word", "long_word_share", "uppercase_share",
             "digit_share", "newline_rate", "function_word_share")
            + tuple(f"punct[{p}]" for p in PUNCTUATION) + tuple(f"fw[{w}]" for w in FUNCTION_WORDS))
AUTHORED = {"product_review": ("summary", "reviewText"), "abstract_generation": ("abstract",),
            "topic_writing": ("content",), "email_completion": ("body", "text")}

_SENTENCE = re.compile(r"[^.!?\n]+")
_WORD = re.compile(r"[A-Za-z']+")
OUT_SCHEMA = "task string, user_id string, style array<double>, n_style_texts int, topic array<float>, n_topic_texts int"


def style_features(texts: list[str]) -> np.ndarray:
    """Raw stylometric rates of a user's texts, pooled (counts summed over texts, then divided), in
    `FEATURES` order; all zeros for no text."""
    texts = [t for t in texts if t]
    text = "\n".join(texts)  # the joining newlines end sentences but are not counted as characters
    words = [w.lower() for w in _WORD.findall(text)]
    chars = max(sum(len(t) for t in texts), 1)
    if not words:
        return np.zeros(len(FEATURES))
    sentences = [len(_WORD.findall(s)) for s in _SENTENCE.findall(text)]
    sentences = [n for n in sentences if n] or [len(words)]
    letters = [c for c in text if c.isalpha()]
    counts = pd.Series(words).value_counts()
    fw = np.array([counts.get(w, 0) for w in FUNCTION_WORDS], dtype=float) / len(words)
    head = [np.mean(sentences), np.std(sentences), np.mean([len(w) for w in words]),
            np.mean([len(w) > 6 for w in words]), sum(c.isupper() for c in letters) / max(len(letters), 1),
            sum(c.isdigit() for c in text) / chars, sum(t.count("\n") for t in texts) / chars, fw.sum()]
    punct = [text.count(p) / chars for p in PUNCTUATION]
    return np.array(head + punct + list(fw), dtype=float)


def standardize(pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of the pool's raw style vectors; a constant feature gets scale 1 (it then never
    separates anyone)."""
    if len(pool) == 0:
        return np.zeros(len(FEATURES)), np.ones(len(FEATURES))
    mean, sd = pool.mean(axis=0), pool.std(axis=0)
    return mean, np.where(sd > 1e-9, sd, 1.0)


def zscore(raw: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Standardised style, clipped at ±5 so one odd feature (a text full of digits) cannot decide alone."""
    return np.clip((raw - mean) / scale, -5.0, 5.0)


def style_similarity(query: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Negative root-mean-square distance of standardised style vectors (higher = closer). A distance,
    not a cosine: a user with no text sits at the pool mean (all zeros) and still has nearest peers —
    the most typical writers."""
    return -np.sqrt(((pool - query) ** 2).mean(axis=-1))


def authored_text(task: str, text: str, fields) -> str:
    """What the user wrote in a profile item: its authored fields when present, else its text."""
    fields = dict(fields or {})
    parts = [fields[f] for f in AUTHORED.get(task, ()) if fields.get(f)]
    return "\n".join(parts) if parts else (text or "")


def user_texts(examples):
    """(task, user_id, text_id, text, style_text, values) of every train-split text of every user:
    profile items (deduplicated by id and text; `values` their raw fields) and expected outputs."""
    from pyspark.sql import functions as F

    train = examples.where(F.col("split") == "train")
    authored = F.udf(lambda task, text, fields: authored_text(task, text, fields), "string")
    items = (train.select("task", "user_id", F.explode("profile").alias("it"))
             .select("task", "user_id", F.col("it.item_id").alias("text_id"), F.col("it.text").alias("text"),
                     authored("task", F.col("it.text"), F.col("it.fields")).alias("style_text"),
                     F.map_values("it.fields").alias("values")))
    targets = train.select("task", "user_id", F.concat(F.lit("target:"), "example_id").alias("text_id"),
                           F.col("target").alias("text"), F.col("target").alias("style_text"),
                           F.array().cast("array<string>").alias("values"))
    return items.unionByName(targets).dropDuplicates(["task", "user_id", "text_id", "text"])


def mean_unit(vectors: list) -> list[float]:
    """Unit-length mean of unit vectors (the user's preference direction); [] for none."""
    if not vectors:
        return []
    v = np.mean(np.stack([np.asarray(x, dtype=float) for x in vectors]), axis=0)
    n = np.linalg.norm(v)
    return (v / n if n > 0 else v).astype(np.float32).tolist()


def per_user(pdf: pd.DataFrame) -> pd.DataFrame:
    pdf = pdf.sort_values("text_id")
    style_texts = [t for t in pdf["style_text"] if t and t.strip()]
    return pd.DataFrame([{
        "task": pdf["task"].iloc[0], "user_id": pdf["user_id"].iloc[0],
        "style": style_features(style_texts).tolist(), "n_style_texts": len(style_texts),
        "topic": mean_unit(list(pdf["vec"])), "n_topic_texts": len(pdf)}])


def run(spark, settings: Settings, *, run_id: str) -> dict:
    from pyspark.sql import functions as F

    from restpg.embedding import embed_column

    retriever = settings.models.retriever
    examples = catalog.read(spark, settings, "examples")
    texts = embed_column(user_texts(examples), "text", "vec", settings).localCheckpoint()
    eval_users = (examples.where(F.col("split") != "train").select("task", "user_id").distinct()
                  .withColumn("eval_user", F.lit(True)))
    spark.sparkContext.setJobDescription("user_profiles: style and topic vectors per user")
    out = (texts.groupBy("task", "user_id").applyInPandas(per_user, OUT_SCHEMA)
           .join(eval_users, ["task", "user_id"], "left").withColumn("eval_user", F.coalesce("eval_user", F.lit(False)))
           .withColumn("style_version", F.lit(STYLE_VERSION)).withColumn("retriever", F.lit(retriever))
           .withColumn("run_id", F.lit(run_id)).withColumn("created_at", F.current_timestamp()))
    version = catalog.replace_slice(spark, settings, out, "user_profiles", {"retriever": retriever}, run_id)
    stats = catalog.read_slice(spark, settings, "user_profiles", {"retriever": retriever}).agg(
        F.count("*").alias("users"), F.sum(F.col("eval_user").cast("int")).alias("eval_users"),
        F.avg("n_style_texts").alias("mean_style_texts"), F.avg("n_topic_texts").alias("mean_topic_texts")).first().asDict()
    spark.sparkContext.setJobDescription(None)
    return {"version": version, "retriever": retriever, "style_version": STYLE_VERSION, "features": len(FEATURES), **stats}
