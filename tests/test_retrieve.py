import json

import numpy as np

from restpg import ingest, retrieve, tasks


def test_top_k_orders_by_score_and_handles_empty():
    q = np.array([1.0, 0.0])
    vecs = np.array([[0.2, 0.9], [0.9, 0.1], [0.5, 0.5]])
    got = retrieve.top_k(q, vecs, ["a", "b", "c"], ["A", "B", "C"], k=2)
    assert [g["item_id"] for g in got] == ["b", "c"] and [g["rank"] for g in got] == [1, 2]
    assert retrieve.top_k(q, np.zeros((0, 2)), [], [], k=5) == []


def test_retrieval_on_amazon_sample(spark, fresh_settings, amazon_path, tmp_path):
    # 60 real users, one of whom asks for exactly an item of their own profile, and one cold-start user
    lines = amazon_path.read_text().splitlines()[:60]
    recs = [json.loads(x) for x in lines]
    copied = tasks.item_text(tasks.TASKS["product_review"], recs[0]["profile"][2])
    copier = dict(recs[0], reviewerId="copier", input=copied)
    cold = dict(recs[1], reviewerId="cold", profile=[])
    path = tmp_path / "sample.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs + [copier, cold]) + "\n")
    s = fresh_settings
    ingest.run(spark, s, str(path), task="product_review", split="train")
    report = retrieve.run(spark, s, run_id="t")
    assert report["examples"] == 62 and report["cold_start"] == 1 and report["k"] == s.retrieve.k

    rows = spark.sql("""
        SELECT r.example_id, r.user_id, r.items, size(e.profile) AS n_profile
        FROM restpg.retrievals r JOIN restpg.examples e USING (example_id)""").collect()
    for row in rows:
        assert len(row["items"]) == min(s.retrieve.k, row["n_profile"])
        scores = [it["score"] for it in row["items"]]
        assert scores == sorted(scores, reverse=True)
        assert [it["rank"] for it in row["items"]] == list(range(1, len(scores) + 1))
    by_user = {r.user_id: r for r in rows}
    assert by_user["cold"]["items"] == []
    first = by_user["copier"]["items"][0]
    assert first["text"] == copied and first["score"] > 0.99
    assert by_user["copier"]["items"][1]["score"] < first["score"]

    again = retrieve.run(spark, s, run_id="t2")
    assert again["examples"] == 62  # re-run replaces its slice, never duplicates
