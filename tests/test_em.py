"""The EM loop end to end on a tiny model: row counts, resumable sampling after a real kill,
determinism, filtering rules, and both rewards."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from restpg import catalog, filtering, judge, pipeline, sample
from restpg.config import load_settings

M, CAP = 3, 2


def tiny_overrides(tiny: str) -> list[str]:
    return [f"models.policy={tiny}", f"models.teacher={tiny}", f"models.judge={tiny}",
            "data.demo_users=1", "data.demo_profile_items=3", "loop.iterations=1", f"sample.m={M}",
            "sample.max_new_tokens=6", "reason.max_new_tokens=6", "evaluate.max_new_tokens=6", "sample.chunk_examples=1",
            "prompt.max_input_tokens=200", "train.max_input_tokens=200", "train.max_output_tokens=64", "train.max_steps=2",
            "train.device=cpu", "train.length_buckets=[128, 256, 320]", "filter.tau=-1.0", f"filter.max_kept_per_input={CAP}"]


@pytest.fixture(scope="module")
def em(spark, tiny, tmp_path_factory):
    """`restpg run` for rest_em and rest_pg (T=1) — it also runs the SFT variants they start from."""
    home = tmp_path_factory.mktemp("em-home")
    s = load_settings("local", tiny_overrides(tiny), home=str(home))
    result = pipeline.run(spark, s, variants=["sft", "sft_reasoning", "rest_em", "rest_pg"])
    return s, result


def test_loop_tables_have_expected_counts(spark, em):
    s, result = em
    inputs = catalog.read(spark, s, "examples").where("split = 'train'").count()
    for variant in ("rest_em", "rest_pg"):
        traj = catalog.read(spark, s, "trajectories").where(f"variant = '{variant}' AND iteration = 1")
        assert traj.count() == inputs * M
        assert traj.select("example_id", "sample_index").distinct().count() == inputs * M
        kept = catalog.read(spark, s, "training_sets").where(f"variant = '{variant}' AND iteration = 1").toPandas()
        assert 0 < len(kept) and kept.groupby("example_id").size().max() <= CAP
        scores = catalog.read(spark, s, "judge_scores").where(f"variant = '{variant}' AND iteration = 1").toPandas()
        merged = kept.merge(scores, on=["example_id", "sample_index"])
        assert len(merged) == len(kept) and (merged["weight"] == merged["reward"]).all()
        raw = traj.toPandas().set_index(["example_id", "sample_index"])["raw_text"]
        assert all(raw[(r.example_id, r.sample_index)] == r.completion for r in kept.itertuples())
    rest_pg = catalog.read(spark, s, "trajectories").where("variant = 'rest_pg'").toPandas()
    # reasoning variants split at the separator; a sample without it keeps the raw text as its response
    no_sep = rest_pg[~rest_pg["has_separator"]]
    assert (no_sep["response"] == no_sep["raw_text"].str.strip()).all() and no_sep["reasoning"].isna().all()
    summary = catalog.read(spark, s, "eval_summary").where("ablation = '' AND task = 'macro' AND metric = 'judge_score'")
    assert {r.variant for r in summary.collect()} == {"sft", "sft_reasoning", "rest_em", "rest_pg"}
    assert any(label.startswith("promote") for label in result["results"])


def test_rerun_skips_complete_stages_and_keeps_rows(spark, em, capsys):
    s, _ = em
    before = {t: catalog.read(spark, s, t).count() for t in ("trajectories", "judge_scores", "training_sets", "eval_scores")}
    pipeline.run(spark, s, variants=["sft", "sft_reasoning", "rest_em", "rest_pg"])
    err = capsys.readouterr().err
    assert "skip sample [variant=rest_pg/iteration=1]" in err and "skip train [variant=sft/iteration=0]" in err
    assert {t: catalog.read(spark, s, t).count() for t in before} == before


def test_sampling_is_deterministic(spark, em):
    s, _ = em
    first = catalog.read(spark, s, "trajectories").where("variant = 'rest_em' AND iteration = 1").toPandas()
    sample.run(spark, s, "rest_em", 1, force=True, run_id="again")
    second = catalog.read(spark, s, "trajectories").where("variant = 'rest_em' AND iteration = 1").toPandas()
    key = ["example_id", "sample_index"]
    a, b = first.sort_values(key).reset_index(drop=True), second.sort_values(key).reset_index(drop=True)
    assert (a[key + ["seed", "raw_text"]] == b[key + ["seed", "raw_text"]]).all().all()
    assert set(b["run_id"]) == {"again"}


def _delta_commits(path: str) -> int:
    return len(list(Path(path, "_delta_log").glob("*.json")))


def test_sampling_resumes_after_a_kill(spark, em):
    """A real `restpg sample` process is killed after its first committed chunk; the rerun fills in."""
    s, _ = em
    variant, iteration = "rest_pg", 7  # a slice of its own, sampled by the iteration-1 policy
    policy = catalog.read(spark, s, "trajectories").where("variant = 'rest_pg'").select("policy_version").first()[0]
    path = catalog.ref(s, "trajectories").path
    commits = _delta_commits(path)
    cmd = [sys.executable, "-m", "restpg.cli", "sample", "--home", str(s.home_dir), "--variant", variant,
           "--iteration", str(iteration), "--model", policy] + [a for o in tiny_overrides(s.models.policy) for a in ("--set", o)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _delta_commits(path) <= commits and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    slice_ = f"variant = '{variant}' AND iteration = {iteration}"
    partial = catalog.read(spark, s, "trajectories").where(slice_).count()
    inputs = catalog.read(spark, s, "examples").where("split = 'train'").count()
    assert 0 < partial < inputs * M, "the kill should land after the first chunk and before the last"
    report = sample.run(spark, s, variant, iteration, policy=policy, run_id="resume")
    assert report["sampled_examples"] == inputs - partial // M
    rows = catalog.read(spark, s, "trajectories").where(slice_).toPandas()
    assert len(rows) == inputs * M
    assert not rows.duplicated(["example_id", "sample_index"]).any()


def test_llm_judge_stores_all_criteria(spark, em):
    s, _ = em
    llm = load_settings("local", tiny_overrides(s.models.policy) + ["judge.reward=llm"], home=str(s.home_dir))
    report = judge.run(spark, llm, "rest_em", 1, run_id="llm")
    assert report["reward_kind"] == "llm"
    rows = catalog.read(spark, llm, "judge_scores").where("reward_kind = 'llm'").toPandas()
    assert len(rows) == catalog.read(spark, s, "trajectories").where("variant = 'rest_em' AND iteration = 1").count()
    for r in rows.itertuples():
        lp = dict(r.criterion_logprobs)
        assert set(lp) == {"1", "3", "5", "7", "10"}
        assert r.score == judge.pick_score(lp, [1, 3, 5, 7, 10]) and r.reward == r.score / 10
    # embedding rows of the same slice are untouched: rewards are keyed by their kind
    assert catalog.read(spark, s, "judge_scores").where("reward_kind = 'embedding' AND variant = 'rest_em'").count() == len(rows)


@pytest.mark.parametrize("rewards, tau, cap, kept", [
    ([0.9, 0.8, 0.7, 0.2], 0.5, 10, [0, 1, 2]),
    ([0.9, 0.8, 0.7, 0.2], 0.5, 2, [0, 1]),
    ([0.5, 0.5, 0.5], 0.5, 2, [0, 1]),          # ties: lower sample index first; reward == tau passes
    ([0.4, 0.1], 0.5, 10, []),
])
def test_keep_high_reward(spark, rewards, tau, cap, kept):
    df = spark.createDataFrame([("e", i, r) for i, r in enumerate(rewards)], "example_id string, sample_index int, reward double")
    got = sorted(r.sample_index for r in filtering.keep_high_reward(df, tau, cap).collect())
    assert got == kept


def test_nothing_passing_fails_with_the_distribution(spark, em):
    s, _ = em
    strict = load_settings("local", tiny_overrides(s.models.policy) + ["filter.tau=2.0"], home=str(s.home_dir))
    with pytest.raises(filtering.NothingPassed, match=r"tau=2.0 .*min/25%/50%/75%/90%/max"):
        filtering.run(spark, strict, "rest_em", 1)


def test_embedding_reward_prefers_the_users_own_writing(spark, fresh_settings, amazon_path):
    recs = [json.loads(x) for x in amazon_path.read_text().splitlines()[:120]]
    rows = []
    for i, r in enumerate(recs):
        other = recs[(i + 1) % len(recs)]
        rows.append((i, "own", r["input"], r["output"], r["profile"][0]["reviewText"]))
        rows.append((i, "other", r["input"], r["output"], other["profile"][0]["reviewText"]))
    df = spark.createDataFrame(rows, "user int, kind string, input string, target string, response string")
    scored = judge.add_rewards(spark, fresh_settings, df).toPandas().pivot(index="user", columns="kind", values="reward")
    share = float((scored["own"] > scored["other"]).mean())
    assert share > 0.6, share


def test_reward_validation_rows(spark, em):
    from restpg import validate_reward

    s, _ = em
    report = validate_reward.run(spark, s, policy=s.models.policy, split="val", limit=8, run_id="rv")
    rows = catalog.read(spark, s, "reward_validation").where("reward_kind = 'embedding'").toPandas()
    shuffle = rows[rows["check"] == "shuffle"].sort_values("setting")
    assert list(shuffle["setting"]) == ["S=0", "S=100", "S=25", "S=50", "S=75"]
    assert shuffle["slope"].notna().all() and shuffle["mean_reward"].notna().all()
    direct = rows[rows["check"] == "direct"].set_index("setting")["mean_reward"]
    assert set(direct.index) == {"self", "same_user", "other_user"}
    assert direct["self"] == pytest.approx(1.0, abs=1e-4)  # a text's cosine with itself
    assert report["fit"] == bool(rows["fit"].all())


def test_budget_ablation_lands_in_eval_summary(spark, em):
    from restpg import ablations

    s, _ = em
    ablations.run(spark, s, "budget", budgets=[1, 2], run_id="abl")
    got = {r.variant for r in catalog.read(spark, s, "eval_summary").where("ablation = 'budget' AND task = 'macro'").collect()}
    assert got == {"rest_pg:m=1", "rest_pg:m=2"}
    m1 = catalog.read(spark, s, "trajectories").where("variant = 'rest_pg:m=1'").count()
    m2 = catalog.read(spark, s, "trajectories").where("variant = 'rest_pg:m=2'").count()
    assert m2 == 2 * m1 > 0
