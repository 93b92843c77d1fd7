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
