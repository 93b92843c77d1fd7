"""The champion answers requests: the tiny model registered in a fresh MLflow home as `@champion`, two users'
profiles in hand-built `examples`, requests from a JSON-lines file and from a Delta table. Known users get
answers (reasoning split off for a reasoning variant), a user without profile and malformed requests get
outcome rows or quarantine rows, a rerun writes nothing, a new champion answers again, no champion is an
error that names `restpg promote`."""
from __future__ import annotations

import json
from dataclasses import astuple

import pytest
from pyspark.sql import functions as F

from helpers import example_row, make_settings, register_tiny_policy, tiny_overrides, write_rows
from restpg import catalog, cli, generate, prompts, registry

KNOWN = {"r1": "u1", "r2": "u2"}
REQUESTS = [
    {"request_id": "r1", "user_id": "u1", "task": "product_review", "input": "Write a review of a teapot."},
    {"request_id": "r2", "user_id": "u2", "task": "review", "input": "Write a review of a kettle."},  # a task alias
    {"request_id": "r3", "user_id": "ghost", "task": "product_review", "input": "Write a review of a mug."},
    {"request_id": "r4", "user_id": "u1", "task": "poetry", "input": "Write a poem."},
    {"request_id": "r5", "user_id": "u2", "task": "product_review"},
    {"user_id": "u1", "task": "product_review", "input": "No id."},
    {"request_id": "r1", "user_id": "u1", "task": "product_review", "input": "Again."},
]
LINES = [json.dumps(r) for r in REQUESTS[:6]] + ["", "not json", json.dumps(REQUESTS[6])]


@pytest.mark.parametrize("record, fields, reason", [
    ({"request_id": 7, "user_id": "u", "task": "email", "input": "Hi"},
     {"request_id": "7", "user_id": "u", "task": "email_completion", "input": "Hi"}, None),
    ({"request_id": "a", "user_id": "u", "task": "poetry", "input": "x"}, None, "unknown task 'poetry'"),
    ({"request_id": "a", "user_id": "u", "task": "review"}, None, "missing input"),
    ({"request_id": "a", "user_id": "u", "task": "review", "input": "  "}, None, "empty input"),
    ({"request_id": "a", "task": "review", "input": "x"}, None, "missing user_id"),
    ({"request_id": "a", "user_id": ["u"], "task": "review", "input": "x"}, None, "user_id is a list"),
    ({"user_id": "u", "task": "review", "input": "x"}, {}, "request without a usable request_id (missing request_id)"),
    ({"request_id": True, "user_id": "u", "task": "review", "input": "x"}, {}, "request without a usable request_id"),
    ({"request_id": "a", "user_id": "u", "task": "review", "input": "x" * 11}, None, "input too long: 11 characters"),
    ("[1, 2]", {}, "not a JSON object but list"),
    ("{oops", {}, "not JSON"),
])
def test_parse_request(record, fields, reason):
    got, why = generate.parse_request(record if isinstance(record, str) else json.dumps(record), max_chars=10)
    assert (why is None) == (reason is None) and (reason is None or why.startswith(reason)), why
    if fields is not None:
        assert got == fields
    else:  # a keyed record keeps its id, so its outcome row can say why it was not answered
        assert got["request_id"] == "a"


def crown(settings, version: str) -> str:
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(settings.mlflow.policy_model_name, "champion", version)
    return registry.model_uri(settings, version)


@pytest.fixture(scope="module")
def home(spark, tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("generate-home")
    s = make_settings(root / "home", *tiny_overrides(tiny), "prompt.max_reasoning_tokens=4", "prompt.max_response_tokens=6",
                      "retrieve.k=2", "mlflow.policy_model_name=tiny-generate")
    write_rows(spark, s, "examples", [example_row("ex-1", "u1"), example_row("ex-2", "u2", split="test"),
                                      example_row("ex-3", "u2", input="Write a review of a pot.")])
    (root / "requests.jsonl").write_text("\n".join(LINES) + "\n")
    return s, str(root / "requests.jsonl")


def table(spark, settings):
    return catalog.read(spark, settings, "generations").toPandas().set_index(["model_version", "request_id"]).sort_index()


@pytest.fixture(scope="module")
def rest_pg(home, tiny) -> str:
    """A registered rest_pg version (a reasoning variant), not crowned."""
    s, _ = home
    return register_tiny_policy(s, tiny, [("rest_pg", s.loop.iterations)])[0]


@pytest.fixture(scope="module")
def first(spark, home, rest_pg):
    """rest_pg is champion; one run over the JSON-lines requests."""
    s, path = home
    return crown(s, rest_pg), generate.run(spark, s, requests=path, run_id="g1")


def test_no_champion_is_an_error_that_names_promote(home, rest_pg, capsys):
    s, _ = home
    with pytest.raises(generate.NoChampion, match="run `restpg promote` first"):
        generate.champion(make_settings(s.home_dir, "mlflow.policy_model_name=tiny-generate-none"))  # no such model
    with pytest.raises(generate.NoChampion, match="'tiny-generate' has no @champion version: run `restpg promote` first"):
        generate.champion(s)  # a registered version, none crowned
    code = cli.main(["generate", "--requests", "nothing.jsonl", "--home", str(s.home_dir),
                     "--set", "mlflow.policy_model_name=tiny-generate-none"])
    assert code == 2 and "run `restpg promote` first" in capsys.readouterr().err  # one line, no traceback


def test_known_users_are_answered_with_the_reasoning_split_off(spark, home, first):
    s, path = home
    uri, result = first
    assert result["model_version"] == uri and result["variant"] == "rest_pg"
    assert (result["answered"], result["no_profile"], result["invalid"], result["quarantined"]) == (2, 1, 2, 3)
    assert result["requests"] == 8 and result["newly_quarantined"] == 3
    rows = table(spark, s).loc[uri]
    answered = rows[rows.status == "ok"]
    assert answered.user_id.to_dict() == KNOWN and set(answered.task) == {"product_review"}
    for r in answered.itertuples():
        assert r.reason is None and r.variant == "rest_pg" and r.source == path and r.run_id == "g1"
        assert prompts.SEPARATOR.strip() in r.raw_text and r.reasoning is not None  # reasoning, separator, response
        parsed = prompts.parse_output("rest_pg", r.raw_text, r.finished, bool(r.reasoning_forced))
        assert (r.reasoning, r.response, r.format_ok, r.format_issue) == astuple(parsed)
        assert r.items_retrieved == 2 and r.template_version.startswith("policy_reasoning@")  # k=2 of the user's items
    assert answered.n_tokens.max() > s.prompt.max_response_tokens  # the reasoning budget on top of the response's


def test_no_profile_and_malformed_requests_get_outcomes_not_a_crash(spark, home, first):
    s, path = home
    uri, _ = first
    rows = table(spark, s).loc[uri]
    assert rows.status.to_dict() == {"r1": "ok", "r2": "ok", "r3": "no_profile", "r4": "invalid", "r5": "invalid"}
    assert "user ghost has no profile" in rows.loc["r3", "reason"]
    assert rows.loc["r4", "reason"].startswith("unknown task 'poetry'") and rows.loc["r5", "reason"] == "missing input"
    unanswered = rows[rows.status != "ok"]
    assert unanswered[["response", "reasoning", "raw_text", "format_ok"]].isna().all().all()
    quarantined = catalog.read(spark, s, "quarantine").where(F.col("source_file") == path).toPandas()
    assert sorted(quarantined.record_number) == [6, 8, 9]  # no id, not JSON, r1 again (line 7 is blank)
    assert all(r.startswith("generate: ") for r in quarantined.reason)
    assert any("first given in record 1" in r for r in quarantined.reason)


def test_a_rerun_writes_nothing_new(spark, home, first):
    s, path = home
    uri, _ = first
    before = {n: catalog.version(spark, s, n) for n in ("generations", "quarantine")}
    rows = table(spark, s)
    result = generate.run(spark, s, requests=path, run_id="g2")
    assert result["answered"] == 0 and result["already_answered"] == 2
    assert result["no_profile"] == result["invalid"] == result["newly_quarantined"] == 0
    assert {n: catalog.version(spark, s, n) for n in before} == before
    assert table(spark, s).equals(rows)


def test_a_new_champion_answers_again_and_a_user_with_a_new_profile_is_answered(spark, home, tiny, first):
    """sft (a plain variant) becomes champion; requests come from a Delta table this time, and the ghost
    user got a profile meanwhile."""
    s, path = home
    old, _ = first
    old_rows = table(spark, s).loc[old]
    write_rows(spark, s, "examples", [example_row("ex-4", "ghost")], slice_={"user_id": "ghost"})
    location = str(s.home_dir / "requests_table")
    spark.createDataFrame([(r["request_id"], r["user_id"], r["task"], r.get("input")) for r in REQUESTS[:5]],
                          "request_id string, user_id string, task string, input string").write.format("delta").save(location)
    spark.sql(f"DROP TABLE IF EXISTS {s.catalog.schema}.gen_requests")
    spark.sql(f"CREATE TABLE {s.catalog.schema}.gen_requests USING DELTA LOCATION '{location}'")
    new = crown(s, register_tiny_policy(s, tiny, [("sft", 0)])[0])
    result = generate.run(spark, s, requests="gen_requests", run_id="g3")  # a bare name: a table of the schema
    assert result["model_version"] == new != old and result["variant"] == "sft"
    assert result["source"] == "gen_requests" and generate.table_name(s, "gen_requests") == f"spark_catalog.{s.catalog.schema}.gen_requests"
    assert (result["answered"], result["no_profile"], result["invalid"], result["quarantined"]) == (3, 0, 2, 0)
    rows = table(spark, s)
    assert rows.loc[old].equals(old_rows)  # the old champion's answers stay
    mine = rows.loc[new]
    assert mine.status.to_dict() == {"r1": "ok", "r2": "ok", "r3": "ok", "r4": "invalid", "r5": "invalid"}
    answered = mine[mine.status == "ok"]
    assert answered.reasoning.isna().all() and set(answered.variant) == {"sft"}  # a plain variant: no reasoning
    assert (answered.n_tokens <= s.prompt.max_response_tokens).all()
    assert set(answered.template_version.str.split("@").str[0]) == {"policy_plain"}
