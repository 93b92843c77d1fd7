"""Promotion owns its decision: it picks the candidate, finds the champion and the run's baselines in
a tiny MLflow registry, scores whatever has no validation scores yet (tiny model, hand-built
examples), never crowns a candidate below a baseline, and records every decision."""
from __future__ import annotations

import datetime as dt

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from helpers import example_row, make_settings, tiny_overrides, write_rows
from restpg import catalog, promote
from restpg.runtime import setup_mlflow


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def _scores(level: float, spread: float = 0.0, n: int = 12):
    """Per-example judge scores over two tasks; `spread` adds example-dependent noise."""
    rows = []
    for i in range(n):
        task = "email_completion" if i % 2 else "product_review"
        noise = spread * (((i * 7919) % 11) / 10 - 0.5)
        rows.append({"example_id": f"ex{i}", "task": task, "judge_score": level + 0.02 * (i % 3) + noise})
    return pd.DataFrame(rows)


def _shift(df, deltas):
    return df.assign(judge_score=df.judge_score + deltas)


WEAK = _scores(0.30, 0.05)
NOISY = _scores(0.50, 0.3)
NOISY_BELOW = _shift(NOISY, [0.18, -0.2] * 6)   # 0.01 lower on average, p far above alpha
NOISY_ABOVE = _shift(NOISY, [0.2, -0.18] * 6)   # 0.01 higher on average, p far above alpha


@pytest.mark.parametrize("candidate, champion, baselines, decision, reason, baseline", [
    (_scores(0.5), None, {}, "champion", "no baseline", None),
    (_scores(0.5, 0.05), None, {"sft": WEAK}, "champion", "at least as good as the best baseline sft", "sft"),
    (_scores(0.5, 0.05), None, {"sft": WEAK, "rest_em": _scores(0.45, 0.05)}, "champion", "best baseline rest_em", "rest_em"),
    (_scores(0.5), None, {"sft": _scores(0.5)}, "champion", "at least as good", "sft"),  # a tie is not lower
    # the first promotion crowns no loser: below the best baseline, rejected
    (_scores(0.40, 0.05), None, {"sft": WEAK, "rest_em": _scores(0.45, 0.05)}, "rejected", "below baseline rest_em", "rest_em"),
    # above one baseline, below another: named after the one it fell below
    (_scores(0.40, 0.05), None, {"rest_em": WEAK, "sft": _scores(0.45, 0.05)}, "rejected", "below baseline sft", "sft"),
    # lower by noise only: still no evidence it is as good
    (NOISY_BELOW, None, {"sft": NOISY}, "rejected", "below baseline sft", "sft"),
    (_scores(0.5), None, {"sft": _scores(0.1, n=1)}, "rejected", "no evidence", "sft"),
    # past the gate, against a champion
    (_scores(0.62, 0.05), _scores(0.50, 0.05), {"sft": WEAK}, "champion", "better than the champion, p=", "sft"),
    (_scores(0.40, 0.05), _scores(0.50, 0.05), {"sft": WEAK}, "challenger", "not better than the champion", "sft"),
    (NOISY_ABOVE, NOISY, {"sft": WEAK}, "challenger", "not significantly", "sft"),
    (_scores(0.9).assign(example_id=lambda d: "other" + d.example_id), _scores(0.1), {}, "challenger", "0 examples paired", None),
    # a candidate below a baseline is rejected even where it would beat the champion
    (_scores(0.40, 0.05), _scores(0.20, 0.05), {"sft": _scores(0.45, 0.05)}, "rejected", "below baseline sft", "sft"),
])
def test_decide(candidate, champion, baselines, decision, reason, baseline):
    result = promote.decide(candidate, champion, baselines, alpha=0.05)
    assert result["decision"] == decision and reason in result["reason"], result
    assert result["baseline_variant"] == baseline
    if baseline is not None and result["baseline_n_paired"] >= 2:  # every frame here shares its examples
        assert result["baseline_p_value"] is not None
        assert result["baseline_score"] == pytest.approx(promote.macro_judge_score(baselines[baseline]))
        assert (decision == "rejected") == (promote.macro_judge_score(candidate) < result["baseline_score"])
    if champion is not None and result["n_paired"] >= 2:  # the champion comparison is always on record
        assert result["p_value"] is not None and result["champion_score"] is not None
    if decision == "champion" and champion is not None:
        assert result["p_value"] < 0.05 and result["candidate_score"] > result["champion_score"]


def test_noise_does_not_excuse_a_lower_score():
    result = promote.decide(NOISY_BELOW, None, {"sft": NOISY}, alpha=0.05)
    assert result["decision"] == "rejected" and result["baseline_p_value"] > 0.5


def test_macro_judge_score_is_mean_of_task_means():
    df = pd.DataFrame({"example_id": list("abcde"), "task": ["x"] * 4 + ["y"], "judge_score": [1.0] * 4 + [0.0]})
    assert promote.macro_judge_score(df) == pytest.approx(0.5)
    assert promote.macro_judge_score(df.iloc[:0]) is None


# --- the stage against a registry whose versions already have validation scores -----------------------

def _home(tmp_path, name, *extra):
    """A fresh home with one logged pyfunc that has no checkpoint: trying to generate with it would fail."""
    s = make_settings(tmp_path / "home", f"mlflow.policy_model_name={name}", "loop.variants=[sft, rest_pg]",
                      "loop.iterations=1", *extra)
    setup_mlflow(s)
    with mlflow.start_run(run_name="promote-test-model"):
        source = mlflow.pyfunc.log_model(name="policy", python_model=Echo(), pip_requirements=[]).model_uri
    return s, source


def _register(settings, source, variant: str, iteration: int) -> str:
    name, client = settings.mlflow.policy_model_name, MlflowClient()
    version = str(mlflow.register_model(source, name).version)
    client.set_model_version_tag(name, version, "variant", variant)
    client.set_model_version_tag(name, version, "iteration", str(iteration))
    return version


def _score_rows(settings, scored: dict) -> list[dict]:
    """eval_scores rows of validation scores as promote writes them (ablation 'promotion', split 'val',
    variant '<variant>:v<version>') from {(variant, version): per-example scores}."""
    name = settings.mlflow.policy_model_name
    return [{"ablation": promote.ABLATION, "variant": f"{variant}:v{version}", "model_version": f"models:/{name}/{version}",
             "split": "val", "example_id": r.example_id, "task": r.task, "reward_kind": "embedding", "judge_score": float(r.judge_score)}
            for (variant, version), scores in scored.items() for r in scores.itertuples()]


def _store_scores(spark, settings, scored: dict) -> None:
    write_rows(spark, settings, "eval_scores", _score_rows(settings, scored), slice_={"ablation": promote.ABLATION})


def _aliases(name):
    return {alias: str(v) for alias, v in MlflowClient().get_registered_model(name).aliases.items()}


def _promotion_rows(spark, settings, name):
    return catalog.read(spark, settings, "promotions").where(f"model_name = '{name}'").orderBy("created_at").collect()


def test_first_promotion_must_beat_the_best_baseline(spark, tmp_path):
    name = "policy-first"
    s, source = _home(tmp_path, name)
    sft, pg = _register(s, source, "sft", 0), _register(s, source, "rest_pg", 1)
    _store_scores(spark, s, {("sft", sft): _scores(0.50, 0.05), ("rest_pg", pg): _scores(0.40, 0.05)})

    result = promote.run(spark, s, run_id="f1")  # no candidate given: the final rest_pg policy
    assert result["candidate_version"] == pg and result["candidate_variant"] == "rest_pg"
    assert result["decision"] == "rejected" and result["moved"] == [] and _aliases(name) == {}
    assert result["baseline_variant"] == "sft" and result["baseline_version"] == sft
    [row] = _promotion_rows(spark, s, name)
    assert (row.decision, row.baseline_variant, row.baseline_version, row.champion_version) == ("rejected", "sft", sft, None)
    assert row.baseline_score == pytest.approx(promote.macro_judge_score(_scores(0.50, 0.05)))
    assert "below baseline sft" in row.reason
    assert MlflowClient().get_model_version(name, pg).tags["promotion_decision"] == "rejected"


def test_promotion_lifecycle(spark, tmp_path):
    name = "policy-lifecycle"
    s, source = _home(tmp_path, name)
    sft = _register(s, source, "sft", 0)
    v1, v2, v3, v4 = (_register(s, source, "rest_pg", 1) for _ in range(4))
    _store_scores(spark, s, {("sft", sft): _scores(0.30, 0.05), ("rest_pg", v1): _scores(0.50, 0.05),
                             ("rest_pg", v2): _scores(0.62, 0.05), ("rest_pg", v3): _scores(0.45, 0.05),
                             ("rest_pg", v4): _scores(0.20, 0.05)})

    first = promote.run(spark, s, run_id="r1", candidate=v1)
    assert (first["candidate_version"], first["decision"], first["moved"]) == (v1, "champion", ["champion"])
    assert first["champion_version"] is None and first["baseline_variant"] == "sft"
    assert _aliases(name) == {"champion": v1}
    tags = MlflowClient().get_model_version(name, v1).tags
    assert tags["promotion_decision"] == "champion" and tags["promotion_champion_version"] == ""
    assert float(tags["promotion_baseline_score"]) == pytest.approx(first["baseline_score"])

    better = promote.run(spark, s, run_id="r2", candidate=v2)
    assert better["decision"] == "champion" and better["champion_version"] == v1 and better["n_paired"] == 12
    assert better["p_value"] < 0.05 and better["candidate_score"] > better["champion_score"]
    assert _aliases(name) == {"champion": v2}

    worse = promote.run(spark, s, run_id="r3", candidate=v3)
    assert worse["decision"] == "challenger" and _aliases(name) == {"champion": v2, "challenger": v3}

    loser = promote.run(spark, s, run_id="r4", candidate=v4)  # below the sft baseline: no alias at all
    assert loser["decision"] == "rejected" and _aliases(name) == {"champion": v2, "challenger": v3}

    again = promote.run(spark, s, run_id="r5", candidate=v2)
    assert again["decision"] == "champion" and again["reason"] == "already champion" and again["moved"] == []
    final = promote.run(spark, s, run_id="r6", candidate="final:rest_pg", dry_run=True)  # the newest: v4
    assert final["candidate_version"] == v4 and final["decision"] == "rejected"

    rows = _promotion_rows(spark, s, name)
    assert [(r.candidate_version, r.champion_version, r.decision, r.run_id) for r in rows] == [
        (v1, None, "champion", "r1"), (v2, v1, "champion", "r2"), (v3, v2, "challenger", "r3"),
        (v4, v2, "rejected", "r4"), (v2, v2, "champion", "r5"), (v4, v2, "rejected", "r6")]
    assert all(r.split == "val" and isinstance(r.created_at, dt.datetime) and r.candidate_variant == "rest_pg" for r in rows)
    assert [r.dry_run for r in rows] == [False] * 5 + [True]
    assert rows[1].p_value == pytest.approx(better["p_value"]) and rows[1].n_paired == 12
    assert not catalog.exists(spark, s, "eval_predictions"), "stored validation scores are reused, never regenerated"


def test_dry_run_moves_nothing(spark, tmp_path):
    name = "policy-dry"
    s, source = _home(tmp_path, name, "promote.dry_run=true")
    v1, v2 = _register(s, source, "rest_pg", 1), _register(s, source, "rest_pg", 1)
    _store_scores(spark, s, {("rest_pg", v1): _scores(0.50, 0.05), ("rest_pg", v2): _scores(0.70, 0.05)})
    promote.run(spark, s, run_id="d1", candidate=v1, dry_run=False)
    assert _aliases(name) == {"champion": v1}

    result = promote.run(spark, s, run_id="d2")  # dry run from the profile; candidate: the final rest_pg, v2
    assert result["candidate_version"] == v2 and result["decision"] == "champion"
    assert result["dry_run"] and result["moved"] == [] and _aliases(name) == {"champion": v1}
    assert "promotion_decision" not in MlflowClient().get_model_version(name, v2).tags
    rows = {r.run_id: r for r in _promotion_rows(spark, s, name)}
    assert rows["d2"].dry_run and rows["d2"].decision == "champion" and rows["d2"].champion_version == v1
    assert not rows["d1"].dry_run


@pytest.mark.parametrize("candidate, error", [("final:rest_em", LookupError), ("champion", ValueError)])
def test_unknown_candidates_fail_early(spark, tmp_path, candidate, error):
    s, source = _home(tmp_path, "policy-unknown")
    _register(s, source, "rest_pg", 1)
    with pytest.raises(error):
        promote.run(spark, s, run_id="u1", candidate=candidate)


# --- the stage scoring what has no validation scores yet ----------------------------------------------

VAL = ["ex-v1", "ex-v2"]


@pytest.mark.e2e  # promote → evaluate → the policy's decoding: not run again on the compat runtime (make test-compat)
def test_promote_scores_candidate_and_champion_itself(spark, tiny, tmp_path):
    """The scheduled path's bug: a champion exists and nothing wrote validation scores (evaluate scores
    the test split). Promotion must score both on the validation split itself, not compare nothing."""
    name = "policy-scored"
    s = make_settings(tmp_path / "home", *tiny_overrides(tiny), "prompt.max_reasoning_tokens=4", "prompt.max_response_tokens=6",
                      f"mlflow.policy_model_name={name}",
                      "loop.variants=[sft, rest_pg]")
    write_rows(spark, s, "examples", [example_row(e, "u1", split="val") for e in VAL] + [example_row("ex-t", "u1", split="test")])
    write_rows(spark, s, "retrievals", [
        {"example_id": e, "retriever": s.models.retriever, "k": 1,
         "items": [{"rank": 1, "item_id": f"{e}-p0", "score": 0.9, "text": "u1 wrote a review of tea and kettles."}]}
        for e in VAL])
    setup_mlflow(s)
    with mlflow.start_run(run_name="tiny-policy"):
        source = mlflow.pyfunc.log_model(name="policy", python_model=Echo(), artifacts={"checkpoint": tiny},
                                         pip_requirements=[]).model_uri
    sft, champion, candidate = (_register(s, source, "sft", 0), _register(s, source, "rest_pg", 1),
                                _register(s, source, "rest_pg", 1))
    MlflowClient().set_registered_model_alias(name, "champion", champion)
    # the sft baseline was scored by an earlier promotion: reused; candidate and champion have nothing on val
    # and evaluate scored candidate and champion on the test split only
    stored = _score_rows(s, {("sft", sft): pd.DataFrame({"example_id": VAL, "task": "product_review", "judge_score": 0.0})})
    test_scores = [{"ablation": "", "variant": "rest_pg", "model_version": f"models:/{name}/{v}", "split": "test",
                    "example_id": "ex-t", "task": "product_review", "judge_score": 0.9} for v in (champion, candidate)]
    write_rows(spark, s, "eval_scores", stored + test_scores)

    result = promote.run(spark, s, run_id="p1")
    assert result["candidate_version"] == candidate and result["champion_version"] == champion
    assert result["n_paired"] == len(VAL) and result["champion_score"] is not None
    assert result["baseline_variant"] == "sft" and result["baseline_n_paired"] == len(VAL)

    scored = catalog.read_slice(spark, s, "eval_scores", {"ablation": promote.ABLATION, "split": "val"}).toPandas()
    by_version = scored.groupby("model_version").example_id.apply(sorted).to_dict()
    assert by_version == {f"models:/{name}/{v}": VAL for v in (sft, champion, candidate)}
    preds = catalog.read_slice(spark, s, "eval_predictions", {"ablation": promote.ABLATION}).toPandas()
    assert set(preds.variant) == {f"rest_pg:v{champion}", f"rest_pg:v{candidate}"}  # sft's scores were reused

    # the decision is `decide` on exactly those scores
    frame = lambda v: scored[scored.model_version == f"models:/{name}/{v}"][["example_id", "task", "judge_score"]]  # noqa: E731
    expected = promote.decide(frame(candidate), frame(champion), {"sft": frame(sft)}, s.promote.alpha)
    assert (result["decision"], result["reason"]) == (expected["decision"], expected["reason"])

    before = catalog.version(spark, s, "eval_predictions")
    again = promote.run(spark, s, run_id="p2", dry_run=True)
    assert catalog.version(spark, s, "eval_predictions") == before, "a version scored once is not scored again"
    assert again["decision"] == result["decision"] and again["candidate_score"] == result["candidate_score"]
