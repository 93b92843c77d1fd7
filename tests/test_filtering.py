"""The filter: well-formed outputs with reward ≥ τ, at most N per input; τ = 1.0 keeps what the judge
scores 10; a format_ok = false output (a forced or doubled separator included) is never kept; nothing kept
fails with the distribution and leaves the slice empty."""
from __future__ import annotations

import pytest
from helpers import make_settings, write_rows
from test_judge import PLAIN_ROWS, REASONING_ROWS, examples, trajectory_rows
from test_scoring import JUDGE_DEFAULT, JUDGE_TABLE, make_bigram_lm

from restpg import catalog, filtering, judge
from restpg.policy_inputs import policy_prompts


@pytest.mark.parametrize("rows, tau, cap, kept", [
    ([(0.9, True), (0.8, True), (0.7, True), (0.2, True)], 0.5, 10, [0, 1, 2]),
    ([(0.9, True), (0.8, True), (0.7, True), (0.2, True)], 0.5, 2, [0, 1]),
    ([(0.5, True), (0.5, True), (0.5, True)], 0.5, 2, [0, 1]),      # ties: lower sample index first; == tau passes
    ([(0.4, True), (0.1, True)], 0.5, 10, []),
    ([(1.0, False), (1.0, True), (0.0, False)], 1.0, 10, [1]),       # malformed never passes, whatever its reward
    ([(0.0, False), (0.0, True), (0.0, False)], -1.0, 10, [1]),      # ... nor with tau <= 0
    ([(0.0, False), (0.0, False)], float("-inf"), 10, []),
])
def test_keep_high_reward(spark, rows, tau, cap, kept):
    df = spark.createDataFrame([("e", i, r, ok) for i, (r, ok) in enumerate(rows)],
                               "example_id string, sample_index int, reward double, format_ok boolean")
    assert sorted(r.sample_index for r in filtering.keep_high_reward(df, tau, cap).collect()) == kept


def test_cap_applies_per_example(spark):
    df = spark.createDataFrame([(e, i, 1.0, True) for e in ("a", "b") for i in range(4)],
                               "example_id string, sample_index int, reward double, format_ok boolean")
    kept = filtering.keep_high_reward(df, 1.0, 3).toPandas()
    assert kept.groupby("example_id").size().to_dict() == {"a": 3, "b": 3}


ISSUES = {"no_separator": 2, "empty_reasoning": 0, "empty_response": 1, "length_cap": 0}


@pytest.mark.parametrize("quantiles, issues, expected", [
    ([0.1, 0.2, 0.3, 0.4, 0.55, 0.7], ISSUES,
     ["tau=1.0 (llm reward, 10 samples, 7 well-formed; no_separator=2, empty_response=1",
      "min/25%/50%/75%/90%/max = 0.100, 0.200, 0.300, 0.400, 0.550, 0.700", "--set filter.tau=0.55"]),
    ([0.3] * 6, dict.fromkeys(ISSUES, 0), ["10 samples, 10 well-formed; well-formed min", "filter.tau=0.30"]),
    (None, {**ISSUES, "length_cap": 7}, ["none well-formed: no_separator=2, empty_response=1, length_cap=7",
                                         "prompt.max_reasoning_tokens"]),
])
def test_nothing_passed_message(quantiles, issues, expected):
    message = filtering.nothing_passed_message("rest_pg", 1, 1.0, "llm", 10, quantiles, issues)
    assert message.startswith("no rest_pg output of iteration 1 has reward >= tau=1.0")
    for part in expected:
        assert part in message


@pytest.fixture(scope="module")
def judged(spark, tiny, tiny_dir, tmp_path_factory):
    """Inputs of the filter written by hand, judged by a judge whose answer is always "10"."""
    home = tmp_path_factory.mktemp("filter-home")
    judge_dir = make_bigram_lm(home / "judge", tiny_dir, JUDGE_TABLE, JUDGE_DEFAULT)
    s = make_settings(home, "judge.reward=llm", f"models.judge={judge_dir}", f"models.policy={tiny}",
                      "filter.tau=1.0", "filter.max_kept_per_input=10")
    write_rows(spark, s, "examples", examples())
    write_rows(spark, s, "retrievals", [{"example_id": e["example_id"], "task": e["task"], "retriever": s.models.retriever,
                                         "items": [{"rank": 1, "item_id": "p0", "score": 0.9, "text": "an old review"}]}
                                        for e in examples()])
    write_rows(spark, s, "trajectories", trajectory_rows("rest_pg", REASONING_ROWS) + trajectory_rows("rest_em", PLAIN_ROWS))
    judge.run(spark, s, variant="rest_pg", iteration=1, run_id="judge")
    return s


def test_tau_one_keeps_what_the_judge_scores_ten(spark, judged):
    s = judged
    report = filtering.run(spark, s, variant="rest_pg", iteration=1, run_id="filter")
    kept = catalog.read_slice(spark, s, "training_sets", {"variant": "rest_pg", "iteration": 1}).toPandas()
    well_formed = [(ex, i, raw) for ex, i, raw, _, expected in REASONING_ROWS if expected[0]]
    assert sorted(zip(kept.example_id, kept.sample_index, kept.completion)) == well_formed
    # the judge's "10" would pass tau = 1.0, but a forced or a doubled separator is never kept
    assert not {("e2", 3), ("e2", 4)} & set(zip(kept.example_id, kept.sample_index))
    assert (kept.weight == 1.0).all() and set(kept.source) == {"trajectory"} and set(kept.run_id) == {"filter"}
    prompts_ = policy_prompts(spark, s, catalog.read(spark, s, "examples"), "rest_pg").toPandas().set_index("example_id")
    assert all(p == prompts_.prompt[ex] for ex, p in zip(kept.example_id, kept.prompt))
    assert set(kept.template_version) == set(prompts_.template_version)
    assert report["samples"] == 8 and report["passed"] == report["kept"] == 2
    assert report["pass_rate"] == pytest.approx(2 / 8, abs=1e-4)
    assert report["inputs_with_kept"] == 2 and report["tau"] == 1.0
    assert report["format_issues"] == {"no_separator": 1, "empty_reasoning": 1, "empty_response": 1, "length_cap": 1,
                                       "forced_separator": 1, "double_separator": 1}
    assert report["format_ok_rate"] == pytest.approx(2 / 8, abs=1e-4)
    assert report["per_task"]["product_review"] == {"samples": 3, "passed": 1, "pass_rate": pytest.approx(1 / 3, abs=1e-4)}


def test_nothing_passed_reports_the_distribution_and_leaves_no_training_set(spark, judged):
    strict = make_settings(judged.home_dir, f"models.judge={judged.models.judge}", "judge.reward=llm", "filter.tau=2.0")
    slice_ = {"variant": "rest_pg", "iteration": 1}
    filtering.run(spark, judged, **slice_, run_id="earlier")  # an earlier filter's rows, no longer passing
    assert catalog.read_slice(spark, judged, "training_sets", slice_).count() == 2
    with pytest.raises(filtering.NothingPassed, match=r"tau=2.0 .*2 well-formed; no_separator=1.*forced_separator=1, "
                                                      r"double_separator=1.*min/25%/50%/75%/90%/max = 1.000.*filter.tau=1.00"):
        filtering.run(spark, strict, **slice_, run_id="strict")
    assert catalog.read_slice(spark, judged, "training_sets", slice_).count() == 0  # training on it fails clearly


def test_missing_judge_scores_name_the_stage(spark, judged):
    with pytest.raises(LookupError, match="run `restpg judge` first"):
        filtering.run(spark, judged, variant="rest_em", iteration=1, run_id="x")
