"""One hop from a Databricks task to its stage: job file, sub-command, module and stage share a name."""
from __future__ import annotations

import ast
import importlib
import inspect
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest

from restpg import cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_job_file_calls_its_own_stage_through_entry():
    jobs = sorted(p.stem for p in (ROOT / "jobs").glob("*.py"))
    assert set(jobs) == set(cli.STAGES) - {"ablations", "estimate"}  # sized and run by hand, not scheduled
    for name in jobs:
        tree = ast.parse((ROOT / "jobs" / f"{name}.py").read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "entry"]
        assert [c.args[0].value for c in calls] == [name], f"jobs/{name}.py must call entry({name!r})"
        imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert imports == {"entry"}, f"jobs/{name}.py holds logic beyond the entry call: {imports}"


@pytest.mark.parametrize("name", sorted(cli.STAGES))
def test_every_stage_is_a_module_with_a_keyword_only_run(name):
    run = importlib.import_module(f"restpg.{name}").run
    params = inspect.signature(run).parameters
    assert list(params)[:2] == ["spark", "settings"]
    assert params["run_id"].kind is inspect.Parameter.KEYWORD_ONLY and params["run_id"].default is inspect.Parameter.empty
    for dest in cli.stage_arguments(name, cli.build_parser().parse_args(_minimal_argv(name))):
        assert dest in params, f"restpg.{name}.run does not take the sub-command's argument {dest!r}"


def _minimal_argv(name: str) -> list[str]:
    argv = [name]
    for a in cli.STAGES[name].args:
        if a.options.get("required") or not a.flags[0].startswith("-"):
            argv += ["budget"] if not a.flags[0].startswith("-") else [a.flags[0], "1" if a.options.get("type") is int else "x"]
    return argv


def test_aliases_route_to_the_stage_names():
    parser = cli.build_parser()
    assert cli.ALIASES["filter"] == "filtering" and cli.ALIASES["run"] == "pipeline"
    assert cli.ALIASES["build-sft"] == "sft_data" and cli.ALIASES["synthesize_reasoning"] == "reason"
    args = parser.parse_args(["filter", "--variant", "rest_pg", "--iteration", "2"])
    assert cli.stage_arguments(cli.ALIASES[args.command], args) == {"variant": "rest_pg", "iteration": 2}


def test_a_misspelt_setting_is_a_configuration_error(capsys):
    assert cli.main(["retrieve", "--set", "sample.mm=3"]) == 2
    assert "unknown key" in capsys.readouterr().err


# --- budgets sized from the data reach a stage run alone ----------------------------------------------

def test_stages_that_skip_budget_resolution_never_read_the_response_budget():
    """A stage marked budgets=False gets `auto` as written: it must not read the number (pipeline and
    estimate resolve it themselves)."""
    exempt = {name for name, stage in cli.STAGES.items() if not stage.budgets}
    assert exempt == {"ingest", "retrieve", "user_profiles", "peer_retrieve", "estimate", "pipeline"}
    for name in exempt - {"estimate", "pipeline"}:
        source = inspect.getsource(importlib.import_module(f"restpg.{name}"))
        for reader in ("max_response_tokens", "output_cap", "limits(", "policy_prompts", "selection"):
            assert reader not in source, f"restpg.{name} reads the response budget ({reader}) but is not resolved"


def _capture(monkeypatch, name: str) -> list:
    seen = []
    module = importlib.import_module(f"restpg.{name}")
    monkeypatch.setattr(module, "run", lambda spark, settings, *, run_id, **kw: seen.append(settings) or {"rows": 0})
    return seen


def test_a_stage_run_alone_gets_the_budget_resolved_from_the_examples_table(spark, tiny, tmp_path, monkeypatch):
    from helpers import example_row, make_settings, write_rows

    from restpg import budgets, models

    s = make_settings(tmp_path / "home", f"models.policy={tiny}", "prompt.max_response_tokens=auto",
                      "prompt.response_percentile=100", "prompt.max_response_cap=500")
    targets = ["Great kettle, boils fast.", "The quick brown fox jumps over the lazy dog 3 times; 10 apples, 1 pear."]
    write_rows(spark, s, "examples", [example_row(f"e{i}", f"u{i}", target=t) for i, t in enumerate(targets)])
    expected = max(budgets.token_lengths(models.load_tokenizer(tiny, s), targets)) + 1
    for name in ("sft_data", "evaluate"):
        seen = _capture(monkeypatch, name)
        cli.run_stage(name, spark, s)
        assert [x.prompt.max_response_tokens for x in seen] == [expected], name
    seen = _capture(monkeypatch, "ingest")  # writes what the budget is sized from: it gets `auto` as written
    cli.run_stage("ingest", spark, s, source="x", task=None, split=None)
    assert seen[0].prompt.max_response_tokens == "auto"


def test_a_stage_that_needs_the_budget_before_ingest_stops_with_a_clear_error(spark, tmp_path, capsys):
    from helpers import make_settings

    from restpg import budgets

    s = make_settings(tmp_path / "home", "prompt.max_response_tokens=auto")
    with pytest.raises(budgets.Unresolved, match="run `restpg ingest` first"):
        cli.run_stage("sample", spark, s, variant="rest_pg", iteration=1, policy=None)
    code = cli.main(["judge", "--variant", "rest_pg", "--iteration", "1", "--home", str(tmp_path / "home"),
                     "--set", "prompt.max_response_tokens=auto"])
    assert code == 2 and "restpg ingest" in capsys.readouterr().err


# --- the console: a result file, expected ends in one line, third-party noise off ------------------------

@pytest.fixture
def process_state():
    """cli.main sets the process's environment and MLflow's log level: put them back after the test."""
    level = logging.getLogger("mlflow").level
    with mock.patch.dict(os.environ):
        yield
    logging.getLogger("mlflow").setLevel(level)


def _stage_without_spark(monkeypatch, outcome):
    """cli.main up to the stage with no Spark session; the stage returns `outcome` or raises it."""
    def run_stage(name, spark, settings, **arguments):
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr("restpg.runtime.get_spark", lambda settings: None)
    monkeypatch.setattr(cli, "run_stage", run_stage)


def test_a_stage_writes_its_result_to_a_file_and_prints_one_line(process_state, monkeypatch, tmp_path, capsys):
    result = {"rows": 3, "per_task": {f"task{i}": {"samples": i, "passed": i // 2} for i in range(200)}}
    _stage_without_spark(monkeypatch, result)
    home = tmp_path / "home"
    assert cli.main(["retrieve", "--home", str(home)]) == 0
    assert cli.main(["retrieve", "--home", str(home)]) == 0  # the same second: a second file, not over the first
    out = capsys.readouterr().out.splitlines()
    files = sorted((home / "results").glob("retrieve-*.json"))
    assert len(out) == 2 and len(files) == 2 and {line.removeprefix("result: ") for line in out} == {str(f) for f in files}
    assert all(json.loads(f.read_text()) == result for f in files)


@pytest.mark.parametrize("argv", [["filtering", "--variant", "rest_em", "--iteration", "1"], ["pipeline"]])
def test_nothing_passing_the_filter_ends_the_command_with_code_3_and_one_line(argv, process_state, monkeypatch, tmp_path, capsys):
    from restpg.filtering import NothingPassed

    message = "no rest_em output of iteration 1 has reward >= tau=0.9 (embedding reward, 8 samples, 8 well-formed)"
    _stage_without_spark(monkeypatch, NothingPassed(message))
    assert cli.main([*argv, "--home", str(tmp_path / "home")]) == 3
    out, err = capsys.readouterr()
    assert out == "" and err == f"restpg: {message}\n"
    assert not (tmp_path / "home" / "results").exists()


@pytest.mark.parametrize("argv", [["validate_reward"], ["pipeline"]])
def test_a_reward_that_fails_validation_ends_the_command_with_code_4_and_one_line(argv, process_state, monkeypatch, tmp_path,
                                                                                   capsys):
    """The reward gate is an expected end (the numbers and the way on), not a crash with a traceback."""
    from restpg.validate_reward import RewardUnfit, Verdict

    unfit = RewardUnfit("embedding", "packaged:all-minilm-l6-v2",
                        Verdict(-0.0195, 0.2583, 0.05, {"self": 1.0, "same_user": 0.2226, "other_user": 0.0918}))
    _stage_without_spark(monkeypatch, unfit)
    assert cli.main([*argv, "--home", str(tmp_path / "home")]) == 4
    out, err = capsys.readouterr()
    assert out == "" and err == f"restpg: {unfit}\n"
    assert "NOT fit to train on" in err and "allow_unfit_reward" in err
    assert not (tmp_path / "home" / "results").exists()


def test_third_party_noise_is_off_unless_verbose(process_state, monkeypatch, tmp_path):
    from restpg import runtime

    for key in [*runtime.QUIET_ENV, "PJRT_DEVICE"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # a value the user set wins
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: shown.append(str(message)))
    _stage_without_spark(monkeypatch, {})
    assert cli.main(["retrieve", "--verbose", "--home", str(tmp_path / "home")]) == 0
    assert not {*runtime.QUIET_ENV, "PJRT_DEVICE"} & set(os.environ) - {"TRANSFORMERS_VERBOSITY"}
    assert cli.main(["retrieve", "--home", str(tmp_path / "home")]) == 0
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and os.environ["MLFLOW_LOGGING_LEVEL"] == "ERROR"
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info" and os.environ["PJRT_DEVICE"] == "CPU"
    assert logging.getLogger("mlflow").level == logging.ERROR
    with warnings.catch_warnings():  # as MLflow logs a model: its own filter shows each UserWarning once
        warnings.simplefilter("once", UserWarning)
        warnings.warn("\x1b[33mAdd type hints to the `predict` method to enable data validation\x1b[0m", UserWarning)
        warnings.warn("a warning of restpg's own", UserWarning)
    assert shown == ["a warning of restpg's own"]


QUIET_START = """
import sys
from restpg import runtime
from restpg.config import load_settings
runtime.quiet_third_party()
if sys.argv[2:]:  # a JVM whose start fails after resolving: what it printed must be shown
    runtime._launch_jvm_quietly({"spark.master": "local[1]", "spark.jars.packages": sys.argv[2]})
print(runtime.get_spark(load_settings("local", [], home=sys.argv[1])).range(3).count())
"""


@pytest.mark.spark
def test_a_local_jvm_starts_without_the_resolution_report_and_a_failed_start_shows_it(tmp_path):
    """`restpg` (quiet): the ~45 lines of Spark's dependency resolution at every local JVM start are left out
    and the JVM's own warnings still pass; a JVM that dies at start prints what it had said, resolution
    report included."""
    from restpg import runtime

    env = {k: v for k, v in os.environ.items() if k not in runtime.QUIET_ENV}
    ok = subprocess.run([sys.executable, "-c", QUIET_START, str(tmp_path / "ok")], capture_output=True, text=True,
                        timeout=300, env=env)
    assert ok.returncode == 0 and ok.stdout.strip() == "3", ok.stderr[-3000:]
    assert "artifacts copied" not in ok.stderr and ":: resolving dependencies" not in ok.stderr, ok.stderr[-3000:]
    assert "Setting default log level" not in ok.stderr

    bad = subprocess.run([sys.executable, "-c", QUIET_START, str(tmp_path / "bad"), "io.restpg.absent:nothing:0.0.1"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode != 0
    assert ":: resolving dependencies" in bad.stderr and "io.restpg.absent#nothing" in bad.stderr, bad.stderr[-3000:]
