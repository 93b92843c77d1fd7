"""`restpg pipeline` end to end on a tiny random model: every table written, lineage on every stage's
run, a re-run that changes nothing, and a reasoning variant's malformed outputs never reaching its
training set. (`make run` is the same pipeline with the packaged models.)"""
from __future__ import annotations

import pytest

from helpers import tiny_overrides
from restpg import catalog, cli, filtering, prompts
from restpg.config import load_settings

pytestmark = pytest.mark.e2e
M = 3


@pytest.fixture(scope="module")
def run(spark, tiny, tmp_path_factory):
    s = load_settings("local", tiny_overrides(tiny, m=M), home=str(tmp_path_factory.mktemp("e2e-home")))
    result = cli.run_stage("pipeline", spark, s, variants=["sft", "rest_em"], force=[])
    return s, result


def test_every_stage_wrote_its_tables(spark, run):
    s, result = run
    inputs = catalog.read(spark, s, "examples").where("split = 'train'").count()
    for variant in ("rest_em",):
        slice_ = {"variant": variant, "iteration": 1}
        traj = catalog.read_slice(spark, s, "trajectories", slice_)
        assert traj.count() == inputs * M == traj.select("example_id", "sample_index").distinct().count()
        assert traj.select("policy_version").distinct().count() == 1
        scores = catalog.read_slice(spark, s, "judge_scores", slice_).toPandas()
        assert len(scores) == inputs * M
        assert (scores.loc[~scores["format_ok"], "reward"] == 0).all()
        kept = catalog.read_slice(spark, s, "training_sets", slice_).toPandas()
        ok = scores.set_index(["example_id", "sample_index"])["format_ok"]
        assert all(ok[(r.example_id, r.sample_index)] for r in kept.itertuples())  # never a malformed output
    summary = catalog.read(spark, s, "eval_summary").where("ablation = '' AND task = 'macro'")
    assert {r.variant for r in summary.collect()} == {"sft", "rest_em"}
    assert catalog.read(spark, s, "promotions").count() == 1
    assert catalog.read(spark, s, "reward_validation").count() > 0
    done = {r.stage for r in catalog.read(spark, s, "stage_runs").collect()}
    assert done >= {"ingest", "retrieve", "sft_data", "train", "validate_reward", "sample", "judge",
                    "filtering", "evaluate", "promote", "notebooks"}
    assert "reason" not in done  # no reasoning variant asked for: no teacher work
    mem = result["memory"]  # what bench/bench_memory.py reads from the run's result file
    assert list(mem["after_train_bytes"]) == ["train [variant=sft/iteration=0]", "train [variant=rest_em/iteration=1]"]
    assert mem["peak_bytes"] >= max(mem["after_train_bytes"].values()) > 0


def test_every_stage_run_logs_the_versions_it_read_and_wrote(run):
    import mlflow

    s, _ = run
    runs = mlflow.search_runs(experiment_names=[s.mlflow.experiment], output_format="list")
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("mlflow.runName", "").split(" ")[0], r)
    for stage, wrote, read in (("judge", "judge_scores", "trajectories"), ("filtering", "training_sets", "judge_scores"),
                               ("sample", "trajectories", "examples"), ("evaluate", "eval_scores", "examples")):
        tags = by_stage[stage].data.tags
        assert f"table.{wrote}.version" in tags, f"{stage} did not log the version of {wrote}"
        assert f"table.{read}.read_version" in tags, f"{stage} did not log the version of {read} it read"


def test_a_second_run_skips_every_stage_and_changes_nothing(spark, run):
    s, _ = run
    tables = ("trajectories", "judge_scores", "training_sets", "eval_scores", "promotions")
    before = {t: catalog.version(spark, s, t) for t in tables}
    cli.run_stage("pipeline", spark, s, variants=["sft", "rest_em"], force=[])
    assert {t: catalog.version(spark, s, t) for t in tables} == before


def test_a_reasoning_variant_never_trains_on_malformed_outputs(spark, run):
    """A random policy rarely writes the separator or stops: the decoder forces the separator at the
    reasoning budget (recorded as reasoning_forced), and such an output, like one that runs into the response
    cap, has an empty part or a second separator, is judged format_ok = false with reward 0; the filter keeps
    none of them, even at tau = -1. When no output is well-formed the filter keeps nothing, says why and
    leaves no training set behind, so the M-step fails clearly instead of training on it."""
    s, _ = run
    slice_ = {"variant": "rest_pg", "iteration": 1}
    keys = ["example_id", "sample_index"]
    cli.run_stage("reason", spark, s)
    cli.run_stage("sft_data", spark, s, variants=["sft_reasoning"])
    cli.run_stage("train", spark, s, variant="sft_reasoning", iteration=0)
    for stage in ("sample", "judge"):
        cli.run_stage(stage, spark, s, **slice_)
    traj = catalog.read_slice(spark, s, "trajectories", slice_).toPandas().set_index(keys)
    assert traj["reasoning_forced"].any()  # a random policy needs the forced separator
    scores = catalog.read_slice(spark, s, "judge_scores", slice_).toPandas().set_index(keys)
    bad = scores[~scores["format_ok"]]
    assert len(bad) > 0 and (bad["reward"] == 0).all()  # a random policy also writes malformed outputs
    assert set(bad["format_issue"]) <= set(prompts.FORMAT_ISSUES) - {prompts.NO_SEPARATOR}  # the decoder always writes one
    forced = traj.index[traj["reasoning_forced"].astype(bool)]
    assert (scores.loc[forced, "format_issue"] == prompts.FORCED_SEPARATOR).all() and (scores.loc[forced, "reward"] == 0).all()
    well_formed = scores[scores["format_ok"]]
    assert not traj.loc[well_formed.index, "reasoning_forced"].astype(bool).any()
    if well_formed.empty:
        with pytest.raises(filtering.NothingPassed, match="none well-formed: .*forced_separator="):
            cli.run_stage("filtering", spark, s, **slice_)
    else:
        cli.run_stage("filtering", spark, s, **slice_)
    kept = catalog.read_slice(spark, s, "training_sets", slice_).toPandas()
    # tau = -1 keeps every well-formed output, at most max_kept_per_input per input, and nothing else
    cap = s.filter.max_kept_per_input
    assert len(kept) == sum(min(cap, n) for n in well_formed.groupby("example_id").size())
    assert all(scores.loc[(r.example_id, r.sample_index), "format_ok"] for r in kept.itertuples())
    assert not any(traj.loc[(r.example_id, r.sample_index), "reasoning_forced"] for r in kept.itertuples())


def test_pat_runs_its_own_start_and_em_loop_in_the_pipeline(spark, run):
    """`--variants pat`: user profiles, peers' cues and PAT's dual-reasoning SFT start come before its EM
    iteration, sft_data is not asked for an EM variant, and PAT's policy samples in PAT's own template. The
    tiny random policy never ends its reasoning itself, so every sample's separator is the decoder's
    (forced_separator): its E-step keeps nothing and the run stops at the filter, saying why, before an
    M-step could train on cut reasoning."""
    s, _ = run
    with pytest.raises(filtering.NothingPassed, match="forced_separator"):
        cli.run_stage("pipeline", spark, s, variants=["pat"], force=[])
    done = {(r.stage, r.slice) for r in catalog.read(spark, s, "stage_runs").collect()}
    assert {("user_profiles", ""), ("peer_retrieve", ""), ("pat_sft", ""), ("train", "variant=pat/iteration=0"),
            ("sample", "variant=pat/iteration=1"), ("judge", "variant=pat/iteration=1")} <= done
    assert ("train", "variant=pat/iteration=1") not in done
    sets = catalog.read(spark, s, "training_sets").where("variant = 'pat'").toPandas()
    assert set(sets.iteration) == {0} and set(sets.source) == {"gold"}
    assert sets.template_version.str.startswith("policy_pat").all()
    # (one demo user per task here, so no peers: tests/test_peer_retrieve.py checks the cues themselves)
    assert catalog.exists(spark, s, "user_profiles") and catalog.exists(spark, s, "peer_retrievals")
    traj = catalog.read_slice(spark, s, "trajectories", {"variant": "pat", "iteration": 1}).toPandas()
    assert len(traj) > 0 and traj["template_version"].str.startswith("policy_pat").all()
    scores = catalog.read_slice(spark, s, "judge_scores", {"variant": "pat", "iteration": 1}).toPandas()
    assert len(scores) == len(traj) and set(scores["format_issue"]) == {prompts.FORCED_SEPARATOR}
