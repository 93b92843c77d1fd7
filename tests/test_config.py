import pytest

from restpg.cli import build_parser, main
from restpg.config import ConfigError, describe, load_settings


def test_local_and_databricks_profiles_load():
    local = load_settings("local")
    paper = load_settings("databricks")
    assert local.judge.reward == "embedding"
    # the paper's values (REST-PG Sec. 4.1, Appendix B)
    assert (paper.retrieve.k, paper.sample.m, paper.sample.temperature, paper.evaluate.temperature) == (5, 32, 0.7, 0.1)
    assert (paper.filter.tau, paper.filter.max_kept_per_input, paper.loop.iterations) == (1.0, 10, 3)
    assert (paper.train.lr, paper.train.batch_size, paper.train.warmup_steps, paper.train.restart_from) == (5e-6, 64, 250, "base")
    assert (paper.prompt.max_input_tokens, paper.prompt.max_response_tokens, paper.train.optimizer) == (5120, 1536, "adafactor")
    assert paper.train.selection_examples == 1024  # checkpoint selection on 1,024 validation inputs


@pytest.mark.parametrize("profile", ["local", "local-gemma", "paper-smoke", "databricks"])
def test_every_bundled_profile_loads(profile):
    s = load_settings(profile)
    assert s.prompt.max_reasoning_tokens >= 1 and (s.prompt.max_response_tokens == "auto" or s.prompt.max_response_tokens >= 1)


def test_demo_profiles_size_the_response_budget_from_the_data_and_scheduled_ones_fix_it():
    for profile in ("local", "local-gemma"):
        p = load_settings(profile).prompt
        assert p.max_response_tokens == "auto" and p.response_percentile >= 90 and 72 <= p.max_response_cap <= 256
    assert load_settings("databricks").prompt.max_response_tokens == 1536
    assert load_settings("paper-smoke").prompt.max_response_tokens == 72
    assert load_settings("local", ["prompt.max_response_tokens=64"]).prompt.max_response_tokens == 64


@pytest.mark.parametrize("override, message", [
    ("prompt.max_response_tokens=many", r"prompt.max_response_tokens: expected an integer or 'auto' .*got 'many'"),
    ("prompt.max_response_tokens=AUTO", r"expected an integer or 'auto'"),
    ("prompt.max_response_tokens=1.5", r"expected an integer or 'auto'"),
    ("prompt.max_response_tokens=true", r"expected an integer or 'auto'"),
    ("prompt.max_reasoning_tokens=auto", r"prompt.max_reasoning_tokens: expected an integer, got 'auto' \(only prompt.max_response_tokens"),
    ("prompt.max_input_tokens=auto", r"only prompt.max_response_tokens takes 'auto'"),
    ("prompt.response_percentile=0", r"response_percentile must be in \(0, 100\]"),
    ("prompt.response_percentile=101", r"response_percentile must be in \(0, 100\]"),
    ("prompt.max_response_cap=1", "max_response_cap must be at least 2"),
])
def test_auto_is_a_budget_value_of_the_response_budget_only(override, message):
    with pytest.raises(ConfigError, match=message):
        load_settings("local", [override])


def test_auto_in_a_profile_file_is_checked_like_an_override(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("prompt:\n  max_response_tokens: auto\n  response_percentile: 90\n  max_response_cap: 128\n")
    bad.write_text("prompt:\n  max_response_tokens: automatic\n")
    p = load_settings(str(good)).prompt
    assert (p.max_response_tokens, p.response_percentile, p.max_response_cap) == ("auto", 90.0, 128)
    with pytest.raises(ConfigError, match="automatic"):
        load_settings(str(bad))


def test_paper_smoke_keeps_the_papers_method_at_toy_sizes():
    smoke, paper = load_settings("paper-smoke"), load_settings("databricks")
    assert (smoke.judge.reward, smoke.filter.tau, smoke.judge.scores) == (paper.judge.reward, paper.filter.tau, paper.judge.scores)
    assert (smoke.train.optimizer, smoke.train.restart_from) == (paper.train.optimizer, paper.train.restart_from)
    assert {smoke.models.policy, smoke.models.teacher, smoke.models.judge} == {"packaged:gemma3-270m"}


@pytest.mark.parametrize("override, message", [
    ("train.restart_from=latest", "restart_from"),
    ("loop.variants=[sft, rest_gp]", "rest_gp"),
    ("judge.reward=bleu", "judge.reward"),
    ("prompt.max_response_tokens=0", "at least 1"),
])
def test_values_of_the_right_type_but_wrong_meaning_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_settings("local", [override])


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["local", "local-gemma", "paper-smoke"])
def test_demo_profiles_response_budget_holds_95_percent_of_demo_targets(tmp_path, profile):
    """A demo-data profile's response budget, in the policy's own tokenizer (SmolLM2's for local, Gemma 3's,
    which splits digits, for the others), holds 95% of the demo targets of every split, end-of-sequence
    included: an `auto` one as sized from the demo's training targets, below its cap and no larger than
    the 72 tokens the demo profiles had fixed (so `make run` costs no more), a fixed one as it is."""
    import json

    from restpg import budgets, demo_data, models

    s = load_settings(profile, home=str(tmp_path))
    d, p = s.data, s.prompt
    path = demo_data.write(tmp_path / "demo.jsonl", users_per_task=d.demo_users, profile_items=d.demo_profile_items,
                           examples_per_user=d.demo_examples_per_user, seed=d.demo_seed)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    tokenizer = models.load_tokenizer(s.models.policy, s)
    splits: dict = {}
    for r, n in zip(records, budgets.token_lengths(tokenizer, [r["output"] for r in records])):
        splits.setdefault(r["split"], []).append(n)
    assert set(splits) == {"train", "val", "test"}
    if p.max_response_tokens == "auto":
        budget = budgets.response_budget(splits["train"], p.response_percentile, p.max_response_cap)
        assert budget < p.max_response_cap and budget <= 72, budget
    else:
        budget = p.max_response_tokens
    for split, lengths in splits.items():
        assert budgets.over_budget(lengths, budget) <= 0.05 * len(lengths), (split, budget, sorted(lengths)[-3:])


@pytest.mark.parametrize("override, message", [
    ("sample.mm=3", "unknown key"),
    ("samples.m=3", "unknown key"),
    ("sample.m=three", "expected an integer"),
    ("filter.tau=[1]", "expected a number"),
    ("train.lora_rank=true", "expected an integer"),
    ("sample", "section.key=value"),
])
def test_bad_override_is_an_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_settings("local", [override])


def test_typo_in_profile_file_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match="temprature"):
        load_settings(str(bad))


def test_cli_override_wins_over_profile():
    s = load_settings("databricks", ["sample.m=8", "filter.tau=0.7"])
    assert s.sample.m == 8 and s.filter.tau == 0.7
    args = build_parser().parse_args(["sql", "select 1", "--set", "retrieve.k=2"])
    assert load_settings(args.profile, args.overrides).retrieve.k == 2


def test_every_setting_has_help():
    rows = describe()
    assert len(rows) > 60
    assert all(help_ for _, _, help_ in rows), [k for k, _, h in rows if not h]


def test_cli_reports_config_error(capsys):
    assert main(["config", "--set", "nope.x=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_the_local_m_step_continues_and_the_restart_ablation_compares_the_other_start():
    """The paper's fresh base for every M-step on the scheduled profiles; on the 12-step local profile each M-step
    continues from the policy that sampled its data, and `ablations restart` runs the start the profile does not."""
    from restpg.ablations import other_start

    starts = {p: load_settings(p).train.restart_from for p in ("local", "databricks", "paper-smoke")}
    assert starts == {"local": "previous", "databricks": "base", "paper-smoke": "base"}
    assert {s: other_start(s) for s in ("base", "previous")} == {"base": "previous", "previous": "base"}
    with pytest.raises(KeyError):
        other_start("latest")
