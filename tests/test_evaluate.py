"""Evaluation on hand-built tables with the tiny model registered in a fresh MLflow home: each
variant's final policy answers within its own budget, every output is parsed, a format failure is
scored as an empty response, the result reports the output formats, and the run publishes the
candidate's version for the promotion task."""
from __future__ import annotations

import dataclasses
from dataclasses import astuple
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from helpers import example_row, make_settings, register_tiny_policy, tiny_overrides, write_rows
from restpg import catalog, evaluate, models, prompts, tracking

ROOT = Path(__file__).resolve().parents[1]
TEST = ["ex-1", "ex-2", "ex-3"]
TARGET = "The quick brown fox jumps over the lazy dog, a review of ten apples."


def overrides(tiny) -> list[str]:
    return [*tiny_overrides(tiny), "loop.variants=[sft, rest_pg]", "prompt.max_reasoning_tokens=4",
            "prompt.max_response_tokens=6", "mlflow.policy_model_name=tiny-eval"]


@pytest.fixture(scope="module")
def home(spark, tiny, tmp_path_factory):
    s = make_settings(tmp_path_factory.mktemp("evaluate-home"), *overrides(tiny))
    write_rows(spark, s, "examples", [example_row(e, f"u{i % 2}", split="test", target=TARGET) for i, e in enumerate(TEST)]
               + [example_row("ex-9", "u1", split="train", target=TARGET)])
    write_rows(spark, s, "retrievals", [
        {"example_id": e, "retriever": s.models.retriever, "k": 1,
         "items": [{"rank": 1, "item_id": f"{e}-p0", "score": 0.9, "text": "u1 wrote a review of tea and kettles."}]}
        for e in TEST])
    return s


@pytest.fixture(scope="module")
def versions(home, tiny):
    """sft (iteration 0) → 1, rest_pg at its final iteration → 2."""
    return dict(zip(("sft", "rest_pg"), register_tiny_policy(home, tiny, [("sft", 0), ("rest_pg", home.loop.iterations)])))


@pytest.mark.parametrize("names, expected", [
    (["sft", "sft_reasoning", "rest_em", "rest_pg"], "rest_pg"),
    (["sft", "rest_em"], "rest_em"),
    (["rest_em", "sft"], "rest_em"),
    (["sft", "sft_reasoning"], "sft_reasoning"),
    (["rest_pg:m=8", "sft"], "sft"),  # ablation-tagged systems are never candidates
    (["rest_pg:m=8"], None),
    ([], None),
])
def test_candidate_variant(names, expected):
    assert evaluate.candidate_variant(names) == expected


@pytest.mark.parametrize("uri, version", [
    ("models:/main.restpg.policy/7", "7"), ("models:/p/12", "12"), ("models:/p@champion", None),
    ("runs:/abc/policy", None), ("/tmp/checkpoint", None),
])
def test_registry_version(uri, version):
    assert evaluate.registry_version(uri) == version


def test_publish_task_value_locally_records_and_prints(monkeypatch, capsys):
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    monkeypatch.setattr(tracking, "published", {})
    variant, version = evaluate.publish_candidate({"sft": "models:/p/3", "rest_em": "models:/p/5", "sft_reasoning": "models:/p/4"})
    assert (variant, version) == ("rest_em", "5")
    assert tracking.published == {"candidate_version": "5"}
    assert "task value candidate_version=5" in capsys.readouterr().err


def test_publish_task_value_on_databricks_sets_the_task_value(monkeypatch):
    calls = []

    class TaskValues:
        def set(self, key, value):
            calls.append((key, value))

    class DBUtils:
        class jobs:
            taskValues = TaskValues()

    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "19.0")
    monkeypatch.setattr(tracking, "_dbutils", lambda: DBUtils())
    evaluate.publish_candidate({"sft": "models:/p/3", "rest_pg": "models:/p/9"})
    assert calls == [("candidate_version", "9")]
    # no registered version (a local checkpoint): an empty value, so promote chooses the candidate itself
    evaluate.publish_candidate({"rest_pg": "/tmp/checkpoint"})
    assert calls[-1] == ("candidate_version", "")


def test_score_counts_a_format_failure_as_an_empty_response(spark, home):
    """Hand-built predictions whose response is the target itself: only the format-ok one scores."""
    rows = [{"ablation": "hand", "variant": "rest_pg", "model_version": "m", "split": "test", "example_id": e, "task": "product_review",
             "raw_text": f"notes{prompts.SEPARATOR}{TARGET}", "reasoning": "notes", "response": TARGET, "format_ok": ok,
             "format_issue": None if ok else prompts.LENGTH_CAP, "n_tokens": 12, "finished": ok}
            for e, ok in (("ex-1", True), ("ex-2", False))]
    write_rows(spark, home, "eval_predictions", rows, slice_={"ablation": "hand"})
    evaluate.score(spark, home, ["rest_pg"], "test", "hand", run_id="t")
    scores = catalog.read_slice(spark, home, "eval_scores", {"ablation": "hand"}).toPandas().set_index("example_id")
    assert scores.loc["ex-1", "rouge1"] == pytest.approx(1.0) and scores.loc["ex-1", "meteor"] > 0.9
    assert scores.loc["ex-1", "judge_score"] > 0.5
    assert scores.loc["ex-2", ["judge_score", "rouge1", "rougeL", "meteor"]].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_run_evaluates_final_policies_within_their_budgets(spark, home, tiny, versions, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "published", {})
    result = evaluate.run(spark, home, run_id="e1")
    name = home.mlflow.policy_model_name
    assert result["policies"] == {v: f"models:/{name}/{n}" for v, n in versions.items()}

    preds = catalog.read_slice(spark, home, "eval_predictions", {"ablation": "", "split": "test"}).toPandas()
    assert sorted(zip(preds.variant, preds.example_id)) == sorted((v, e) for v in versions for e in TEST)
    budget = {v: prompts.output_budget(v, home.prompt.max_reasoning_tokens, home.prompt.max_response_tokens) for v in versions}
    assert budget == {"sft": 6, "rest_pg": 18}
    # the decoder writes the separator whole: with this test tokenizer it is longer than the allowance
    separator = len(models.load_tokenizer(tiny, home)(prompts.SEPARATOR, add_special_tokens=False).input_ids)
    budget["rest_pg"] += max(0, separator - prompts.SEPARATOR_ALLOWANCE)
    for r in preds.itertuples():
        assert 0 <= r.n_tokens <= budget[r.variant], (r.variant, r.n_tokens)
        parsed = prompts.parse_output(r.variant, r.raw_text, r.finished, bool(r.reasoning_forced))
        assert (r.reasoning, r.response, r.format_ok, r.format_issue) == astuple(parsed)
        assert r.model_version == result["policies"][r.variant]
    # the reasoning variant gets its reasoning budget on top of the response budget
    assert preds[preds.variant == "rest_pg"].n_tokens.max() > budget["sft"]

    scores = catalog.read_slice(spark, home, "eval_scores", {"ablation": "", "split": "test"}).toPandas()
    # every variant's answers (and scores) of a chunk are one Spark job and one commit, not one per variant
    for table in ("eval_predictions", "eval_scores"):
        history = spark.sql(f"DESCRIBE HISTORY delta.`{catalog.ref(home, table).path}`").collect()
        assert sum(h.operation == "MERGE" and '"e1"' in (h.userMetadata or "") for h in history) == 1, table
    merged = preds.merge(scores, on=["variant", "example_id"])
    assert len(merged) == len(preds)
    failed = merged[~merged.format_ok.astype(bool)]
    assert (failed[["judge_score", "rouge1", "rougeL", "meteor"]] == 0).all().all()

    for variant in versions:
        mine = preds[preds.variant == variant]
        report = result["outputs"][variant]
        assert report["outputs"] == len(mine)
        assert report["format_ok_rate"] == pytest.approx(mine.format_ok.mean())
        assert sum(report["format_issues"].values()) == int((~mine.format_ok.astype(bool)).sum())
        assert set(report["format_issues"]) == set(prompts.FORMAT_ISSUES)
        assert report["mean_generated_tokens"] == pytest.approx(mine.n_tokens.mean())
    # an answer whose separator the decoder wrote is unusable and counted twice: as its format issue and in
    # forced_sep (the random tiny policy never writes the separator within a 4-token reasoning budget)
    reasoning = preds[preds.variant == "rest_pg"]
    assert reasoning.reasoning_forced.astype(bool).all()
    assert (reasoning.format_issue == prompts.FORCED_SEPARATOR).all() and not reasoning.format_ok.astype(bool).any()
    pg = result["outputs"]["rest_pg"]
    assert pg["format_issues"][prompts.FORCED_SEPARATOR] == pg["reasoning_forced"] == len(reasoning)
    # one format rule for plain and reasoning outputs: only a cut (or empty) plain output is unusable
    plain = preds[preds.variant == "sft"]
    assert (plain.format_ok.astype(bool) == (plain.finished.astype(bool) & (plain.raw_text.str.strip() != ""))).all()
    assert "sft" in result["table1"] and "rest_pg" in result["table1"] and "format_ok" in result["output_table"]

    # the promotion task's pointer: rest_pg's final version, published and printed
    assert result["candidate_variant"] == "rest_pg" and result["candidate_version"] == versions["rest_pg"]
    assert set(tracking.published) == set(evaluate.PUBLISHES)
    assert tracking.published["candidate_version"] == versions["rest_pg"]
    assert f"task value candidate_version={versions['rest_pg']}" in capsys.readouterr().err

    summary = catalog.read_slice(spark, home, "eval_summary", {"ablation": "", "split": "test"}).toPandas()
    assert set(summary.variant) == set(versions)
    macro = summary[(summary.metric == "judge_score") & (summary.task == "macro")].set_index("variant")["mean"]
    per_example = scores.groupby(["variant", "task"]).judge_score.mean().groupby("variant").mean()
    assert macro.to_dict() == pytest.approx(per_example.to_dict())

    # the notebook's output-format cell agrees with the report
    cells = (ROOT / "notebooks" / "evaluation.sql").read_text().split("-- COMMAND ----------")
    [cell] = [c for c in cells if "format_ok_rate" in c]
    catalog.register_tables(spark, home)
    before = spark.catalog.currentDatabase()
    catalog.use_namespace(spark, home)  # the notebook names tables alone, as on Databricks
    try:
        by_variant = {r.variant: r for r in spark.sql(cell).collect()}  # one task here: one row per variant
    finally:
        spark.catalog.setCurrentDatabase(before)
    for variant, report in result["outputs"].items():
        row = by_variant[variant]
        assert row.format_ok_rate == pytest.approx(report["format_ok_rate"], abs=1e-4)
        assert row.mean_generated_tokens == pytest.approx(report["mean_generated_tokens"], abs=0.05)
        assert [row[i] for i in prompts.FORMAT_ISSUES] == [report["format_issues"][i] for i in prompts.FORMAT_ISSUES]
        words = report["mean_response_words"]
        assert (row.mean_response_words is None) if words is None else row.mean_response_words == pytest.approx(words, abs=0.05)


def test_a_rerun_after_a_kill_does_only_what_is_missing(spark, home, tiny, versions):
    """Chunks of one example: a run killed after ex-1 and ex-2 of sft's predictions (and ex-1's score)
    is finished by the rerun, which answers and scores only what is missing, with the same answers. (A
    forced run replaces every row: the first run here forces over the module's earlier evaluation.)"""
    s = make_settings(home.home_dir, *overrides(tiny), "evaluate.chunk_examples=1")
    key = {"ablation": "", "variant": "sft", "split": "test"}

    def table(name):
        return catalog.read_slice(spark, s, name, key).toPandas().set_index("example_id").sort_index()

    evaluate.run(spark, s, run_id="whole", variants=["sft"], force=True)
    whole = table("eval_predictions")
    assert set(whole.run_id) == set(table("eval_scores").run_id) == {"whole"} and len(whole) == 3
    history = spark.sql(f"DESCRIBE HISTORY delta.`{catalog.ref(s, 'eval_predictions').path}`").collect()
    assert sum(h.operation == "MERGE" and '"whole"' in (h.userMetadata or "") for h in history) == 3  # one per example
    kept = {"eval_predictions": ["ex-1", "ex-2"], "eval_scores": ["ex-1"]}
    for name, ids in kept.items():
        rows = catalog.read_slice(spark, s, name, key).where(F.col("example_id").isin(ids))
        catalog.replace_slice(spark, s, rows, name, key, "killed")

    evaluate.run(spark, s, run_id="rerun", variants=["sft"])
    preds, scores = table("eval_predictions"), table("eval_scores")
    assert preds.run_id.to_dict() == {"ex-1": "whole", "ex-2": "whole", "ex-3": "rerun"}
    assert scores.run_id.to_dict() == {"ex-1": "whole", "ex-2": "rerun", "ex-3": "rerun"}
    assert preds.raw_text.to_dict() == whole.raw_text.to_dict()  # the same seeds: the same answers


def test_max_examples_caps_the_evaluated_examples_lowest_ids_first(spark, home):
    capped = dataclasses.replace(home, evaluate=dataclasses.replace(home.evaluate, max_examples=2))
    ids = sorted(r.example_id for r in evaluate.evaluation_examples(spark, capped, "test").collect())
    assert ids == sorted(TEST)[:2]
    assert sorted(r.example_id for r in evaluate.evaluation_examples(spark, home, "test").collect()) == sorted(TEST)


def test_sparse_eval_answers_the_variants_that_share_inputs_in_one_job_per_size(spark, home, versions):
    """sft and rest_pg read the same cut profiles: at each size their answers are one commit (and their
    scores another); every variant is scored on every example at every size, under the size's ablation."""
    from restpg import sparse_eval

    result = sparse_eval.run(spark, home, run_id="sparse", sizes="0,all", variants=["sft", "rest_pg"])
    assert result["sizes"] == ["profile_size=0", "profile_size=all"]
    for table in ("eval_predictions", "eval_scores"):
        rows = catalog.read(spark, home, table).where(F.col("ablation").startswith("profile_size=")).toPandas()
        assert sorted(zip(rows.ablation, rows.variant, rows.example_id)) == sorted(
            (a, v, e) for a in result["sizes"] for v in versions for e in TEST), table
        history = spark.sql(f"DESCRIBE HISTORY delta.`{catalog.ref(home, table).path}`").collect()
        assert sum(h.operation == "MERGE" and '"sparse"' in (h.userMetadata or "") for h in history) == 2, table
    assert set(result["judge_score"]) == {f"{a}/{v}" for a in result["sizes"] for v in versions}
