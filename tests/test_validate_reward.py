"""Reward validation as a gate: the decision as pure functions, and the stage on hand-built examples."""
import math

import numpy as np
import pytest

from helpers import example_row, make_settings, write_rows
from restpg import catalog, retrieve, validate_reward as vr

RIGHT = {"self": 1.0, "same_user": 0.6, "other_user": 0.3}


def _line(slope, noise=0.05, n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = np.repeat([0, 0.25, 0.5, 0.75, 1.0], n)
    return x, 0.6 + slope * x + rng.normal(0, noise, len(x))


@pytest.mark.parametrize("slope, falls", [(-0.3, True), (0.0, False), (0.3, False)])
def test_shuffle_trend_is_one_sided(slope, falls):
    got, p = vr.shuffle_trend(*_line(slope))
    assert (got < 0 and p < 0.05) is falls
    if slope > 0:
        assert p > 0.5  # rising is the opposite of the evidence asked for, not merely "not enough" of it


@pytest.mark.parametrize("x, y, expected", [
    ([0, 0.5, 1, 0, 0.5, 1], [0.4] * 6, (0.0, 1.0)),   # a constant reward: blind to the profile
    ([0, 1], [0.5, 0.1], (math.nan, math.nan)),        # too few points to tell
    ([0.5, 0.5, 0.5], [0.1, 0.2, 0.3], (math.nan, math.nan)),
])
def test_shuffle_trend_degenerate(x, y, expected):
    got = vr.shuffle_trend(x, y)
    assert got == pytest.approx(expected, nan_ok=True)


@pytest.mark.parametrize("slope, p, means, fit", [
    (-0.2, 0.001, RIGHT, True),                                              # falls significantly, right order
    (0.0, 1.0, RIGHT, False),                                                # flat
    (0.15, 0.999, RIGHT, False),                                             # rising
    (-0.2, 0.2, RIGHT, False),                                               # falls, but not significantly
    (-0.2, 0.001, {"self": 1.0, "same_user": 0.3, "other_user": 0.6}, False),  # other user beats same user
    (-0.2, 0.001, {"self": 0.5, "same_user": 0.6, "other_user": 0.3}, False),  # self not on top
    (-0.2, 0.001, {"self": 1.0, "same_user": 0.6}, False),                   # a check that could not run
    (math.nan, math.nan, RIGHT, False),
    (-0.2, 0.049, RIGHT, True),
    (-0.2, 0.05, RIGHT, False),                                              # p must be below alpha
])
def test_verdict(slope, p, means, fit):
    verdict = vr.Verdict(slope, p, 0.05, means)
    assert verdict.fit is fit
    assert verdict.shuffle_fit is vr.shuffle_fit(slope, p, 0.05) and verdict.direct_fit is vr.direct_fit(means)


def test_unfit_error_carries_the_numbers():
    err = vr.RewardUnfit("embedding", "minilm", vr.Verdict(0.0123, 0.4567, 0.05, {"self": 1.0, "same_user": 0.2, "other_user": 0.3}))
    text = str(err)
    assert "0.0123" in text and "0.4567" in text and "0.2" in text and "0.3" in text and "allow_unfit_reward" in text
    assert err.verdict.slope == 0.0123


def test_shuffle_levels_are_nested_and_exact():
    ids = [f"e{i}" for i in range(10)]
    order = vr.shuffle_order(ids)
    assert sorted(order) == sorted(ids) and order == vr.shuffle_order(list(reversed(ids)))
    picked = {p: {e for i, e in enumerate(order) if vr.shuffled_at(i, 10, p)} for p in vr.SHUFFLE_LEVELS}
    assert [len(picked[p]) for p in vr.SHUFFLE_LEVELS] == [0, 2, 5, 8, 10]  # round(n·S/100)
    assert picked[25] <= picked[50] <= picked[75] <= picked[100]


def test_donors_are_other_users():
    rows = [{"example_id": f"e{i}", "user_id": f"u{i % 3}"} for i in range(9)]
    user = {r["example_id"]: r["user_id"] for r in rows}
    got = vr.donors(rows)
    assert set(got) == set(user) and all(user[d] != user[e] for e, d in got.items())
    assert vr.donors([{"example_id": "a", "user_id": "u"}, {"example_id": "b", "user_id": "u"}]) == {}


@pytest.mark.parametrize("own, shuffled, falls", [(0.8, 0.3, True), (0.5, 0.5, False), (0.3, 0.8, False)])
def test_levels_mix_own_and_shuffled_answers(own, shuffled, falls):
    rows = [{"example_id": f"e{i}", "user_id": f"u{i % 4}"} for i in range(20)]
    donor = vr.donors(rows)
    noise = [0.02 * ((i * 7) % 5 - 2) for i in range(20)]  # mean 0, different for own and shuffled answers
    reward = {f"own|e{i}": own + noise[i] for i in range(20)} | {f"shuffled|e{i}": shuffled + noise[19 - i] for i in range(20)}
    levels, xs, ys = vr._assemble(rows, donor, reward)
    assert [lv["setting"] for lv in levels] == ["S=0", "S=25", "S=50", "S=75", "S=100"] and all(lv["n"] == 20 for lv in levels)
    assert levels[0]["mean_reward"] == pytest.approx(np.mean([reward[f"own|e{i}"] for i in range(20)]))
    assert levels[-1]["mean_reward"] == pytest.approx(np.mean([reward[f"shuffled|e{i}"] for i in range(20)]))
    assert len(xs) == len(ys) == 100
    assert vr.Verdict(*vr.shuffle_trend(xs, ys), 0.05, RIGHT).fit is falls


def test_own_writing_is_the_document_field():
    item = {"text": "summary: ok\nreviewText: Nice kettle.", "fields": {"summary": "ok", "reviewText": "Nice kettle."}}
    assert vr.own_writing("product_review", item) == "Nice kettle."
    assert vr.own_writing("product_review", {"text": "plain", "fields": {}}) == "plain"


def test_default_policy_is_the_trained_sft_model(tmp_path):
    with pytest.raises(LookupError, match="train SFT|restpg train"):  # never the untrained base
        vr.run(None, make_settings(tmp_path / "home"), run_id="x")


TOPICS = {"u0": "tea kettle that boils water", "u1": "running shoes for marathon training", "u2": "garden hose for watering plants"}


def _examples():
    rows = []
    for user, topic in TOPICS.items():
        for j in range(2):
            rows.append(example_row(
                f"{user}-e{j}", user, split="val", input=f"Write a review of a {topic}.",
                target=f"My review {j}: this {topic} is great, I use it every day.",
                profile=[{"item_id": f"{user}-p{i}", "text": f"Review {i}: a {topic}, solid and well made."} for i in range(3)]))
    return rows


def test_stage_gates_an_unfit_reward_and_records_it(spark, tiny, tmp_path, capsys):
    s = make_settings(tmp_path / "home", "judge.reward=embedding", f"models.policy={tiny}", "prompt.max_input_tokens=200",
                      "prompt.max_reasoning_tokens=4", "prompt.max_response_tokens=8", "validate.examples=6", "retrieve.k=2")
    write_rows(spark, s, "examples", _examples() + [example_row("t-e0", "u9", split="train")])
    retrieve.run(spark, s, run_id="ret")

    with pytest.raises(vr.RewardUnfit) as raised:  # a random tiny model: its outputs do not track the profile
        vr.run(spark, s, run_id="rv1", policy=tiny)
    verdict = raised.value.verdict
    assert not verdict.shuffle_fit and verdict.direct_fit  # MiniLM orders self > same user > other user here
    rows = catalog.read(spark, s, "reward_validation").toPandas()
    assert set(rows["run_id"]) == {"rv1"} and not rows["fit"].all()  # recorded before raising

    capsys.readouterr()
    report = vr.run(spark, s, run_id="rv2", policy=tiny, allow_unfit=True)
    err = capsys.readouterr().err  # the policy's answers show progress: 6 examples, own and shuffled profile
    assert "validate_reward: sft answers (own and shuffled profile) [" in err and "12/12 (100%)" in err
    assert "going on with the unfit embedding reward" in err and "Warning" not in err  # one line, no Python warning
    assert report["fit"] is False and report["rows"] == 8 and "NOT fit" in report["verdict"]
    assert report["slope"] == pytest.approx(verdict.slope) and report["p_value"] == pytest.approx(verdict.p_value)
    rows = catalog.read(spark, s, "reward_validation").toPandas()
    assert len(rows) == 8 and set(rows["run_id"]) == {"rv2"}  # its slice replaced, not appended to
    shuffle = rows[rows["check"] == "shuffle"].set_index("setting")
    assert list(sorted(shuffle.index)) == ["S=0", "S=100", "S=25", "S=50", "S=75"] and (shuffle["n"] == 6).all()
    assert (shuffle["p_value"] == report["p_value"]).all() and (shuffle["policy"] == tiny).all() and not shuffle["fit"].any()
    direct = rows[rows["check"] == "direct"].set_index("setting")
    assert direct.loc["self", "mean_reward"] == pytest.approx(1.0, abs=1e-4) and direct["fit"].all()
    assert direct.loc["same_user", "mean_reward"] > direct.loc["other_user", "mean_reward"]
    assert set(rows["reward_kind"]) == {"embedding"} and set(rows["judge_model"]) == {s.models.retriever}
