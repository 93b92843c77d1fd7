"""Rewards as plain functions: criteria from one source, the argmax rule, empty responses, and the same
numbers in process (`score`) and on Spark (`add_rewards`)."""
from __future__ import annotations

import math

import pytest
from helpers import make_settings
from test_scoring import JUDGE_DEFAULT, JUDGE_TABLE, make_bigram_lm

from restpg import models, prompts, rewards

SCORES = (1, 3, 5, 7, 10)
MINILM = "packaged:all-minilm-l6-v2"


@pytest.fixture(scope="module")
def bigram_judge(tiny_dir, tmp_path_factory) -> str:
    return str(make_bigram_lm(tmp_path_factory.mktemp("bigram-judge"), tiny_dir, JUDGE_TABLE, JUDGE_DEFAULT))


@pytest.fixture
def llm_settings(tmp_path, bigram_judge):
    return make_settings(tmp_path, "judge.reward=llm", f"models.judge={bigram_judge}")


@pytest.fixture
def embedding_settings(tmp_path):
    return make_settings(tmp_path, "judge.reward=embedding", f"models.retriever={MINILM}")


@pytest.mark.parametrize("logprobs, expected", [
    ({"1": -0.1, "3": -2, "5": -3, "7": -4, "10": -5}, 1),
    ({"1": -3, "3": -2, "5": -3, "7": -4, "10": -0.5}, 10),
    ({"1": -1, "3": -1, "5": -2, "7": -2, "10": -3}, 1),    # ties go to the lower score
    ({"1": -9, "3": -9, "5": -9, "7": -0.7, "10": -0.7}, 7),
    ({"1": -math.inf, "3": -math.inf, "5": -1, "7": -math.inf, "10": -math.inf}, 5),
])
def test_pick_score(logprobs, expected):
    assert rewards.pick_score(logprobs, list(SCORES)) == expected


def test_criteria_come_from_the_configured_scores():
    full = rewards.judge_template(SCORES).render("Write a review.", "Great kettle.", "Nice kettle.")
    lines = [ln for ln in full.splitlines() if ln.startswith("Score ")]
    assert [int(ln.split()[1].rstrip(":")) for ln in lines] == list(SCORES)
    assert "Score 10: The answer is completely accurate and aligns perfectly with the reference." in lines
    assert full.endswith("[Score]:\n")  # the label starts on a line of its own
    assert "=== prompt ===" not in full and "[Ground truth]: Great kettle." in full
    subset = rewards.judge_template((1, 5, 10))
    assert [ln.split(":")[0] for ln in subset.render("x", "y", "z").splitlines() if ln.startswith("Score ")] == \
        ["Score 1", "Score 5", "Score 10"]
    assert subset.labels == ["1", "5", "10"] and subset.version == prompts.template("judge").version


def test_values_with_braces_render_verbatim():
    text = rewards.judge_template(SCORES).render("{input}", "a {target} b", "{criteria} {0}")
    assert "[Instruction]: {input}" in text and "[AI assistant's Answer]: {criteria} {0}" in text


@pytest.mark.parametrize("scores, message", [
    ((1, 3, 5, 7, 9), r"no criterion for \[9\]"),
    ((1, 1, 10), "distinct positive integers"),
    ((10,), "at least two"),
    ((0, 10), "positive"),
])
def test_scores_without_a_criterion_fail_clearly(scores, message):
    with pytest.raises(rewards.JudgeTemplateError, match=message):
        rewards.judge_template(scores)


@pytest.mark.parametrize("text, message", [
    ("Score 1: a\nScore 10: b\n{criteria}", "no '=== prompt ===' line"),
    ("Score one: a\n=== prompt ===\n{criteria}", "not 'Score N: description'"),
    ("Score 1: a\n=== prompt ===\n[Score]:\n", r"no \{criteria\} slot"),
])
def test_malformed_template_fails(text, message):
    with pytest.raises(rewards.JudgeTemplateError, match=message):
        rewards.parse_criteria(text)


def test_long_judge_prompt_is_fitted_to_the_budget(lm):
    _, tokenizer = lm
    from restpg import generation

    template = rewards.judge_template(SCORES)
    short = rewards.fit_judge_prompt(tokenizer, template, "Write.", "kettle " * 10, "tea " * 10, 4096)
    assert short == template.render("Write.", "kettle " * 10, "tea " * 10)
    budget = generation.count_tokens(tokenizer, short) + 100
    fitted = rewards.fit_judge_prompt(tokenizer, template, "Write.", "kettle " * 400, "tea " * 400, budget)
    assert generation.count_tokens(tokenizer, fitted) <= budget and fitted.endswith("[Score]:\n")


@pytest.mark.parametrize("kind", ["llm", "embedding"])
def test_empty_responses_get_zero_without_a_model(tmp_path, kind):
    missing = str(tmp_path / "no-such-model")  # loading it would fail
    s = make_settings(tmp_path, f"judge.reward={kind}", f"models.judge={missing}", f"models.retriever={missing}")
    before = models.load_count()
    assert rewards.score(s, ["a", "b", "c"], ["t", "t", "t"], ["", "   ", None]) == [0.0, 0.0, 0.0]
    assert models.load_count() == before


def test_llm_score_in_process(llm_settings):
    got = rewards.score(llm_settings, ["Write.", "Write.", "Write."], ["Great kettle."] * 3, ["Nice kettle.", "", "Tea."])
    assert got == [1.0, 0.0, 1.0]  # the bigram judge answers "10" to every non-empty response


def test_embedding_score_in_process(embedding_settings):
    target = "The kettle boils water quickly and looks great on the counter."
    responses = [target, "Quarterly revenue grew in the banking sector.", ""]
    got = rewards.score(embedding_settings, ["Write."] * 3, [target] * 3, responses)
    assert got[0] == pytest.approx(1.0, abs=1e-4) and 0.0 < got[1] < 0.5 and got[2] == 0.0
    env = models.worker_env(embedding_settings)
    assert rewards.embedding_rewards(responses, [target] * 3, MINILM, env) == pytest.approx(got, abs=1e-6)


def test_score_checks_lengths(llm_settings):
    with pytest.raises(ValueError, match="differ in length"):
        rewards.score(llm_settings, ["a"], ["b", "c"], ["d"])


def test_template_mismatch_fails_before_spark_work(spark, tmp_path, bigram_judge):
    s = make_settings(tmp_path, "judge.reward=llm", f"models.judge={bigram_judge}", "judge.scores=[1, 4, 10]")
    df = spark.createDataFrame([("x", "y", "z")], "input string, target string, response string")
    with pytest.raises(rewards.JudgeTemplateError, match=r"no criterion for \[4\]"):
        rewards.add_rewards(spark, s, df)
    with pytest.raises(rewards.JudgeTemplateError):
        rewards.score(s, ["x"], ["y"], ["z"])


ROWS = [("a", "Write a review.", "Great kettle, boils fast.", "Great kettle, boils fast."),
        ("b", "Write a review.", "Great kettle, boils fast.", "Quarterly revenue grew."),
        ("c", "Write an email.", "Hi Sam, see you at 3.", ""),
        ("d", "Write an email.", "Hi Sam, see you at 3.", None)]


@pytest.mark.parametrize("kind", ["llm", "embedding"])
def test_spark_rewards_equal_in_process_rewards(spark, kind, llm_settings, embedding_settings):
    s = llm_settings if kind == "llm" else embedding_settings
    df = spark.createDataFrame(ROWS, "id string, input string, target string, response string")
    out = rewards.add_rewards(spark, s, df).toPandas().sort_values("id").reset_index(drop=True)
    assert list(out.columns) == ["id", "input", "target", "response", "reward", "score", "criterion_logprobs",
                                 "reward_terms", "reward_kind", "judge_model", "template_version"]
    assert [dict(t) for t in out.reward_terms] == [{"quality": r} for r in out.reward]  # no composite: quality only
    expected = rewards.score(s, [r[1] for r in ROWS], [r[2] for r in ROWS], [r[3] for r in ROWS])
    assert out.reward.tolist() == pytest.approx(expected, abs=1e-5)
    assert out.reward[2] == 0.0 and out.reward[3] == 0.0
    assert set(out.reward_kind) == {kind} and set(out.judge_model) == {rewards.judge_model(s)}
    assert out.score[2:].isna().all() and out.criterion_logprobs[2:].isna().all()
    if kind == "llm":
        assert out.score[:2].tolist() == [10, 10]
        assert set(dict(out.criterion_logprobs[0])) == {"1", "3", "5", "7", "10"}
        assert set(out.template_version) == {rewards.judge_template(SCORES).version}
    else:
        assert out.score.isna().all() and out.template_version.isna().all()
        assert out.reward[0] > out.reward[1]


TERSE = "Great kettle. Fast. Cheap. Love it."
WORDY = ("I have to say that this kettle, which I bought last spring for my small kitchen, has turned out to be "
         "one of the more pleasant purchases I have made in a long while; it boils quickly, and it is quiet")


def test_style_fidelity_compares_how_texts_are_written_not_what_they_say():
    same_style_other_topic = "Great phone. Bright. Cheap. Love it."
    assert rewards.style_fidelity(TERSE, TERSE) == pytest.approx(1.0)
    assert rewards.style_fidelity(TERSE, same_style_other_topic) > rewards.style_fidelity(TERSE, WORDY) + 0.2
    assert rewards.style_fidelity(TERSE, WORDY) == pytest.approx(rewards.style_fidelity(WORDY, TERSE))
    assert rewards.style_fidelity("", TERSE) == 0.0 and rewards.style_fidelity(TERSE, "  ") == 0.0
    assert 0.0 <= rewards.style_fidelity(TERSE, "12345 67890") <= 1.0


def test_composite_is_the_weighted_mean_and_its_kind_names_the_weights(tmp_path):
    plain = make_settings(tmp_path, "judge.reward=llm")
    assert rewards.kind_label(plain) == "llm" and rewards.weights(plain) == {"quality": 1.0, "style": 0.0, "topic": 0.0}
    s = make_settings(tmp_path, "judge.reward=embedding", "judge.style_weight=0.5", "judge.topic_weight=0.25")
    assert rewards.kind_label(s) == "embedding+style=0.5+topic=0.25"
    terms = {"quality": 0.8, "style": 0.4, "topic": 0.2}
    assert rewards.composite(terms, rewards.weights(s)) == pytest.approx((0.8 + 0.5 * 0.4 + 0.25 * 0.2) / 1.75)
    assert rewards.topic_relevance([1.0, 0.0], [-1.0, 0.0]) == 0.0  # floored: an off-topic answer earns nothing
    from restpg.config import ConfigError

    with pytest.raises(ConfigError, match="judge.style_weight must be at least 0"):
        make_settings(tmp_path, "judge.style_weight=-1")


def test_composite_reward_stores_every_term_and_ranks_style_and_topic(spark, tmp_path):
    """The quality term is the configured reward alone; style and topic move the composite. Of two answers
    equally far from the expected output in meaning, the one written like the user scores higher."""
    s = make_settings(tmp_path, "judge.reward=embedding", f"models.retriever={MINILM}", "judge.style_weight=1.0",
                      "judge.topic_weight=1.0")
    target = "Great kettle. Boils fast. Quiet. Love it."
    rows = [("like", "Review a kettle.", target, "Good kettle. Heats quick. Silent. Like it."),
            ("unlike", "Review a kettle.", target, "This kettle, which I purchased recently, heats water in a reasonably "
                                                  "short time and operates without producing much noise at all"),
            ("off", "Review a kettle.", target, "Quarterly revenue grew in the banking sector."),
            ("empty", "Review a kettle.", target, "")]
    df = spark.createDataFrame(rows, "id string, input string, target string, response string")
    out = {r.id: r for r in rewards.add_rewards(spark, s, df).collect()}
    quality = rewards.score(make_settings(tmp_path, "judge.reward=embedding", f"models.retriever={MINILM}"),
                            [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    for (rid, *_), q in zip(rows, quality):
        terms = dict(out[rid].reward_terms)
        assert set(terms) == {"quality", "style", "topic"} and terms["quality"] == pytest.approx(q, abs=1e-5)
        assert out[rid].reward == pytest.approx(rewards.composite(terms, rewards.weights(s)), abs=1e-9)
        assert out[rid].reward_kind == "embedding+style=1+topic=1"
    assert dict(out["empty"].reward_terms) == {"quality": 0.0, "style": 0.0, "topic": 0.0} and out["empty"].reward == 0.0
    assert dict(out["like"].reward_terms)["style"] > dict(out["unlike"].reward_terms)["style"]
    assert dict(out["like"].reward_terms)["topic"] > dict(out["off"].reward_terms)["topic"]
    assert out["like"].reward > out["unlike"].reward


def test_llm_rewards_of_interleaved_requests_keep_their_rows(tiny_dir, settings):
    """The LLM judge scores the prompts of one request side by side (to share their prefix) and gives each
    row back its own judgement: equal to judging that row's prompt alone."""
    inputs = ["Write a review of a kettle.", "Write an email about the meeting."] * 3
    targets = ["Great kettle, boils fast.", "Hi Sam, the meeting moved to 3pm."] * 3
    responses = ["Nice kettle.", "See you at three.", "It boils water in a minute, quietly.", "Hi all", "Tea.", "Moved."]
    scores = (1, 3, 5, 7, 10)
    tiny_dir = str(tiny_dir)
    got = rewards.reward_rows("llm", tiny_dir, settings, scores, 4096, inputs, targets, responses)
    model, tokenizer = models.cached_causal_lm(tiny_dir, settings)
    template = rewards.judge_template(scores)
    for row, i, t, r in zip(got, inputs, targets, responses):
        (alone,) = rewards.judge_with(model, tokenizer, [rewards.fit_judge_prompt(tokenizer, template, i, t, r, 4096)], scores)
        assert row.criterion_logprobs == pytest.approx(alone.criterion_logprobs, abs=2e-4) and row.score == alone.score
    assert len({tuple(sorted(j.criterion_logprobs.items())) for j in got}) == len(responses)  # every row differs
