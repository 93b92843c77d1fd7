"""PAT's peer retrieval on the shared Amazon sample: never oneself, never an evaluation user, never
the expected output, k per trajectory, the same rows on every run."""
import json
from collections import Counter

import numpy as np
import pytest

from restpg import catalog, ingest, peer_retrieve, retrieve, tasks, user_profiles


def test_choose_peers_excludes_self_and_ranks_each_trajectory():
    pool = {"ids": ["u1", "u2", "u3", "u4"], "style": np.array([[0.0, 0.0], [0.1, 0.0], [3.0, 3.0], [0.0, 0.2]]),
            "topic": np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])}
    got = peer_retrieve.choose_peers("e1", "u1", np.zeros(2), np.array([1.0, 0.0]), pool, 2, peer_retrieve.SIMILAR)
    style = [p["peer_user_id"] for p in got if p["trajectory"] == "style"]
    topic = [p["peer_user_id"] for p in got if p["trajectory"] == "topic"]
    assert style == ["u2", "u4"] and topic == ["u3", "u4"]  # u1 is the example's own user: never a peer
    assert [p["rank"] for p in got] == [1, 2, 1, 2]
    rand = peer_retrieve.choose_peers("e1", "u1", np.zeros(2), np.array([1.0, 0.0]), pool, 3, peer_retrieve.RANDOM)
    assert all(p["peer_user_id"] != "u1" for p in rand) and Counter(p["trajectory"] for p in rand) == {"style": 3, "topic": 3}
    assert rand == peer_retrieve.choose_peers("e1", "u1", np.zeros(2), np.array([1.0, 0.0]), pool, 3, peer_retrieve.RANDOM)


@pytest.fixture(scope="module")
def amazon_peers(spark, amazon_path, tmp_path_factory):
    """10 train users, 4 test users, and a test user who copies a train user's profile and whose expected
    output is that user's most relevant review (a peer item that must never come back)."""
    from helpers import make_settings

    tmp = tmp_path_factory.mktemp("peers")
    recs = [json.loads(x) for x in amazon_path.read_text().splitlines()[:14]]
    spec, victim = tasks.TASKS["product_review"], recs[1]
    copier = dict(victim, reviewerId="copier", output=victim["profile"][0]["reviewText"],
                  input=tasks.item_text(spec, victim["profile"][0]))
    s = make_settings(tmp / "home", "retrieve.k=3")
    for split, rows in (("train", recs[:10]), ("test", recs[10:] + [copier])):
        path = tmp / f"{split}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        ingest.run(spark, s, source=str(path), task="product_review", split=split, run_id=f"ingest-{split}")
    user_profiles.run(spark, s, run_id="profiles")
    report = peer_retrieve.run(spark, s, run_id="peers")
    rows = [r.asDict() for r in catalog.read(spark, s, "peer_retrievals").orderBy("example_id", "trajectory", "rank").collect()]
    again_report = peer_retrieve.run(spark, s, run_id="peers-again")
    again = [r.asDict() for r in catalog.read(spark, s, "peer_retrievals").orderBy("example_id", "trajectory", "rank").collect()]
    examples = {r.example_id: r.asDict(recursive=True) for r in catalog.read(spark, s, "examples").collect()}
    return {"settings": s, "rows": rows, "again": again, "report": report, "again_report": again_report,
            "examples": examples, "train_users": {r["reviewerId"] for r in recs[:10]}, "victim": victim}


@pytest.mark.slow
def test_no_self_peers_and_no_evaluation_users(amazon_peers):
    rows, examples = amazon_peers["rows"], amazon_peers["examples"]
    assert rows and {r["example_id"] for r in rows} == set(examples)  # every example has peers
    for r in rows:
        assert r["peer_user_id"] != r["user_id"]
        assert r["peer_user_id"] in amazon_peers["train_users"]  # test users are never anyone's peer


@pytest.mark.slow
def test_no_item_equals_the_expected_output(amazon_peers):
    by_id = amazon_peers["examples"]
    for r in amazon_peers["rows"]:
        assert retrieve.normalize(r["text"]) != retrieve.normalize(by_id[r["example_id"]]["target"])
    copier = [r for r in amazon_peers["rows"] if r["user_id"] == "copier"]
    leaked = amazon_peers["victim"]["profile"][0]["reviewText"]
    victim = amazon_peers["victim"]["reviewerId"]
    # the copier's profile is the victim's: the victim is its nearest writer, yet not the review it must write
    assert [r["peer_user_id"] for r in copier if r["trajectory"] == "style" and r["rank"] == 1] == [victim]
    assert all(leaked not in r["text"] for r in copier)


@pytest.mark.slow
def test_k_peers_per_trajectory_with_both_similarities(amazon_peers):
    k = amazon_peers["settings"].retrieve.k
    groups = Counter((r["example_id"], r["trajectory"]) for r in amazon_peers["rows"])
    assert set(groups.values()) == {k} and len(groups) == 2 * len(amazon_peers["examples"])
    for (eid, trajectory) in groups:
        mine = [r for r in amazon_peers["rows"] if r["example_id"] == eid and r["trajectory"] == trajectory]
        assert [r["rank"] for r in mine] == list(range(1, k + 1))
        key = "style_similarity" if trajectory == "style" else "topic_similarity"
        assert [r[key] for r in mine] == sorted((r[key] for r in mine), reverse=True)
    assert amazon_peers["report"]["trajectories"]["style"]["items"] == k * len(amazon_peers["examples"])


@pytest.mark.slow
def test_deterministic_across_runs(amazon_peers):
    strip = lambda rows: [{c: r[c] for c in peer_retrieve.COLUMNS} for r in rows]
    assert strip(amazon_peers["again"]) == strip(amazon_peers["rows"])
