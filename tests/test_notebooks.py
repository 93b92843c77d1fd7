import datetime as dt
import math
from pathlib import Path

import pandas as pd
import pytest

from restpg import catalog, cli, metrics, notebooks
from restpg.config import load_settings

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOW = dt.datetime(2026, 1, 1, 12, 0, 0)
TASKS = ("product_review", "topic_writing")
USERS = ("u1", "u2", "u3")
VARIANTS = ("sft", "sft_reasoning", "rest_em", "rest_pg")


@pytest.mark.parametrize("text, kinds, titles", [
    ("-- Databricks notebook source\nSELECT 1", ["sql"], [""]),
    ("-- Databricks notebook source\n-- MAGIC %md\n-- MAGIC # Title\n\n-- COMMAND ----------\n\n-- One\nSELECT 1\n",
     ["markdown", "sql"], ["", "One"]),
    ("-- MAGIC %python\n-- MAGIC print(1)\n-- COMMAND ----------\n-- chart: bar x=a y=b title=\"Nice chart\"\nSELECT 1 AS a, 2 AS b",
     ["magic", "sql"], ["", "Nice chart"]),
    ("SELECT 1\n-- COMMAND ----------\n\n-- COMMAND ----------\nSELECT 2", ["sql", "sql"], ["", ""]),
])
def test_parse_cells(text, kinds, titles):
    cells = notebooks.parse_cells(text)
    assert [c.kind for c in cells] == kinds and [c.title for c in cells] == titles
    assert [c.number for c in cells] == list(range(1, len(cells) + 1))


def test_parameter_cells_are_recognised():
    text = ("-- Databricks notebook source\n-- MAGIC %md\n-- MAGIC # T\n-- COMMAND ----------\n"
            "-- Parameters\nCREATE WIDGET TEXT catalog DEFAULT 'main';\nCREATE WIDGET TEXT schema DEFAULT \"restpg\";\n"
            "USE CATALOG IDENTIFIER(:catalog);\nUSE SCHEMA IDENTIFIER(:schema)\n-- COMMAND ----------\n"
            "USE CATALOG main;\nSELECT 1\n")
    assert [c.kind for c in notebooks.parse_cells(text)] == ["markdown", "parameters", "sql"]


def test_shipped_notebooks_name_no_schema():
    """Catalog and schema come from the parameter cell; the queries name tables alone."""
    for path in sorted(NOTEBOOK_DIR.glob("*.sql")):
        cells = notebooks.parse_cells(path.read_text())
        assert [c.kind for c in cells[:2]] == ["markdown", "parameters"], path.name
        sql = "\n".join(c.text for c in cells if c.kind == "sql")
        assert "restpg." not in sql and "main." not in sql, path.name


def test_parse_cells_chart_and_statements():
    text = ("-- Databricks notebook source\n-- Two statements; the last one is the result\n"
            "-- chart: line x=tau y=rate series=run facet=task title=\"Pass rate\"\n"
            "CREATE OR REPLACE TEMP VIEW v AS SELECT 1 AS x;\nSELECT x FROM v;\n")
    (cell,) = notebooks.parse_cells(text)
    assert cell.chart == notebooks.Chart("line", "tau", "rate", "run", "task", "Pass rate")
    assert cell.statements == ["-- Two statements; the last one is the result\n"
                               "-- chart: line x=tau y=rate series=run facet=task title=\"Pass rate\"\n"
                               "CREATE OR REPLACE TEMP VIEW v AS SELECT 1 AS x", "SELECT x FROM v"]
    assert cell.title == "Pass rate"


@pytest.mark.parametrize("line", [
    "-- chart: pie x=a y=b",
    "-- chart: bar x=a",
    "-- chart: bar x=a y=b colour=red",
])
def test_bad_chart_declarations(line):
    with pytest.raises(notebooks.NotebookError):
        notebooks.parse_chart(line)


def _df(spark, name, rows):
    from helpers import rows_df

    return rows_df(spark, name, [{"run_id": "nb-test", "created_at": NOW, **r} for r in rows])


def _examples():
    rows = []
    for task in TASKS:
        for u, user in enumerate(USERS):
            for split, k in (("train", 0), ("train", 1), ("test", 2)):
                rows.append({"example_id": f"{task}-{user}-{k}", "task": task, "split": split, "user_id": user,
                             "input": f"Write about item {k}", "target": f"{user} writes about item {k} in {task}",
                             "profile": [{"item_id": f"{user}-p{i}", "text": f"past text {i}", "fields": {"title": "t"}}
                                         for i in range(2)],
                             "source_file": "test", "record_number": u * 10 + k})
    return rows


def _trajectories_and_scores(examples):
    traj, judged = [], []
    train = [e for e in examples if e["split"] == "train"]
    for variant, iterations, kind in (("rest_pg", (1, 2), "llm"), ("rest_em", (1,), "embedding")):
        for it in iterations:
            for n, e in enumerate(train):
                for s in range(3):
                    reasoning = "- likes detail\n" * (s * 20) if variant == "rest_pg" else None
                    score = (1, 3, 5, 7, 10)[(n + s + it) % 5]
                    reward = score / 10 if kind == "llm" else round(0.2 + 0.25 * s + 0.03 * n, 3)
                    traj.append({"variant": variant, "iteration": it, "example_id": e["example_id"], "task": e["task"],
                                 "sample_index": s, "seed": 1000 * it + 10 * n + s, "policy_version": f"models:/p/{it}",
                                 "raw_text": (reasoning or "") + "answer", "reasoning": reasoning, "response": f"answer {s}",
                                 "has_separator": reasoning is not None, "n_tokens": 40 + s, "finished": s != 2,
                                 "format_ok": s != 2, "format_issue": None if s != 2 else "length_cap",
                                 "template_version": "v1"})
                    logprobs = ({str(c): math.log(0.6 if c == score else 0.1) for c in (1, 3, 5, 7, 10)}
                                if kind == "llm" else None)
                    judged.append({"variant": variant, "iteration": it, "example_id": e["example_id"], "task": e["task"],
                                   "sample_index": s, "reward_kind": kind, "judge_model": "judge",
                                   "template_version": "j1" if kind == "llm" else None, "reward": float(reward),
                                   "score": score if kind == "llm" else None, "criterion_logprobs": logprobs,
                                   "response_chars": 8, "reasoning_chars": len(reasoning or ""),
                                   "format_ok": s != 2, "format_issue": None if s != 2 else "length_cap"})
    return traj, judged


def _training_sets(examples, judged):
    rows = [{"variant": "rest_pg", "iteration": 0, "example_id": e["example_id"], "sample_index": -1, "task": e["task"],
             "prompt": e["input"], "completion": e["target"], "weight": 1.0, "source": "gold", "template_version": "v1"}
            for e in examples if e["split"] == "train"]
    rows += [{"variant": j["variant"], "iteration": j["iteration"], "example_id": j["example_id"],
              "sample_index": j["sample_index"], "task": j["task"], "prompt": "p", "completion": "c",
              "weight": j["reward"], "source": "trajectory", "template_version": "v1"}
             for j in judged if j["reward"] >= 0.5]
    return rows


def _evaluation(examples):
    preds, scores = [], []
    test = [e for e in examples if e["split"] == "test"]
    for v, variant in enumerate(VARIANTS):
        for n, e in enumerate(test):
            common = {"ablation": "", "variant": variant, "model_version": f"models:/p/{v + 1}", "split": "test",
                      "example_id": e["example_id"], "task": e["task"]}
            response = f"{e['target']} " + "extra " * (3 - v)
            preds.append({**common, "user_id": e["user_id"], "raw_text": response,
                          "reasoning": "- style" if "reason" in variant or variant == "rest_pg" else None,
                          "response": response, "template_version": "v1", "format_ok": True, "n_tokens": 30,
                          "finished": True})
            r = metrics.rouge(response, e["target"])
            scores.append({**common, "reward_kind": "embedding", "judge_score": 0.5 + 0.08 * v + 0.01 * ((n * 3) % 4),
                           "rouge1": r["rouge1"], "rougeL": r["rougeL"], "meteor": metrics.meteor(response, e["target"])})
    return preds, scores


SPARSE_SIZES = ("all", "10", "0", "2", "1")  # out of order, and "10" < "2" as text: the notebook orders by number


def sparse_score(size: str, variant: str) -> float:
    return {"pat": 0.6, "pat:random_peers": 0.5, "rest_pg": 0.4}[variant] + (0.1 if size == "all" else 0.02 * int(size))


def _sparse_scores(scores):
    """`sparse_eval`'s rows: ablation profile_size=<n>, pat and its random-peers control next to rest_pg."""
    return [{**s, "ablation": f"profile_size={size}", "variant": variant, "judge_score": sparse_score(size, variant)}
            for size in SPARSE_SIZES for variant in ("pat", "pat:random_peers", "rest_pg")
            for s in scores if s["variant"] == "rest_pg" and s["ablation"] == ""]


def _repoint_names(spark, settings):
    """Names like restpg.examples may belong to another test's home in this shared session."""
    for name in catalog.TABLES:
        ref = catalog.ref(settings, name)
        if spark.catalog.tableExists(ref.fqn):
            location = spark.sql(f"DESCRIBE DETAIL {ref.fqn}").first().location
            if location.rstrip("/").removeprefix("file:") != ref.path.rstrip("/"):
                spark.sql(f"DROP TABLE {ref.fqn}")  # external table: the data stays


@pytest.fixture(scope="module")
def tables(spark, tmp_path_factory):
    settings = load_settings("local", home=str(tmp_path_factory.mktemp("notebook-home")))
    _repoint_names(spark, settings)
    examples = _examples()
    traj, judged = _trajectories_and_scores(examples)
    preds, scores = _evaluation(examples)
    scores += _sparse_scores(scores)
    summary = metrics.summarize(pd.DataFrame(scores))
    tests = metrics.pairwise_tests(pd.DataFrame(scores), alpha=0.05)
    validation = [{"reward_kind": "embedding", "judge_model": "minilm", "check": "shuffle", "setting": f"{pct}% shuffled",
                   "mean_reward": 0.7 - pct / 500, "n": 12, "slope": -0.2, "fit": True} for pct in (0, 50, 100)]
    validation += [{"reward_kind": "embedding", "judge_model": "minilm", "check": "direct", "setting": s,
                    "mean_reward": m, "n": 12, "slope": None, "fit": True}
                   for s, m in (("self", 1.0), ("same_user", 0.6), ("other_user", 0.3))]
    promotion = [{"model_name": "restpg-policy", "candidate_version": "2", "champion_version": "1",
                  "decision": "champion", "split": "val", "candidate_score": 0.7, "champion_score": 0.6,
                  "p_value": 0.01, "dry_run": False}]
    writes = {"examples": examples, "trajectories": traj, "judge_scores": judged,
              "training_sets": _training_sets(examples, judged), "eval_predictions": preds, "eval_scores": scores,
              "eval_summary": summary.to_dict("records"), "eval_tests": tests.to_dict("records"),
              "reward_validation": validation, "promotions": promotion}
    for name, rows in writes.items():
        rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
        catalog.replace_slice(spark, settings, _df(spark, name, rows), name, {}, run_id="nb-test")
    catalog.register_tables(spark, settings)
    return settings


@pytest.fixture(scope="module")
def ran(spark, tables, tmp_path_factory):
    """Every notebook in notebooks/, run once: {notebook stem: (path, results)} and the output dir."""
    out = tmp_path_factory.mktemp("notebook-out")
    paths = sorted(NOTEBOOK_DIR.glob("*.sql"))
    params = notebooks.parameters(tables)
    assert params == {"catalog": "spark_catalog", "schema": "restpg"}
    return {p.stem: (p, notebooks.run_notebook(spark, p, out, params)) for p in paths}, out


def test_every_notebook_runs(ran):
    runs, out = ran
    assert {"reward_analysis", "evaluation"} <= set(runs)
    for stem, (path, results) in runs.items():
        text = path.read_text()
        assert text.splitlines()[0] == notebooks.HEADER
        cells = notebooks.parse_cells(text)
        sql_cells = [c for c in cells if c.kind == "sql"]
        assert sql_cells and cells[0].kind == "markdown"
        assert [r["cell"] for r in results] == [c.number for c in sql_cells]
        for cell, r in zip(sql_cells, results):
            csv = Path(r["csv"])
            assert csv.parent == out / stem and csv.name.startswith(f"{cell.number:02d}_")
            assert csv.exists() and len(pd.read_csv(csv)) == r["rows"]
            assert r["rows"] > 0, (stem, cell.number, cell.title)  # the test tables feed every cell
            if cell.chart:
                assert Path(r["png"]).read_bytes()[:4] == b"\x89PNG", (stem, cell.number)
            else:
                assert r["png"] is None


def test_notebook_results_reflect_the_tables(ran):
    runs, _ = ran
    results = {r["title"]: r for r in runs["evaluation"][1]}
    table1 = pd.read_csv(next(r["csv"] for t, r in results.items() if t.startswith("Table 1")))
    table1 = table1[table1.ablation.fillna("") == ""]  # the main table; the sparse sweep's rows are ablations
    row = table1[(table1.metric == "judge_score") & (table1.variant == "rest_pg")].iloc[0]
    assert row.macro == pytest.approx((row.product_review + row.topic_writing) / 2, abs=1e-3)
    assert list(table1[table1.metric == "judge_score"].variant) == list(VARIANTS)

    sweep = pd.read_csv(next(r["csv"] for t, r in results.items() if t.startswith("Judge score vs the user")))
    assert list(dict.fromkeys(sweep.profile_size.astype(str))) == ["0", "1", "2", "10", "all"]
    assert len(sweep) == 5 * 3 and set(sweep.variant) == {"pat", "pat:random_peers", "rest_pg"}
    for r in sweep.itertuples():
        assert r.macro_judge_score == pytest.approx(sparse_score(str(r.profile_size), r.variant))
    assert next(r for t, r in results.items() if t.startswith("Judge score vs the user"))["png"]

    rewards = runs["reward_analysis"][1]
    hist = pd.read_csv(rewards[0]["csv"])
    assert hist.n.sum() == 12 * 3 * 3  # 12 training inputs x 3 samples x 3 (variant, iteration) runs
    crit = pd.read_csv(next(r["csv"] for r in rewards if "criterion" in r["title"]))
    assert set(crit.criterion) == {1, 3, 5, 7, 10}
    assert crit.mean_share_among_criteria.sum() == pytest.approx(2.0)  # two llm runs, shares sum to 1 each
    tau = pd.read_csv(next(r["csv"] for r in rewards if "tau" in r["title"]))
    assert (tau[tau.tau == 0.0].output_pass_rate == 1.0).all()
    assert tau.groupby("run").output_pass_rate.apply(lambda s: s.is_monotonic_decreasing).all()


def test_missing_column_fails_with_cell_and_sql(spark, tables, tmp_path):
    bad = tmp_path / "bad.sql"
    bad.write_text("-- Databricks notebook source\n-- MAGIC %md\n-- MAGIC # Bad\n\n-- COMMAND ----------\n\n"
                   "-- fine\nSELECT count(*) AS n FROM restpg.judge_scores\n\n-- COMMAND ----------\n\n"
                   "-- broken\nSELECT no_such_column FROM restpg.judge_scores\n")
    with pytest.raises(notebooks.NotebookError) as err:
        notebooks.run_notebook(spark, bad, tmp_path / "out")
    assert "cell 3" in str(err.value) and "SELECT no_such_column FROM restpg.judge_scores" in str(err.value)
    assert (tmp_path / "out" / "bad" / "02_fine.csv").exists()


def test_chart_on_missing_column_fails(spark, tables, tmp_path):
    bad = tmp_path / "badchart.sql"
    bad.write_text("-- Databricks notebook source\n-- chart: bar x=a y=nope\nSELECT 1 AS a, 2 AS b\n")
    with pytest.raises(notebooks.NotebookError, match="cell 1.*nope"):
        notebooks.run_notebook(spark, bad, tmp_path)


PARAMETERISED = ("-- Databricks notebook source\n-- COMMAND ----------\nCREATE WIDGET TEXT catalog DEFAULT 'main';\n"
                 "CREATE WIDGET TEXT schema DEFAULT 'restpg';\nUSE CATALOG IDENTIFIER(:catalog);\n"
                 "USE SCHEMA IDENTIFIER(:schema)\n-- COMMAND ----------\n-- count\nSELECT count(*) AS n FROM examples\n")


def test_parameters_choose_the_schema_and_are_checked(spark, tables, tmp_path):
    """The same notebook reads whichever schema it is given; the session's namespace is left as it was."""
    nb = tmp_path / "count.sql"
    nb.write_text(PARAMETERISED)
    spark.sql("CREATE SCHEMA IF NOT EXISTS spark_catalog.nb_other")
    spark.sql("CREATE OR REPLACE TABLE spark_catalog.nb_other.examples (example_id STRING) USING DELTA")
    spark.sql("INSERT INTO spark_catalog.nb_other.examples VALUES ('a'), ('b')")
    try:
        before = spark.catalog.currentCatalog(), spark.catalog.currentDatabase()
        counts = {}
        for schema in ("restpg", "nb_other"):
            (r,) = notebooks.run_notebook(spark, nb, tmp_path / schema, {"catalog": "spark_catalog", "schema": schema})
            counts[schema] = int(pd.read_csv(r["csv"]).n[0])
        assert counts == {"restpg": len(_examples()), "nb_other": 2}
        assert (spark.catalog.currentCatalog(), spark.catalog.currentDatabase()) == before
        with pytest.raises(ValueError, match="plain identifier"):
            notebooks.run_notebook(spark, nb, tmp_path / "bad", {"catalog": "spark_catalog", "schema": "restpg; DROP"})
        assert (spark.catalog.currentCatalog(), spark.catalog.currentDatabase()) == before
    finally:
        spark.sql("DROP SCHEMA spark_catalog.nb_other CASCADE")


def test_sql_command_uses_the_profile_namespace_and_errors_in_one_line(spark, tables, capsys):
    home = str(tables.home_dir)
    try:
        assert cli.main(["sql", "--home", home, "--format", "csv", "SELECT count(*) AS n FROM examples"]) == 0
        assert capsys.readouterr().out.split() == ["n", str(len(_examples()))]
        assert cli.main(["sql", "--home", home, "SELECT no_such_column FROM examples"]) == 1
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("restpg sql: [UNRESOLVED_COLUMN"), captured.err
        assert "no_such_column" in lines[0] and "\tat " not in captured.out + captured.err
    finally:
        spark.catalog.setCurrentDatabase("default")
