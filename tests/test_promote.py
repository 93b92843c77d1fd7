import datetime as dt

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from restpg import catalog, promote
from restpg.config import load_settings
from restpg.runtime import setup_mlflow


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return str(tmp_path_factory.mktemp("promote-home"))


@pytest.fixture(scope="module")
def model_source(home):
    """One logged pyfunc model; each test registers versions of it under its own model name."""
    setup_mlflow(load_settings("local", home=home))
    with mlflow.start_run(run_name="promote-test-model"):
        info = mlflow.pyfunc.log_model(name="policy", python_model=Echo(), pip_requirements=[])
    return info.model_uri


def _setup(home, model_source, name, n_versions, *extra):
    settings = load_settings("local", overrides=[f"mlflow.policy_model_name={name}", *extra], home=home)
    setup_mlflow(settings)
    versions = [str(mlflow.register_model(model_source, name).version) for _ in range(n_versions)]
    return settings, versions


def _scores(level: float, spread: float = 0.0, n: int = 12):
    """Per-example judge scores over two tasks; `spread` adds example-dependent noise."""
    rows = []
    for i in range(n):
        task = "email_completion" if i % 2 else "product_review"
        noise = spread * (((i * 7919) % 11) / 10 - 0.5)
        rows.append({"example_id": f"ex{i}", "task": task, "judge_score": level + 0.02 * (i % 3) + noise})
    return pd.DataFrame(rows)


def _aliases(name):
    return {alias: str(v) for alias, v in MlflowClient().get_registered_model(name).aliases.items()}


def _promotion_rows(spark, settings, name):
    return (catalog.read(spark, settings, "promotions").where(f"model_name = '{name}'")
            .orderBy("created_at").collect())


@pytest.mark.parametrize("candidate, champion, decision, reason", [
    (_scores(0.5), None, "champion", "no champion yet"),
    (_scores(0.62, 0.05), _scores(0.50, 0.05), "champion", "p="),
    (_scores(0.40, 0.05), _scores(0.50, 0.05), "challenger", "not better"),
    # better by 0.01 on average but noisily so: p well above alpha
    (_scores(0.50, 0.3).assign(judge_score=lambda d: d.judge_score + [0.2, -0.18] * 6), _scores(0.50, 0.3),
     "challenger", "not significant"),
    (_scores(0.9, n=1), _scores(0.1, n=1), "challenger", "no evidence"),
    (_scores(0.9).assign(example_id=lambda d: "other" + d.example_id), _scores(0.1), "challenger", "0 paired"),
])
def test_decide(candidate, champion, decision, reason):
    result = promote.decide(candidate, champion, alpha=0.05)
    assert result["decision"] == decision and reason in result["reason"]
    if champion is not None and result["n_paired"] >= 2:
        assert result["p_value"] is not None
        assert (result["p_value"] < 0.05 and result["candidate_score"] > result["champion_score"]) == (decision == "champion")


def test_macro_judge_score_is_mean_of_task_means():
    df = pd.DataFrame({"example_id": list("abcde"), "task": ["x"] * 4 + ["y"], "judge_score": [1.0] * 4 + [0.0]})
    assert promote.macro_judge_score(df) == pytest.approx(0.5)
    assert promote.macro_judge_score(df.iloc[:0]) is None


def test_promotion_lifecycle(spark, home, model_source):
    name = "policy-lifecycle"
    settings, (v1, v2, v3) = _setup(home, model_source, name, 3)
    scores = {v1: _scores(0.50, spread=0.05), v2: _scores(0.62, spread=0.05), v3: _scores(0.40, spread=0.05)}

    first = promote.run(spark, settings, v1, scores_fn=scores.get, run_id="r1")
    assert first["decision"] == "champion" and first["champion_version"] is None and first["moved"] == ["champion"]
    assert _aliases(name) == {"champion": v1}
    assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == v1
    tags = MlflowClient().get_model_version(name, v1).tags
    assert tags["promotion_decision"] == "champion" and tags["promotion_champion_version"] == ""
    assert float(tags["promotion_candidate_score"]) == pytest.approx(first["candidate_score"])

    better = promote.run(spark, settings, v2, scores_fn=scores.get, run_id="r2")
    assert better["decision"] == "champion" and better["champion_version"] == v1
    assert better["p_value"] < 0.05 and better["candidate_score"] > better["champion_score"]
    assert better["n_paired"] == 12
    assert _aliases(name) == {"champion": v2}

    worse = promote.run(spark, settings, v3, scores_fn=scores.get, run_id="r3")
    assert worse["decision"] == "challenger" and worse["champion_version"] == v2
    assert _aliases(name) == {"champion": v2, "challenger": v3}
    tags = MlflowClient().get_model_version(name, v3).tags
    assert tags["promotion_decision"] == "challenger" and tags["promotion_champion_version"] == v2
    assert float(tags["promotion_champion_score"]) == pytest.approx(worse["champion_score"])
    assert float(tags["promotion_p_value"]) == pytest.approx(worse["p_value"])

    # re-evaluated, the challenger now wins: it takes champion and drops the challenger alias
    scores[v3] = _scores(0.80, spread=0.05)
    rematch = promote.run(spark, settings, v3, scores_fn=scores.get, run_id="r4")
    assert rematch["decision"] == "champion" and _aliases(name) == {"champion": v3}

    rows = _promotion_rows(spark, settings, name)
    assert [(r.candidate_version, r.champion_version, r.decision, r.run_id) for r in rows] == [
        (v1, None, "champion", "r1"), (v2, v1, "champion", "r2"), (v3, v2, "challenger", "r3"),
        (v3, v2, "champion", "r4")]
    assert all(r.split == "val" and not r.dry_run and isinstance(r.created_at, dt.datetime) for r in rows)
    assert rows[1].p_value == pytest.approx(better["p_value"])


def test_dry_run_moves_nothing(spark, home, model_source):
    name = "policy-dry"
    settings, (v1, v2) = _setup(home, model_source, name, 2, "promote.dry_run=true")
    scores = {v1: _scores(0.50, 0.05), v2: _scores(0.70, 0.05)}
    promote.run(spark, settings, v1, scores_fn=scores.get, run_id="d1", dry_run=False)
    assert _aliases(name) == {"champion": v1}

    result = promote.run(spark, settings, v2, scores_fn=scores.get, run_id="d2")
    assert result["decision"] == "champion" and result["dry_run"] and result["moved"] == []
    assert _aliases(name) == {"champion": v1}
    assert "promotion_decision" not in MlflowClient().get_model_version(name, v2).tags
    rows = {r.run_id: r for r in _promotion_rows(spark, settings, name)}
    assert rows["d2"].dry_run and rows["d2"].decision == "champion" and rows["d2"].champion_version == v1
    assert not rows["d1"].dry_run


def test_default_scores_come_from_eval_scores(spark, home, model_source):
    name = "policy-table"
    settings, (v1, v2) = _setup(home, model_source, name, 2)
    rows = []
    for version, level in ((v1, 0.4), (v2, 0.6)):
        for split in ("val", "test"):
            for r in _scores(level if split == "val" else 1.0 - level, 0.05).itertuples():
                rows.append(("", f"variant-{version}", promote.model_uri(name, version), split, r.example_id, r.task,
                             "embedding", float(r.judge_score), 0.1, 0.1, 0.1, "eval", dt.datetime.now()))
    df = spark.createDataFrame(rows, schema=catalog.spec("eval_scores").struct())
    catalog.merge_insert(spark, settings, df, "eval_scores", run_id="eval")

    MlflowClient().set_registered_model_alias(name, "champion", v1)
    result = promote.run(spark, settings, v2, run_id="t2")
    # on the val split v2 is better; on test it would be worse
    assert result["decision"] == "champion" and result["n_paired"] == 12
    assert result["candidate_score"] == pytest.approx(promote.macro_judge_score(_scores(0.6, 0.05)))
    assert _aliases(name) == {"champion": v2}


def test_unknown_candidate_version_fails(spark, home, model_source):
    name = "policy-unknown"
    settings, _ = _setup(home, model_source, name, 1)
    with pytest.raises(mlflow.exceptions.MlflowException):
        promote.run(spark, settings, "99", scores_fn=lambda v: _scores(0.5), run_id="u")
