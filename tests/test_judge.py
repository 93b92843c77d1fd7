"""The judge stage on hand-built trajectories: the response alone is judged, recomputed from raw_text and
finished; outputs without a response to judge get reward 0, no score and their format issue."""
from __future__ import annotations

import pandas as pd
import pytest
from helpers import example_row, make_settings, rows_df, write_rows
from test_scoring import JUDGE_DEFAULT, JUDGE_TABLE, make_bigram_lm

from restpg import catalog, judge, prompts, rewards

SEP = prompts.SEPARATOR
KETTLE, EMAIL = "Great kettle, boils fast and pours cleanly.", "Hi Sam, the meeting moved to 3pm. Best, Ana"
UNRELATED = "Quarterly revenue grew in the banking sector."

# (example, sample, raw_text, finished) → (format_ok, format_issue, judged response, reasoning)
REASONING_ROWS = [
    ("e1", 0, f"- short sentences{SEP}{KETTLE}", True, (True, None, KETTLE, "- short sentences")),
    ("e1", 1, KETTLE, True, (False, "no_separator", "", None)),
    ("e1", 2, f"{SEP}{KETTLE}", True, (False, "empty_reasoning", "", "")),
    ("e2", 0, f"- signs with a first name{SEP}", True, (False, "empty_response", "", "- signs with a first name")),
    ("e2", 1, f"- signs with a first name{SEP}{EMAIL}", False, (False, "length_cap", "", "- signs with a first name")),
    # the reasoning quotes the expected output; only the unrelated response may be judged
    ("e2", 2, f"- {EMAIL}{SEP}{UNRELATED}", True, (True, None, UNRELATED, f"- {EMAIL}")),
    # well-formed to read, but the decoder wrote the separator (FORCED): a cut reasoning; and a second separator
    ("e2", 3, f"- signs with a first name{SEP}{EMAIL}", True, (False, "forced_separator", "", "- signs with a first name")),
    ("e2", 4, f"- signs with a first name{SEP}{EMAIL}{SEP}{EMAIL}", True,
     (False, "double_separator", "", "- signs with a first name")),
]
FORCED = {("e2", 3)}  # (example, sample) whose separator the decoder wrote (trajectories.reasoning_forced)
# plain variants: the whole text is the response; empty or cut at the cap is unusable, as for reasoning variants
PLAIN_ROWS = [("e1", 0, KETTLE, True, (True, None, KETTLE, None)), ("e1", 1, "", True, (False, "empty_response", "", None)),
              ("e2", 0, f"- x{SEP}{EMAIL}", True, (True, None, f"- x{SEP}{EMAIL}".strip(), None)),
              ("e2", 1, EMAIL, False, (False, "length_cap", "", None))]


def examples():
    return [example_row("e1", "u1", input="Write a review of a kettle.", target=KETTLE),
            example_row("e2", "u2", task="email_completion", input="Write an email to Sam.", target=EMAIL)]


def trajectory_rows(variant: str, rows, iteration: int = 1) -> list[dict]:
    task = {e["example_id"]: e["task"] for e in examples()}
    # the sampler's own split columns say something else: the judge must not read them
    return [{"variant": variant, "iteration": iteration, "example_id": ex, "task": task[ex], "sample_index": i,
             "raw_text": raw, "finished": fin, "reasoning_forced": (ex, i) in FORCED, "response": KETTLE,
             "reasoning": None, "has_separator": True}
            for ex, i, raw, fin, _ in rows]


@pytest.fixture(scope="module")
def home(spark, tmp_path_factory):
    """examples + trajectories of rest_pg and rest_em, iteration 1 (each test writes only judge_scores)."""
    home = tmp_path_factory.mktemp("judge-home")
    s = make_settings(home)
    write_rows(spark, s, "examples", examples())
    write_rows(spark, s, "trajectories", trajectory_rows("rest_pg", REASONING_ROWS) + trajectory_rows("rest_em", PLAIN_ROWS))
    return home


def judged(spark, s, variant: str):
    return (catalog.read_slice(spark, s, "judge_scores", {"variant": variant, "iteration": 1, "reward_kind": s.judge.reward})
            .toPandas().sort_values(["example_id", "sample_index"]).reset_index(drop=True))


@pytest.mark.parametrize("rows, issues, rate", [
    (10, {}, 1.0),
    (4, {"no_separator": 3, "length_cap": 1}, 0.0),
    (8, {"empty_response": 2}, 0.75),
    (0, {}, None),
])
def test_format_report(rows, issues, rate):
    report = judge.format_report(rows, issues)
    assert list(report["format_issues"]) == list(prompts.FORMAT_ISSUES)
    assert report["format_issues"] == {k: issues.get(k, 0) for k in prompts.FORMAT_ISSUES}
    assert report["format_ok_rate"] == rate


@pytest.mark.parametrize("variant, rows", [("rest_pg", REASONING_ROWS), ("sft_reasoning", REASONING_ROWS),
                                           ("rest_em", PLAIN_ROWS), ("sft", PLAIN_ROWS)])
def test_output_format_from_raw_text_and_finished(variant, rows):
    pdf = pd.DataFrame(trajectory_rows(variant, rows))
    out = judge.with_output_format(pdf, variant)
    assert [tuple(r) for r in out[["format_ok", "format_issue", "response", "reasoning"]].itertuples(index=False)] == \
        [r[4] for r in rows]
    assert (out.raw_text == pdf.raw_text).all()  # the input columns stay


def test_a_null_reasoning_forced_reads_as_not_forced():
    """Rows sampled before trajectories had reasoning_forced read it as null: parsed as the policy's own separator."""
    pdf = pd.DataFrame(trajectory_rows("rest_pg", REASONING_ROWS[:1] * 2)).assign(reasoning_forced=[None, float("nan")])
    assert judge.with_output_format(pdf, "rest_pg").format_ok.tolist() == [True, True]


def test_embedding_judge_scores_the_response_only(spark, home):
    s = make_settings(home, "judge.reward=embedding")
    report = judge.run(spark, s, variant="rest_pg", iteration=1, run_id="judge-test")
    out = judged(spark, s, "rest_pg")
    expected = [r[4] for r in REASONING_ROWS]
    assert list(zip(out.format_ok, out.format_issue.where(out.format_issue.notna(), None))) == [e[:2] for e in expected]
    targets = [KETTLE if ex == "e1" else EMAIL for ex, *_ in REASONING_ROWS]
    cosines = rewards.score(s, [""] * len(expected), targets, [e[2] for e in expected])
    assert out.reward.tolist() == pytest.approx(cosines, abs=1e-5)
    assert out.reward[0] > 0.99 and out.reward[5] < 0.5  # the quoted target in the reasoning did not count
    assert (out.reward[~out.format_ok] == 0.0).all() and out.score.isna().all()
    assert out.response_chars.tolist() == [len(e[2]) for e in expected]
    assert out.reasoning_chars.tolist() == [len(e[3] or "") for e in expected]
    assert set(out.reward_kind) == {"embedding"} and set(out.run_id) == {"judge-test"}
    assert report["format_issues"] == {"no_separator": 1, "empty_reasoning": 1, "empty_response": 1, "length_cap": 1,
                                       "forced_separator": 1, "double_separator": 1}
    assert report["format_ok_rate"] == pytest.approx(2 / 8, abs=1e-4) and report["rows"] == 8
    assert report["mean_reward"] == pytest.approx(sum(cosines) / 8, abs=1e-5)


def test_llm_judge_on_reasoning_and_plain_variants(spark, home, tiny_dir, tmp_path):
    judge_dir = make_bigram_lm(tmp_path / "judge", tiny_dir, JUDGE_TABLE, JUDGE_DEFAULT)
    s = make_settings(home, "judge.reward=llm", f"models.judge={judge_dir}")
    report = judge.run(spark, s, variant="rest_pg", iteration=1, run_id="pg")
    judge.run(spark, s, variant="rest_em", iteration=1, run_id="em")
    pg, em = judged(spark, s, "rest_pg"), judged(spark, s, "rest_em")
    assert len(pg) == len(REASONING_ROWS) and set(pg.run_id) == {"pg"} and set(em.run_id) == {"em"}
    ok = pg.format_ok
    assert (pg.score[ok] == 10).all() and (pg.reward[ok] == 1.0).all()  # the judge's answer is "10"
    assert pg.score[~ok].isna().all() and (pg.reward[~ok] == 0.0).all() and pg.criterion_logprobs[~ok].isna().all()
    assert all(set(dict(lp)) == {"1", "3", "5", "7", "10"} for lp in pg.criterion_logprobs[ok])
    assert set(pg.template_version) == {rewards.judge_template((1, 3, 5, 7, 10)).version}
    assert set(pg.judge_model) == {str(judge_dir)}
    # plain variants: the whole text is the response; an empty or a cut one is unusable and gets 0 unjudged
    assert em.format_ok.tolist() == [True, False, True, False]
    assert em.format_issue.where(em.format_issue.notna(), None).tolist() == [None, "empty_response", None, "length_cap"]
    assert em.reward.tolist() == [1.0, 0.0, 1.0, 0.0] and em.score.isna().tolist() == [False, True, False, True]
    assert report["format_ok_rate"] == pytest.approx(2 / 8, abs=1e-4) and report["reward_kind"] == "llm"
    # a forced or a doubled separator gets 0 unjudged, though the judge scores its text 10 when well-formed
    bad = pg.set_index(["example_id", "sample_index"]).loc[[("e2", 3), ("e2", 4)]]
    assert bad.format_issue.tolist() == ["forced_separator", "double_separator"]
    assert (bad.reward == 0.0).all() and bad.score.isna().all()


def test_missing_trajectories_name_the_stage(spark, home):
    with pytest.raises(LookupError, match="run `restpg sample` first"):
        judge.run(spark, make_settings(home, "judge.reward=embedding"), variant="rest_pg", iteration=2, run_id="x")


def test_judging_commits_in_chunks_and_a_rerun_judges_only_what_is_missing(spark, tmp_path):
    import datetime as dt

    s = make_settings(tmp_path / "home", "judge.reward=embedding", "judge.chunk_examples=1")
    write_rows(spark, s, "examples", examples())
    write_rows(spark, s, "trajectories", trajectory_rows("rest_em", PLAIN_ROWS))
    mine = {"variant": "rest_em", "iteration": 1, "reward_kind": "embedding"}

    def runs():
        return judged(spark, s, "rest_em").groupby("example_id")["run_id"].agg(lambda r: ",".join(sorted(set(r)))).to_dict()

    first = judge.run(spark, s, variant="rest_em", iteration=1, run_id="j1")
    history = spark.sql(f"DESCRIBE HISTORY delta.`{catalog.ref(s, 'judge_scores').path}`").collect()
    assert first["judged_examples"] == 2 and sum(h.operation == "MERGE" for h in history) == 2  # one commit per example
    rewards_before = judged(spark, s, "rest_em").reward.tolist()

    again = judge.run(spark, s, variant="rest_em", iteration=1, run_id="j2")  # complete: nothing to do
    assert again["judged_examples"] == 0 and again["replaced_rows"] == 0 and runs() == {"e1": "j1", "e2": "j1"}

    # a run killed after its first chunk: only e1's scores were committed; the rerun judges e2 alone
    kept = catalog.read_slice(spark, s, "judge_scores", mine).where("example_id = 'e1'")
    catalog.replace_slice(spark, s, kept, "judge_scores", mine, "killed")
    resumed = judge.run(spark, s, variant="rest_em", iteration=1, run_id="j3")
    out = judged(spark, s, "rest_em")
    assert resumed["judged_examples"] == 1 and runs() == {"e1": "j1", "e2": "j3"}
    assert len(out) == len(PLAIN_ROWS) and not out.duplicated(["example_id", "sample_index"]).any()
    assert out.reward.tolist() == pytest.approx(rewards_before, abs=1e-6)

    # a row sampled again after it was judged is judged again, and only that row
    resampled = trajectory_rows("rest_em", PLAIN_ROWS[:1])[0] | {"created_at": dt.datetime.now(), "raw_text": EMAIL}
    catalog.merge(spark, s, rows_df(spark, "trajectories", [resampled]), "trajectories", "resample",
                  slice_={"variant": "rest_em", "iteration": 1}, update=True)
    fresh = judge.run(spark, s, variant="rest_em", iteration=1, run_id="j4")
    out = judged(spark, s, "rest_em").set_index(["example_id", "sample_index"])
    assert fresh["replaced_rows"] == 1 and fresh["judged_examples"] == 1 and len(out) == len(PLAIN_ROWS)
    assert out.loc[("e1", 0), "run_id"] == "j4" and out.loc[("e1", 1), "run_id"] == "j1"

    assert judge.run(spark, s, variant="rest_em", iteration=1, run_id="j4b")["judged_examples"] == 0
    forced = judge.run(spark, s, variant="rest_em", iteration=1, run_id="j5", force=True)
    assert forced["replaced_rows"] == len(PLAIN_ROWS) and runs() == {"e1": "j5", "e2": "j5"} and forced["rows"] == len(PLAIN_ROWS)
