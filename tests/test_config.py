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
    assert (paper.train.max_input_tokens, paper.train.max_output_tokens, paper.train.optimizer) == (5120, 1536, "adafactor")


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
