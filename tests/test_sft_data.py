"""Iteration-0 training sets on hand-built tables and the tiny model: clean teacher data, separate budgets."""
import pytest

from helpers import example_row, make_settings, write_rows
from restpg import catalog, prompts, reason, sft_data

SHORT = "The quick brown fox jumps over the lazy dog."                     # 10 tiny-tokenizer tokens
LONG = "10 apples, 1 pear, a review, an email. " * 4                       # ~50 tokens
GOOD = "The user likes apples and short reviews."                          # 22 tokens


@pytest.mark.parametrize("n_tokens, budget, ok", [(5, 6, True), (6, 6, False), (0, 1, True), (10, 6, False)])
def test_fits_leaves_room_for_end_of_sequence(n_tokens, budget, ok):
    assert sft_data.fits(n_tokens, budget) is ok


@pytest.mark.parametrize("args, reason_", [
    ((False, True), None),
    ((False, False), "target_too_long"),
    ((True, True, True, False, False, True), None),
    ((True, False, False, True, True, False), "target_too_long"),   # a too-long target wins: both variants drop it
    ((True, True, False), "no_reasoning_path"),
    ((True, True, True, True, True), "empty"),
    ((True, True, True, False, True), "copied"),
    ((True, True, True, False, False, False), "reasoning_too_long"),
])
def test_leave_out(args, reason_):
    assert sft_data.leave_out(*args) == reason_


@pytest.mark.parametrize("text, complete", [
    ("This person writes short reviews. They tend to write about the same thing,", "This person writes short reviews."),
    ('1. Likes tea.\n2. Writes "briefly." Then\n3. The user', '1. Likes tea.\n2. Writes "briefly." Then'),  # "3." is a number
    ("- short reviews\n- rated 3.0 and", "- short reviews"),
    ("rated 3.0 and never", ""),
    ("Ends well.", "Ends well."),
])
def test_complete_part_keeps_up_to_the_last_finished_sentence_or_line(text, complete):
    assert prompts.complete_part(text) == complete


def test_a_path_cut_at_the_cap_is_trained_on_up_to_its_last_complete_sentence(tiny, tmp_path):
    """The teacher stopped at its length cap mid-sentence: the training reasoning ends at its last complete
    sentence; one that never finished a sentence, and a path that ended on its own, are kept whole."""
    import pandas as pd

    from restpg import models

    s = make_settings(tmp_path / "home", f"models.policy={tiny}")
    decide = sft_data._decider(tiny, models.worker_env(s), 48, 24)
    cut = GOOD + " They also like"
    pdf = pd.DataFrame({"example_id": ["a", "b", "c", "d"], "target": [SHORT] * 4,
                        "reasoning": [cut, "They also like", cut, None], "copied": [False] * 4,
                        "finished": [False, False, True, None]})
    out = next(decide(iter([pdf]))).set_index("example_id")
    assert out.loc["a", "reasoning_reason"] is None and out.loc["a", "reasoning"] == GOOD and out.loc["a", "trimmed"]
    assert out.loc["b", "reasoning_reason"] is None and out.loc["b", "reasoning"] == "They also like"  # nothing shorter
    assert not out.loc["b", "trimmed"]
    assert out.loc["c", "reasoning_reason"] is None and out.loc["c", "reasoning"] == cut and not out.loc["c", "trimmed"]
    assert out.loc["d", "reasoning_reason"] == "no_reasoning_path" and out.loc["d", "reasoning"] is None
    assert list(out["plain_reason"]) == [None] * 4
    nullable = pdf.astype({"finished": "boolean"})  # pandas' nullable booleans hold numpy bools and pd.NA
    assert next(decide(iter([nullable]))).set_index("example_id").equals(out)


def test_em_variants_have_no_iteration_zero_data(tmp_path):
    with pytest.raises(ValueError, match="rest_pg"):  # refused before any table is read
        sft_data.run(None, make_settings(tmp_path / "home"), run_id="x", variants=["sft", "rest_pg"])


def test_both_variants_share_inputs_and_leave_out_unfit_rows(spark, tiny, tmp_path):
    s = make_settings(tmp_path / "home", f"models.policy={tiny}", f"models.teacher={tiny}", "prompt.max_input_tokens=200",
                      "prompt.max_reasoning_tokens=24", "prompt.max_response_tokens=24", "data.max_examples=7")
    examples = [example_row(f"t{i}", f"u{i % 3}", target=LONG if i == 5 else SHORT) for i in range(1, 7)]
    examples += [example_row("t7", "u1", split="val", target=SHORT), example_row("t8", "u2", target=SHORT),
                 example_row("t9", "u0", target=SHORT)]  # t9 is past data.max_examples (ids in order)
    write_rows(spark, s, "examples", examples)
    write_rows(spark, s, "retrievals", [{"example_id": "t1", "retriever": s.models.retriever, "k": 1,
                                         "items": [{"rank": 1, "item_id": "p", "score": 0.5, "text": "A tea review."}]}])
    reasoning = {"t1": GOOD, "t2": SHORT, "t3": "   ", "t5": GOOD, "t6": GOOD + " " + LONG, "t7": GOOD,
                 "t8": GOOD + " They also like", "t9": GOOD}  # t8's teacher stopped at its cap mid-sentence
    write_rows(spark, s, "reasoning_paths", [
        {"example_id": e, **reason.path_slice(s), "reasoning": r, "copied": e == "t2", "finished": e != "t8"}
        for e, r in reasoning.items()]
        + [{"example_id": "t4", "teacher": "another-teacher", "template_version": reason.path_slice(s)["template_version"],
            "reasoning": GOOD}])  # another teacher's path is not this run's

    report = sft_data.run(spark, s, run_id="b")
    assert report["inputs"] == 7
    assert report["variants"]["sft"]["left_out"] == {"target_too_long": 1}
    assert report["variants"]["sft_reasoning"]["left_out"] == {
        "target_too_long": 1, "no_reasoning_path": 1, "empty": 1, "copied": 1, "reasoning_too_long": 1}
    rows = catalog.read(spark, s, "training_sets").where("iteration = 0").toPandas()
    by_variant = {v: g.set_index("example_id") for v, g in rows.groupby("variant")}
    assert sorted(by_variant["sft"].index) == ["t1", "t2", "t3", "t4", "t6", "t8"]
    assert sorted(by_variant["sft_reasoning"].index) == ["t1", "t8"]
    assert report["variants"]["sft"]["rows"] == 6 and report["variants"]["sft_reasoning"]["rows"] == 2 and report["rows"] == 8

    assert (by_variant["sft"]["completion"] == SHORT).all()
    assert by_variant["sft_reasoning"].loc["t1", "completion"] == prompts.join_reasoning(GOOD, SHORT)
    assert by_variant["sft_reasoning"].loc["t8", "completion"] == prompts.join_reasoning(GOOD, SHORT)  # cut back
    assert report["variants"]["sft_reasoning"]["trimmed_at_cap"] == 1
    assert set(by_variant["sft"]["template_version"]) == {prompts.template("policy_plain").version}
    assert set(by_variant["sft_reasoning"]["template_version"]) == {prompts.template("policy_reasoning").version}
    assert "A tea review." in by_variant["sft"].loc["t1", "prompt"]
    assert (rows["weight"] == 1.0).all() and (rows["sample_index"] == -1).all() and (rows["source"] == "gold").all()

    from restpg import models

    tok = models.load_tokenizer(tiny, s)
    n = lambda text: len(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
    assert n(LONG) + 1 > 24 >= n(SHORT) + 1 and n(GOOD) <= 24 < n(GOOD + " " + LONG)  # the fixture's premises
    budget = prompts.output_budget("sft_reasoning", 24, 24)
    assert all(n(c) + 1 <= 24 for c in by_variant["sft"]["completion"])
    assert all(n(c) + 1 <= budget for c in by_variant["sft_reasoning"]["completion"])

    again = sft_data.run(spark, s, run_id="b2", variants=["sft"])
    assert list(again["variants"]) == ["sft"] and again["variants"]["sft"]["rows"] == 6
    after = catalog.read(spark, s, "training_sets").toPandas()
    assert len(after) == 8 and set(after[after["variant"] == "sft_reasoning"]["run_id"]) == {"b"}


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
