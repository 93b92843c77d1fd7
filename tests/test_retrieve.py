"""Retrieval as LongLaMP defines it: each example's own profile, never its expected output."""
import json

import numpy as np
import pytest

from helpers import example_row, make_settings, write_rows
from restpg import catalog, ingest, retrieve, tasks


def test_top_k_orders_by_score_and_handles_empty():
    q = np.array([1.0, 0.0])
    vecs = np.array([[0.2, 0.9], [0.9, 0.1], [0.5, 0.5]])
    got = retrieve.top_k(q, vecs, ["a", "b", "c"], ["A", "B", "C"], k=2)
    assert [g["item_id"] for g in got] == ["b", "c"] and [g["rank"] for g in got] == [1, 2]
    assert retrieve.top_k(q, np.zeros((0, 2)), [], [], k=5) == []
    tied = retrieve.top_k(q, np.array([[0.5, 0.0], [0.5, 0.0]]), ["z", "a"], ["Z", "A"], k=2)
    assert [g["item_id"] for g in tied] == ["a", "z"]  # equal scores: item_id decides, so reruns agree


@pytest.mark.parametrize("text, values, target, leaks", [
    ("Great kettle.", [], "Great kettle.", True),
    ("  Great \n kettle.\t", [], "Great kettle.", True),                       # whitespace does not hide a copy
    ("summary: Nice\nreviewText: Great kettle.", ["5", "Nice", "Great  kettle."], "Great kettle.", True),  # a field is y
    ("Great kettle, boils fast.", ["Great kettle, boils fast."], "Great kettle.", False),  # containing y is not being y
    ("great kettle.", [], "Great kettle.", False),                              # only whitespace is normalised
    ("", [], "", False),
])
def test_leaks_target(text, values, target, leaks):
    assert retrieve.leaks_target(text, values, target) is leaks


def _items(spark, s) -> dict:
    return {r.example_id: r for r in catalog.read(spark, s, "retrievals").collect()}


def test_each_example_sees_only_its_own_profile_and_never_its_target(spark, tmp_path):
    s = make_settings(tmp_path / "home", "retrieve.k=2")
    kettle = "Great kettle, boils water fast and looks good."
    rows = [
        # one user, two examples with different profiles: neither may see the other's items
        example_row("e1", "u1", input="Write about tea kettles.", profile=[
            {"item_id": "a1", "text": "A kettle that boils water fast."}, {"item_id": "a2", "text": "Tea leaves from Assam."},
            {"item_id": "a3", "text": "A broken phone charger."}]),
        example_row("e2", "u1", split="val", input="Write about tea kettles.", profile=[
            {"item_id": "b1", "text": "Kettle for tea, boils quickly."}, {"item_id": "b2", "text": "Running shoes."}]),
        # the input matches the expected output word for word, and the profile holds it (with other spacing)
        example_row("e3", "u2", input=kettle, target=kettle, profile=[
            {"item_id": "c1", "text": "Great  kettle, boils water fast\nand looks good. "}, {"item_id": "c2", "text": "A kettle review."},
            {"item_id": "c3", "text": "Garden hose."}, {"item_id": "c4", "text": "Kettle boils water fast."}]),
        # the same item (id and text) in two examples of a user is embedded once
        example_row("e4", "u2", split="test", input="Write about garden hoses.", profile=[
            {"item_id": "c3", "text": "Garden hose."}, {"item_id": "c5", "text": "A hose that never kinks."}]),
        example_row("e5", "u3", profile=[]),
    ]
    write_rows(spark, s, "examples", rows)
    report = retrieve.run(spark, s, run_id="t")
    assert report["examples"] == 5 and report["k"] == 2 and report["cold_start"] == 1
    assert report["items_embedded"] == 10  # 3 + 2 + 4 + 1 new (c3 shared by e3 and e4)
    assert report["examples_with_target_in_profile"] == 1
    got = _items(spark, s)
    own = {r["example_id"]: {it["item_id"] for it in r["profile"]} for r in rows}
    for eid, row in got.items():
        ids = [it["item_id"] for it in row["items"]]
        assert set(ids) <= own[eid], (eid, ids)
        assert [it["rank"] for it in row["items"]] == list(range(1, len(ids) + 1))
        scores = [it["score"] for it in row["items"]]
        assert scores == sorted(scores, reverse=True)
        assert len(ids) == min(2, len(own[eid]) - row["excluded"])
    assert [it["item_id"] for it in got["e1"]["items"]] == ["a1", "a2"]
    assert [it["item_id"] for it in got["e2"]["items"]] == ["b1", "b2"]
    assert "c1" not in {it["item_id"] for it in got["e3"]["items"]} and got["e3"]["excluded"] == 1
    assert [it["item_id"] for it in got["e3"]["items"]][0] == "c4"
    assert got["e5"]["items"] == []

    retrieve.run(spark, s, run_id="t2")
    again = _items(spark, s)
    assert len(again) == 5 and all(again[e]["items"] == got[e]["items"] for e in got)  # deterministic, no duplicates


def test_retrieval_on_amazon_sample(spark, fresh_settings, amazon_path, tmp_path):
    # 40 real users; one whose review is a copy of a profile item's reviewText; one cold-start user
    recs = [json.loads(x) for x in amazon_path.read_text().splitlines()[:40]]
    spec = tasks.TASKS["product_review"]
    copier = dict(recs[0], reviewerId="copier", output=recs[0]["profile"][2]["reviewText"],
                  input=tasks.item_text(spec, recs[0]["profile"][2]))  # the input asks for that very item
    asker = dict(recs[0], reviewerId="asker", input=tasks.item_text(spec, recs[0]["profile"][2]))
    cold = dict(recs[1], reviewerId="cold", profile=[])
    path = tmp_path / "sample.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs + [copier, asker, cold]) + "\n")
    s = fresh_settings
    ingest.run(spark, s, source=str(path), task="product_review", split="train", run_id="ingest")
    report = retrieve.run(spark, s, run_id="t")
    assert report["examples"] == 43 and report["cold_start"] == 1 and report["k"] == s.retrieve.k

    rows = spark.sql("""
        SELECT r.example_id, r.user_id, r.items, r.excluded, e.target, transform(e.profile, p -> p.text) AS profile
        FROM restpg.retrievals r JOIN restpg.examples e USING (example_id)""").collect()
    for row in rows:
        assert {it["text"] for it in row["items"]} <= set(row["profile"])
        assert len(row["items"]) == min(s.retrieve.k, len(row["profile"]) - row["excluded"])
        assert all(retrieve.normalize(it["text"]) != retrieve.normalize(row["target"]) for it in row["items"])
    by_user = {r.user_id: r for r in rows}
    assert by_user["cold"]["items"] == []
    wanted = tasks.item_text(spec, {k: str(v) for k, v in recs[0]["profile"][2].items()})
    assert by_user["asker"]["items"][0]["text"] == wanted and by_user["asker"]["items"][0]["score"] > 0.99
    assert by_user["copier"]["excluded"] == 1 and wanted not in {it["text"] for it in by_user["copier"]["items"]}
    assert len(by_user["copier"]["items"]) == len(recs[0]["profile"]) - 1


def test_embedding_spreads_over_every_core_and_reports_progress(spark, fresh_settings, capsys):
    """A one-partition table is embedded on at least as many partitions as Spark has cores, each with rows, and
    the watch prints rows done of the total with a rate."""
    from pyspark.sql import functions as F

    from restpg.embedding import PROGRESS_STEPS, embed_column, watch

    texts = spark.createDataFrame([(f"review {i} of a kettle",) for i in range(12)], "text string").coalesce(1)
    workers = spark.sparkContext.defaultParallelism
    with watch(spark, "test embed", 12, every_s=3600) as counter:
        out = embed_column(texts, "text", "vec", fresh_settings, counter=counter).localCheckpoint()
    assert counter.value == 12
    per_partition = out.groupBy(F.spark_partition_id().alias("p")).count().collect()
    assert len(per_partition) >= workers >= 2 and all(r["count"] > 0 for r in per_partition)
    # with a counter every core gets several partitions, so the count moves before the last task ends
    assert out.rdd.getNumPartitions() >= PROGRESS_STEPS * workers
    assert {len(r.vec) for r in out.collect()} == {384}
    err = capsys.readouterr().err
    assert "test embed [" in err and "12/12 (100%)" in err


def test_pooled_batches_keep_order_and_sizes():
    import pandas as pd

    from restpg.embedding import pooled

    batches = [pd.Series(range(start, start + n)) for start, n in ((0, 8), (8, 8), (16, 8), (24, 3))]
    pools = list(pooled(iter(batches), 12))
    assert [[len(b) for b in pool] for pool in pools] == [[8, 8], [8, 3]]
    assert pd.concat([b for pool in pools for b in pool]).tolist() == list(range(27))
    assert [[len(b) for b in pool] for pool in pooled(iter(batches), 100)] == [[8, 8, 8, 3]]
    assert list(pooled(iter([]), 4)) == []


def test_pooled_encoding_gives_each_row_its_own_vector(spark, fresh_settings, monkeypatch):
    """Several Arrow batches encoded in one call come back to their own rows, in order."""
    from restpg import embedding, models

    monkeypatch.setattr(embedding, "POOL_TEXTS", 12)  # pools of two 8-row batches, and a short last one
    previous = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "8")
    try:
        texts = [f"review {i}: the {('kettle', 'lamp', 'tent', 'drill')[i % 4]} is {'good ' * (i % 5)}fine" for i in range(40)]
        df = spark.createDataFrame([(i, t) for i, t in enumerate(texts)], "i int, text string").coalesce(1)
        got = {r.i: np.array(r.vec) for r in embedding.embed_column(df, "text", "vec", fresh_settings).collect()}
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", previous)
    alone = embedding.embed_with(models.load_embedder(fresh_settings.models.retriever, fresh_settings), texts)
    assert sorted(got) == list(range(40))
    for i in range(40):
        assert np.allclose(got[i], alone[i], atol=1e-4), i
        assert not np.allclose(got[i], alone[(i + 1) % 40], atol=1e-2)
