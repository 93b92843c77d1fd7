"""Iteration-0 training sets on hand-built tables and the tiny model: clean teacher data, separate budgets."""
import pytest

from helpers import example_row, make_settings, write_rows
from restpg import catalog, prompts, reason, sft_data

SHORT = "The quick brown fox jumps over the lazy dog."                     # 10 tiny-tokenizer tokens
LONG = "10 apples, 1 pear, a review, an email. " * 4                       # ~50 tokens
GOOD = "Style: short.\nTopics: apples.\nPlan: brief."                      # 34 tokens
TOO_FULL = "Style: short, upbeat, terse.\nTopics: apples.\nPlan: brief."     # over 85% of 48 tokens
SLOTS = prompts.SLOTS["teacher_reasoning"]


@pytest.mark.parametrize("n_tokens, budget, ok", [(5, 6, True), (6, 6, False), (0, 1, True), (10, 6, False)])
def test_fits_leaves_room_for_end_of_sequence(n_tokens, budget, ok):
    assert sft_data.fits(n_tokens, budget) is ok


@pytest.mark.parametrize("kwargs, reason_", [
    ({"uses_reasoning": False, "target_fits": True}, None),
    ({"uses_reasoning": False, "target_fits": False}, "target_too_long"),
    ({"uses_reasoning": True, "target_fits": True}, None),
    ({"uses_reasoning": True, "target_fits": False, "has_path": False, "cut": True}, "target_too_long"),  # both variants drop it
    ({"uses_reasoning": True, "target_fits": True, "has_path": False}, "no_reasoning_path"),
    ({"uses_reasoning": True, "target_fits": True, "empty": True, "copied": True}, "empty"),
    ({"uses_reasoning": True, "target_fits": True, "copied": True, "cut": True}, "copied"),
    ({"uses_reasoning": True, "target_fits": True, "cut": True, "degenerate": "missing_slots"}, "cut_at_cap"),
    ({"uses_reasoning": True, "target_fits": True, "degenerate": "repeated_lines", "reasoning_fits": False}, "repeated_lines"),
    ({"uses_reasoning": True, "target_fits": True, "reasoning_fits": False}, "reasoning_too_long"),
])
def test_leave_out(kwargs, reason_):
    assert sft_data.leave_out(**kwargs) == reason_


@pytest.mark.parametrize("text, slots, verdict", [
    (GOOD, SLOTS, None),
    ("Style: terse, upbeat.\n  continues here.\nTopics: tea.\nPlan: about 20 words.", SLOTS, None),  # a wrapped slot
    ("Style: terse.\nPlan: about 20 words.", SLOTS, "missing_slots"),
    ("Topics: tea.\nStyle: terse.\nPlan: short.", SLOTS, "missing_slots"),                     # out of order
    ("Style: terse.\nTopics: tea.\nPlan: short.\nStyle: terse again.", SLOTS, "missing_slots"),  # a slot twice
    ("Style: terse.\nTopics: | /\nPlan: short.", SLOTS, "missing_slots"),                      # a slot with no words
    ("- The user writes short reviews.\n- The user likes tea.", SLOTS, "missing_slots"),  # the v1 bullet list
    ("| / | / | / | / | / | / | / | / | / |", SLOTS, "missing_slots"),
    ("| / | / | / | / | / | / | / | / | / |", (), "repetitive"),
    ("Style: terse.\nTopics: tea.\nPlan: short.\nThe user likes tea.\nThe user likes tea.", SLOTS, "repeated_lines"),
    ("Style: " + "the user likes " * 8 + "tea.\nTopics: tea.\nPlan: short.", SLOTS, "repetitive"),
    ("The user likes apples and short reviews.", (), None),  # nothing to check without slots
])
def test_degeneracy(text, slots, verdict):
    assert sft_data.degeneracy(text, slots) == verdict


def test_a_cut_a_degenerate_and_a_too_full_path_are_left_out_as_counted_reasons(tiny, tmp_path):
    """Paths the teacher stopped at its cap, that loop or miss a slot, or that leave no slack under the reasoning
    budget are never trained on (before, a cut path was trimmed back to a sentence or used as written); a path
    that ended on its own and fits is kept as written."""
    import pandas as pd

    from restpg import models

    s = make_settings(tmp_path / "home", f"models.policy={tiny}")
    decide = sft_data._decider(tiny, models.worker_env(s), 48, 24, SLOTS)
    tok = models.load_tokenizer(tiny, s)
    n = lambda text: len(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
    assert n(GOOD) <= sft_data.reasoning_limit(48) < n(TOO_FULL) <= 48  # fits the budget, but not with its slack
    paths = {"kept": (GOOD, True), "old": (GOOD, None), "cut": (GOOD + " They also like", False),
             "loop": ("Style: | / | / | / | / | / | / | /", True), "twice": (GOOD + "\nPlan: brief.", True),
             "full": (TOO_FULL, True), "none": (None, None)}
    pdf = pd.DataFrame({"example_id": list(paths), "target": [SHORT] * len(paths), "reasoning": [r for r, _ in paths.values()],
                        "copied": [False] * len(paths), "finished": [f for _, f in paths.values()]})
    out = next(decide(iter([pdf]))).set_index("example_id")
    assert out["reasoning_reason"].to_dict() == {
        "kept": None, "old": None, "cut": "cut_at_cap", "loop": "missing_slots", "twice": "missing_slots",
        "full": "reasoning_too_long", "none": "no_reasoning_path"}  # a null `finished` (an older row) counts as finished
    assert list(out.columns) == ["plain_reason", "reasoning_reason"] and list(out["plain_reason"]) == [None] * len(paths)
    nullable = pdf.astype({"finished": "boolean"})  # pandas' nullable booleans hold numpy bools and pd.NA
    assert next(decide(iter([nullable]))).set_index("example_id").equals(out)


def test_em_variants_have_no_iteration_zero_data(tmp_path):
    with pytest.raises(ValueError, match="rest_pg"):  # refused before any table is read
        sft_data.run(None, make_settings(tmp_path / "home"), run_id="x", variants=["sft", "rest_pg"])


def test_both_variants_share_inputs_and_leave_out_unfit_rows(spark, tiny, tmp_path):
    s = make_settings(tmp_path / "home", f"models.policy={tiny}", f"models.teacher={tiny}", "prompt.max_input_tokens=200",
                      "prompt.max_reasoning_tokens=48", "prompt.max_response_tokens=24", "data.max_examples=9")
    examples = [example_row(f"t{i}", f"u{i % 3}", target=LONG if i == 5 else SHORT) for i in range(1, 7)]
    examples += [example_row("t7", "u1", split="val", target=SHORT)]
    examples += [example_row(f"t{i}", f"u{i % 3}", target=SHORT) for i in (8, 90, 91, 92)]  # t92 is past data.max_examples
    write_rows(spark, s, "examples", examples)
    write_rows(spark, s, "retrievals", [{"example_id": "t1", "retriever": s.models.retriever, "k": 1,
                                         "items": [{"rank": 1, "item_id": "p", "score": 0.5, "text": "A tea review."}]}])
    slice_ = reason.path_slice(s)
    reasoning = {"t1": (GOOD, True), "t2": (GOOD, True), "t3": ("   ", True), "t5": (GOOD, True), "t6": (TOO_FULL, True),
                 "t7": (GOOD, True), "t8": ("Style: terse.\nPlan: brief.", True), "t92": (GOOD, True),
                 "t90": (GOOD + " They also like", False),  # the teacher stopped at its cap mid-sentence
                 "t91": ("Style: | / | / | / | / | / | / | /", False)}  # it looped until the cap: counted once, as cut
    write_rows(spark, s, "reasoning_paths", [
        {"example_id": e, **slice_, "reasoning": r, "copied": e == "t2", "finished": f} for e, (r, f) in reasoning.items()]
        + [{"example_id": "t4", "teacher": "another-teacher", "template_version": slice_["template_version"],
            "reasoning": GOOD, "finished": True},  # another teacher's path is not this run's
           {"example_id": "t8", "teacher": slice_["teacher"], "template_version": "teacher_reasoning@v1#0ld",
            "reasoning": GOOD, "finished": True}])  # nor an older template's

    report = sft_data.run(spark, s, run_id="b")
    assert report["inputs"] == 9
    assert report["variants"]["sft"]["left_out"] == {"target_too_long": 1}
    assert report["variants"]["sft_reasoning"]["left_out"] == {
        "target_too_long": 1, "no_reasoning_path": 1, "empty": 1, "copied": 1, "cut_at_cap": 2, "missing_slots": 1,
        "repeated_lines": 0, "repetitive": 0, "reasoning_too_long": 1}
    rows = catalog.read(spark, s, "training_sets").where("iteration = 0").toPandas()
    by_variant = {v: g.set_index("example_id") for v, g in rows.groupby("variant")}
    assert sorted(by_variant["sft"].index) == ["t1", "t2", "t3", "t4", "t6", "t8", "t90", "t91"]
    assert sorted(by_variant["sft_reasoning"].index) == ["t1"]
    assert report["variants"]["sft"]["rows"] == 8 and report["variants"]["sft_reasoning"]["rows"] == 1 and report["rows"] == 9

    assert (by_variant["sft"]["completion"] == SHORT).all()
    assert by_variant["sft_reasoning"].loc["t1", "completion"] == prompts.join_reasoning(GOOD, SHORT)
    assert set(by_variant["sft"]["template_version"]) == {prompts.template("policy_plain").version}
    assert set(by_variant["sft_reasoning"]["template_version"]) == {prompts.template("policy_reasoning").version}
    assert "A tea review." in by_variant["sft"].loc["t1", "prompt"]
    assert (rows["weight"] == 1.0).all() and (rows["sample_index"] == -1).all() and (rows["source"] == "gold").all()

    from restpg import models

    tok = models.load_tokenizer(tiny, s)
    n = lambda text: len(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
    assert n(LONG) + 1 > 24 >= n(SHORT) + 1 and n(GOOD) <= sft_data.reasoning_limit(48) < n(TOO_FULL)  # the premises
    budget = prompts.output_budget("sft_reasoning", 48, 24)
    assert all(n(c) + 1 <= 24 for c in by_variant["sft"]["completion"])
    assert all(n(c) + 1 <= budget for c in by_variant["sft_reasoning"]["completion"])

    again = sft_data.run(spark, s, run_id="b2", variants=["sft"])
    assert list(again["variants"]) == ["sft"] and again["variants"]["sft"]["rows"] == 8
    after = catalog.read(spark, s, "training_sets").toPandas()
    assert len(after) == 9 and set(after[after["variant"] == "sft_reasoning"]["run_id"]) == {"b"}


def test_a_variant_left_with_no_rows_fails_with_the_counts_and_the_budget(spark, tiny, tmp_path):
    """Every target over the response budget: the stage names why and which setting, instead of leaving
    training to fail on an empty slice."""
    s = make_settings(tmp_path / "home", f"models.policy={tiny}", "prompt.max_input_tokens=200",
                      "prompt.max_response_tokens=12")
    write_rows(spark, s, "examples", [example_row(f"t{i}", "u1", target=LONG) for i in range(1, 4)])
    write_rows(spark, s, "retrievals", [{"example_id": "t1", "retriever": s.models.retriever, "k": 1,
                                         "items": [{"rank": 1, "item_id": "p", "score": 0.5, "text": "A tea review."}]}])
    with pytest.raises(ValueError, match=r"no training rows for sft \(all 3 inputs left out: target_too_long=3\).*"
                                         r"max_response_tokens=12"):
        sft_data.run(spark, s, run_id="b", variants=["sft"])
