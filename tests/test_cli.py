"""One hop from a Databricks task to its stage: job file, sub-command, module and stage share a name."""
from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

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
