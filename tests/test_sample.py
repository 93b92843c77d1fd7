"""E-step sampling on hand-built examples and the tiny model: samples belong to their policy, a
crashed run resumes with only the missing keys, plain and reasoning variants have separate length
caps, and every row carries its output parse."""
from __future__ import annotations

import dataclasses
import re

import pandas as pd
import pytest

from helpers import example_row, make_settings, make_tiny_lm, tiny_overrides, write_rows
from restpg import catalog, generation, models, prompts, sample

M = 3
TRAIN = ["ex-1", "ex-2", "ex-3"]
KEY = ["example_id", "sample_index"]


@pytest.fixture(scope="module")
def home(spark, tiny, tmp_path_factory):
    """Three train examples (ex-3 without retrievals) and one test example; a run commits one chunk."""
    s = make_settings(tmp_path_factory.mktemp("sample-home"), *tiny_overrides(tiny, m=M), f"sample.chunk_examples={len(TRAIN)}")
    write_rows(spark, s, "examples", [example_row("ex-1", "u1"), example_row("ex-2", "u1", task="topic_writing"),
                                      example_row("ex-3", "u2"), example_row("ex-9", "u2", split="test")])
    write_rows(spark, s, "retrievals", [
        {"example_id": e, "retriever": s.models.retriever, "k": 1,
         "items": [{"rank": 1, "item_id": f"{e}-p0", "score": 0.9, "text": "u1 wrote review 0 about tea and kettles."}]}
        for e in ("ex-1", "ex-2", "ex-9")])
    return s


@pytest.fixture(scope="module")
def policy_b(tmp_path_factory) -> str:
    """A second policy: same architecture and tokenizer, other weights."""
    return str(make_tiny_lm(tmp_path_factory.mktemp("policy-b"), seed=1))


@pytest.fixture(scope="module")
def plain_by_a(spark, home, tiny):
    """rest_em t=1 sampled by policy A: (report, rows)."""
    report = sample.run(spark, home, variant="rest_em", iteration=1, policy=tiny, run_id="a")
    return report, slice_rows(spark, home, "rest_em", 1)


def slice_rows(spark, s, variant: str, iteration: int) -> pd.DataFrame:
    rows = catalog.read_slice(spark, s, "trajectories", {"variant": variant, "iteration": iteration}).toPandas()
    return rows.sort_values(KEY).reset_index(drop=True)


def full_keys() -> list[tuple]:
    return [(e, j) for e in TRAIN for j in range(M)]


@pytest.mark.parametrize("variant, raw, finished, expected, forced", [(*case, False) for case in [
    ("rest_em", "  A fine kettle.  ", True, (None, "A fine kettle.", False, True, None)),
    ("rest_em", "  A fine kettle.  ", False, (None, "", False, False, prompts.LENGTH_CAP)),  # cut: as for rest_pg
    ("rest_em", "  ", True, (None, "", False, False, prompts.EMPTY_RESPONSE)),
    ("rest_em", f"r{prompts.SEPARATOR}y", True, (None, f"r{prompts.SEPARATOR}y".strip(), False, True, None)),
    ("rest_pg", f"Likes tea.{prompts.SEPARATOR}A fine kettle.", True, ("Likes tea.", "A fine kettle.", True, True, None)),
    ("rest_pg", f"Likes tea.{prompts.SEPARATOR}A fine kettle.", False, ("Likes tea.", "", True, False, prompts.LENGTH_CAP)),
    ("rest_pg", "A fine kettle.", True, (None, "", False, False, prompts.NO_SEPARATOR)),
    ("rest_pg", f"{prompts.SEPARATOR}A fine kettle.", True, ("", "", True, False, prompts.EMPTY_REASONING)),
    ("rest_pg", f"Likes tea.{prompts.SEPARATOR}  ", True, ("Likes tea.", "", True, False, prompts.EMPTY_RESPONSE)),
    # a second separator: the response does not end where the format says
    ("rest_pg", f"Likes tea.{prompts.SEPARATOR}A fine kettle.{prompts.SEPARATOR}Again.", True,
     ("Likes tea.", "", True, False, prompts.DOUBLE_SEPARATOR)),
    ("rest_pg", f"Likes tea.{prompts.SEPARATOR}A fine kettle.{prompts.SEPARATOR}", True,
     ("Likes tea.", "", True, False, prompts.DOUBLE_SEPARATOR)),
]] + [
    # the decoder wrote the separator (reasoning budget or an early end): unusable however whole it reads
    ("rest_pg", f"Likes tea.{prompts.SEPARATOR}A fine kettle.", True, ("Likes tea.", "", True, False, prompts.FORCED_SEPARATOR), True),
    ("rest_pg", f"{prompts.SEPARATOR}A fine kettle.", True, ("", "", True, False, prompts.FORCED_SEPARATOR), True),
    ("rest_em", "  A fine kettle.  ", True, (None, "A fine kettle.", False, True, None), True),  # plain: no separator to force
])
def test_parse_frame_stores_the_output_parse(variant, raw, finished, expected, forced):
    got = sample.parse_frame(variant, pd.Series([raw]), pd.Series([finished]), pd.Series([forced])).iloc[0]
    got = tuple(None if v is None or (isinstance(v, float) and pd.isna(v)) else v for v in got)
    assert got == expected


def test_with_parse_adds_typed_columns_in_spark(spark):
    df = spark.createDataFrame([("a", f"Likes tea.{prompts.SEPARATOR}A kettle.", True, False), ("b", "no marker", True, False),
                                ("c", f"Likes tea.{prompts.SEPARATOR}A kettle.", True, True)],
                               "example_id string, text string, finished boolean, reasoning_forced boolean")
    out = {r.example_id: r for r in sample.with_parse(df, "rest_pg").collect()}
    assert (out["a"].reasoning, out["a"].response, out["a"].has_separator, out["a"].format_ok, out["a"].format_issue) == \
        ("Likes tea.", "A kettle.", True, True, None)
    assert (out["b"].response, out["b"].format_ok, out["b"].format_issue) == ("", False, prompts.NO_SEPARATOR)
    assert (out["c"].response, out["c"].has_separator, out["c"].format_ok, out["c"].format_issue) == \
        ("", True, False, prompts.FORCED_SEPARATOR)
    assert dict(sample.with_parse(df, "rest_pg").dtypes)["format_ok"] == "boolean"


def test_samples_belong_to_their_policy(spark, home, tiny, policy_b, plain_by_a):
    first, a = plain_by_a
    assert list(zip(a.example_id, a.sample_index)) == full_keys()  # train inputs only, with or without retrievals
    assert set(a.policy_version) == {tiny} and first["sampled_examples"] == len(TRAIN)

    second = sample.run(spark, home, variant="rest_em", iteration=1, policy=policy_b, run_id="b")
    b = slice_rows(spark, home, "rest_em", 1)
    assert list(zip(b.example_id, b.sample_index)) == full_keys()  # old rows replaced, no mixture, no duplicates
    assert set(b.policy_version) == {policy_b} and set(b.run_id) == {"b"}
    assert (a.seed == b.seed).all() and (a.raw_text != b.raw_text).all()  # same seeds, other weights
    assert second["replaced_rows"] == len(a) and second["sampled_examples"] == len(TRAIN)

    again = sample.run(spark, home, variant="rest_em", iteration=1, policy=policy_b, run_id="b-again")
    assert again["sampled_examples"] == 0 and again["sampled_rows"] == 0 and again["replaced_rows"] == 0
    pd.testing.assert_frame_equal(slice_rows(spark, home, "rest_em", 1), b)  # nothing re-sampled or rewritten


def test_a_crashed_run_resumes_with_only_the_missing_samples(spark, home, tiny, monkeypatch, capsys):
    home = dataclasses.replace(home, sample=dataclasses.replace(home.sample, chunk_examples=2))
    slice_ = {"variant": "rest_em", "iteration": 2}
    merge, calls = catalog.merge, []

    def crash_after_first_chunk(*args, **kwargs):
        calls.append(kwargs.get("slice_"))
        if len(calls) > 1:
            raise RuntimeError("worker lost")
        return merge(*args, **kwargs)

    monkeypatch.setattr(catalog, "merge", crash_after_first_chunk)
    with pytest.raises(RuntimeError, match="worker lost"):
        sample.run(spark, home, variant="rest_em", iteration=2, policy=tiny, run_id="first")
    monkeypatch.setattr(catalog, "merge", merge)
    assert calls[0] == slice_  # the chunk commit is confined to its slice
    assert re.search(rf"sample rest_em t=2 \[\d+ tokens/s\] rows: {2 * M}/{len(TRAIN) * M} .* eta \d+s", capsys.readouterr().err)
    partial = slice_rows(spark, home, "rest_em", 2)
    assert list(zip(partial.example_id, partial.sample_index)) == full_keys()[:2 * M]

    lost = partial.iloc[[1]]  # one sample of a finished example goes missing too
    kept = catalog.read_slice(spark, home, "trajectories", slice_).where("NOT (example_id = 'ex-1' AND sample_index = 1)")
    catalog.replace_slice(spark, home, kept, "trajectories", slice_, "test")

    report = sample.run(spark, home, variant="rest_em", iteration=2, policy=tiny, run_id="resume")
    rows = slice_rows(spark, home, "rest_em", 2)
    assert list(zip(rows.example_id, rows.sample_index)) == full_keys()
    assert report["sampled_examples"] == 2 and report["replaced_rows"] == 0  # ex-1 (one sample short) and ex-3
    resumed = rows.set_index(KEY)
    assert resumed.loc[("ex-1", 1), "run_id"] == "resume" and resumed.loc[("ex-1", 1), "raw_text"] == lost.raw_text.item()
    assert (resumed.loc[[k for k in full_keys()[:2 * M] if k != ("ex-1", 1)], "run_id"] == "first").all()
    assert (resumed.loc["ex-3", "run_id"] == "resume").all()


def test_plain_and_reasoning_variants_have_separate_caps_and_a_parse(spark, home, tiny, plain_by_a):
    R, S = home.prompt.max_reasoning_tokens, home.prompt.max_response_tokens
    reasoning_report = sample.run(spark, home, variant="rest_pg", iteration=1, policy=tiny, run_id="cap")
    separator = len(models.load_tokenizer(tiny, home)(prompts.SEPARATOR, add_special_tokens=False).input_ids)
    sampled = {"rest_em": (S, S, *plain_by_a), "rest_pg": (R + prompts.SEPARATOR_ALLOWANCE + S, R + separator + S,
                                                          reasoning_report, slice_rows(spark, home, "rest_pg", 1))}
    for variant, (cap, spent, report, rows) in sampled.items():
        assert report["max_new_tokens"] == cap == generation.output_cap(home, variant)
        # nothing goes past its budgets; a cut plain row spent its whole response budget (a reasoning row
        # may have been handed the separator early, at an end-of-sequence, so its reasoning can be shorter)
        assert rows.n_tokens.max() <= spent
        if variant == "rest_em":
            assert rows.n_tokens.max() == spent and (rows[~rows.finished].n_tokens == spent).all()
        assert report["rows"] == len(rows) == len(TRAIN) * M
        issues = rows.format_issue.fillna("ok").value_counts().to_dict()
        assert {k: v for k, v in report["format_issues"].items() if v} == {k: v for k, v in issues.items() if k != "ok"}
        assert report["format_ok_rate"] == pytest.approx(rows.format_ok.mean(), abs=1e-4)
    plain, reasoning = sampled["rest_em"][3], sampled["rest_pg"][3]
    # a plain row is usable when it ended on its own: its whole text is the response; a cut one is not
    assert (plain.format_ok == (plain.finished & (plain.raw_text.str.strip() != ""))).all()
    assert (plain[plain.format_ok].response == plain[plain.format_ok].raw_text.str.strip()).all()
    assert set(plain[~plain.finished].format_issue) <= {prompts.LENGTH_CAP}
    # a random model never writes the separator: the decoder writes it at the reasoning budget, and such an
    # output is never usable (reward 0, never kept), whatever follows the separator
    assert reasoning.has_separator.all() and reasoning.reasoning_forced.all() and reasoning.reasoning.notna().all()
    assert (reasoning.format_issue == prompts.FORCED_SEPARATOR).all() and not reasoning.format_ok.any()
    assert (reasoning.response == "").all()
    assert reasoning_report["format_issues"][prompts.FORCED_SEPARATOR] == reasoning_report["reasoning_forced"] == len(reasoning)


def test_each_prompt_is_sampled_once_per_chunk(spark, home, tiny, monkeypatch):
    """The chunk is generated once: the MERGE that commits it reads stored rows, not the sampling plan
    again (a persisted source was re-planned by Delta's MERGE, and every prompt was answered twice)."""
    answered = spark.sparkContext.accumulator(0)
    generate_df = generation.generate_df

    def counted(*args, **kwargs):
        return generate_df(*args, **{**kwargs, "counter": answered})

    monkeypatch.setattr(generation, "generate_df", counted)
    report = sample.run(spark, home, variant="rest_em", iteration=3, policy=tiny, run_id="once")
    assert report["sampled_examples"] == len(TRAIN)
    assert answered.value == len(TRAIN)
    assert len(slice_rows(spark, home, "rest_em", 3)) == len(TRAIN) * M
