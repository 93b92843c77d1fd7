"""Budgets sized from the data (`prompt.max_response_tokens: auto`) and the run summary that reports them."""
import pytest

from helpers import example_row, make_settings, write_rows
from restpg import budgets, pipeline, sft_data

# hand-built targets of 4 to ~60 tiny-tokenizer tokens, one far longer than the rest
TARGETS = ([f"The quick brown fox jumps over the lazy dog {i} times." for i in range(8)]
           + ["10 apples, 1 pear, a review, an email. " * k for k in range(1, 9)]
           + ["Short.", "A fox.", "Lazy dog.", "10 apples, 1 pear. " * 40])


def _held(lengths, budget) -> float:
    return sum(sft_data.fits(n, budget) for n in lengths) / len(lengths)


@pytest.mark.parametrize("lengths, percentile, cap, budget", [
    ([5] * 10, 95, 100, 6),                   # n + 1: room for end-of-sequence
    (list(range(1, 11)), 90, 100, 10),        # 9 of 10 must fit: the 9th shortest is 9 tokens
    (list(range(1, 11)), 91, 100, 11),        # 91% of 10 is 9.1: all 10 must fit
    (list(range(1, 21)), 95, 100, 20),        # 95% of 20 is exactly 19
    (list(range(1, 11)), 100, 5, 5),          # the cap wins
    ([3], 1, 100, 4),
])
def test_response_budget_is_the_smallest_that_holds_the_percentile(lengths, percentile, cap, budget):
    assert budgets.response_budget(lengths, percentile, cap) == budget


def test_response_budget_of_no_targets_is_an_error():
    with pytest.raises(ValueError, match="no targets"):
        budgets.response_budget([], 95, 100)


def test_auto_budget_holds_at_least_90_percent_of_hand_built_targets(tiny, tmp_path):
    """In the policy's real tokenizer, counted as sft_data counts (no special tokens, EOS on top)."""
    from restpg import models

    tokenizer = models.load_tokenizer(tiny, make_settings(tmp_path))
    lengths = budgets.token_lengths(tokenizer, TARGETS)
    assert lengths == [len(tokenizer(t, add_special_tokens=False).input_ids) for t in TARGETS]
    budget = budgets.response_budget(lengths, 90, 10_000)
    assert _held(lengths, budget) >= 0.9
    assert _held(lengths, budget - 1) < 0.9  # the smallest such budget, not the longest target
    assert budget < max(lengths) + 1  # the one outlier does not size it
    assert budgets.over_budget(lengths, budget) == sum(not sft_data.fits(n, budget) for n in lengths) >= 1


@pytest.fixture
def home(spark, tiny, tmp_path):
    """A home whose examples are TARGETS in the train split (ids t00..), two val and two test targets."""
    s = make_settings(tmp_path / "home", f"models.policy={tiny}", "prompt.max_response_tokens=auto",
                      "prompt.response_percentile=90", "prompt.max_response_cap=10000")
    rows = [example_row(f"t{i:02d}", f"u{i}", "train", target=t) for i, t in enumerate(TARGETS)]
    rows += [example_row(f"v{i}", f"v{i}", "val", target=TARGETS[-1]) for i in range(2)]
    rows += [example_row(f"x{i}", f"x{i}", "test", target="Short.") for i in range(2)]
    write_rows(spark, s, "examples", rows)
    return s


def test_auto_resolves_from_the_training_targets_of_the_examples_table(spark, home, tiny, monkeypatch):
    from restpg import models

    tokenizer = models.load_tokenizer(tiny, home)
    lengths = budgets.token_lengths(tokenizer, TARGETS)
    resolved = budgets.resolve(spark, home)
    budget = resolved.prompt.max_response_tokens
    assert isinstance(budget, int) and budget == budgets.response_budget(lengths, 90, 10_000)
    assert _held(lengths, budget) >= 0.9
    assert home.prompt.max_response_tokens == "auto"  # a new Settings, the caller's unchanged
    assert resolved.prompt.response_percentile == 90 and resolved.data == home.data

    loads = []
    monkeypatch.setattr(models, "load_tokenizer", lambda *a: loads.append(a) or tokenizer)
    assert budgets.resolve(spark, home) == resolved and loads == []  # once per table version and policy
    capped = make_settings(home.home_dir, f"models.policy={tiny}", "prompt.max_response_tokens=auto",
                           "prompt.response_percentile=90", "prompt.max_response_cap=8")
    assert budgets.resolve(spark, capped).prompt.max_response_tokens == 8 and loads == []

    line = budgets.describe(spark, home)
    over = budgets.over_budget(lengths, budget)
    assert line.startswith(f"Budgets: response {budget} tokens (auto: p90 of {len(TARGETS)} training targets, cap 10000), "
                           f"reasoning {home.prompt.max_reasoning_tokens}")
    assert line.endswith(f"targets over the response budget: train {over}/{len(TARGETS)}, val 2/2, test 0/2")
    assert f"training targets needs {budget}, capped at 8)" in budgets.describe(spark, capped)

    # a new ingest (a new table version) is sized anew
    write_rows(spark, home, "examples", [example_row(f"t{i}", f"u{i}", target="Short.") for i in range(5)])
    monkeypatch.undo()
    assert budgets.resolve(spark, home).prompt.max_response_tokens == len(tokenizer("Short.", add_special_tokens=False).input_ids) + 1


def test_auto_honours_data_max_examples_lowest_ids_first(spark, home, tiny):
    from restpg import models

    first = make_settings(home.home_dir, f"models.policy={tiny}", "prompt.max_response_tokens=auto",
                          "prompt.response_percentile=100", "prompt.max_response_cap=10000", "data.max_examples=3")
    lengths = budgets.token_lengths(models.load_tokenizer(tiny, home), TARGETS[:3])
    assert budgets.resolve(spark, first).prompt.max_response_tokens == max(lengths) + 1
    assert "p100 of 3 training targets" in budgets.describe(spark, first)


def test_a_fixed_budget_is_left_alone_and_reported_as_fixed(spark, home, tiny):
    fixed = make_settings(home.home_dir, f"models.policy={tiny}", "prompt.max_response_tokens=12")
    assert budgets.resolve(spark, fixed) is fixed
    assert budgets.describe(spark, fixed).startswith("Budgets: response 12 tokens (fixed), reasoning")


def test_auto_before_ingest_is_a_clear_error(spark, tmp_path):
    s = make_settings(tmp_path / "home", "prompt.max_response_tokens=auto")
    with pytest.raises(budgets.Unresolved, match=r"has not been written yet: run `restpg ingest` first"):
        budgets.resolve(spark, s)


def test_auto_without_training_targets_is_a_clear_error(spark, tiny, tmp_path):
    s = make_settings(tmp_path / "home", f"models.policy={tiny}", "prompt.max_response_tokens=auto")
    write_rows(spark, s, "examples", [example_row("x1", "u1", "test")])
    with pytest.raises(budgets.Unresolved, match="no training-split targets"):
        budgets.resolve(spark, s)


def test_estimate_counts_auto_at_its_cap_before_ingest_and_as_resolved_after(spark, tiny, tmp_path):
    from restpg import estimate

    s = make_settings(tmp_path / "home", f"models.policy={tiny}", "prompt.max_response_tokens=auto",
                      "prompt.response_percentile=100", "prompt.max_response_cap=300")
    assert estimate.budgeted(spark, s).prompt.max_response_tokens == 300
    write_rows(spark, s, "examples", [example_row("t1", "u1", target="Short.")])
    assert estimate.budgeted(spark, s).prompt.max_response_tokens == budgets.resolve(spark, s).prompt.max_response_tokens < 300


# --- the run summary --------------------------------------------------------------------------------

@pytest.mark.parametrize("result, expected", [
    ({"rows": 40, "prompts_truncated": 10, "at_length_cap": 30}, "prompts truncated 25%, finished before the cap 25%"),
    ({"rows": 40, "prompts_truncated": 10, "at_length_cap": 30, "truncated_share": 0.5, "finished_share": 0.75},
     "prompts truncated 50%, finished before the cap 75%"),
    ({"rows": 0}, "prompts truncated n/a, finished before the cap n/a"),
])
def test_teacher_line_gives_shares_of_truncated_prompts_and_finished_paths(result, expected):
    assert pipeline.teacher_line(result).endswith(expected)


def test_stage_times_show_seconds_or_skipped_in_compact_lines():
    seconds = {"ingest": 3.2, "retrieve": None, **{f"train [variant=rest_pg/iteration={t}]": 100.0 + t for t in range(8)}}
    lines = pipeline.times_lines(seconds, width=80)
    text = "\n".join(lines)
    assert lines[0].startswith("Stage times (s), 831 in all: ingest 3; retrieve skipped; train [rest_pg/0] 100")
    assert "train [rest_pg/7] 107" in text and all(len(line) <= 80 for line in lines) and len(lines) > 1


def test_steps_record_each_stage_wall_time_and_skips(spark, tmp_path):
    s = make_settings(tmp_path / "home")
    first = pipeline.Steps(spark, s)
    first.run("retrieve", "", {"k": 1}, [], fn=lambda run_id, redo: {"rows": 1})
    again = pipeline.Steps(spark, s)
    again.run("retrieve", "", {"k": 1}, [], fn=lambda run_id, redo: {"rows": 1})
    assert first.seconds["retrieve"] >= 0 and again.seconds == {"retrieve": None}
