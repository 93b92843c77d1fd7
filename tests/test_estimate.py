"""`restpg estimate`: the work of a run counted from the profile and its data, timed at bench rates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import example_row, make_settings, write_rows

from restpg import estimate


def _counts(train: int = 10, val: int = 4, test: int = 3) -> estimate.DataCounts:
    return estimate.DataCounts(train, {"train": train, "val": val, "test": test}, 50)


def _settings(tmp_path, *extra: str):
    return make_settings(tmp_path, "sample.m=8", "loop.iterations=2", "loop.variants=[sft, sft_reasoning, rest_em, rest_pg]",
                         "prompt.max_input_tokens=300", "prompt.max_reasoning_tokens=40", "prompt.max_response_tokens=60",
                         "train.steps=10", "train.batch_size=4", "train.eval_every=4", "train.selection_examples=5", *extra)


def test_counts_of_dedupes_profile_items_per_user_and_caps_training_inputs():
    items = [{"item_id": "a", "text": "x"}, {"item_id": "b", "text": "y"}]
    records = [{"split": "train", "input": "q1", "user_id": "u1", "profile": items},
               {"split": "train", "input": "q2", "user_id": "u1", "profile": items},
               {"split": "test", "input": "q3", "user_id": "u2", "profile": items[:1]}]
    counts = estimate.counts_of(records)
    assert counts.embed_texts == 2 + 1 + 3  # u1's two items once, u2's item, three inputs
    assert counts.split_inputs == {"train": 2, "test": 1} and counts.train_inputs == 2
    assert estimate.counts_of(records, max_examples=1).train_inputs == 1


def test_e_step_work_is_inputs_times_m_times_the_variants_cap(tmp_path):
    settings = _settings(tmp_path)
    work = estimate.plan(settings, _counts())
    samples = [w for w in work if w.stage == "sample"]
    assert [(w.iteration, w.variant) for w in samples] == [(1, "rest_em"), (1, "rest_pg"), (2, "rest_em"), (2, "rest_pg")]
    by_variant = {w.variant: w for w in samples if w.iteration == 1}
    assert by_variant["rest_em"].generated_tokens == 10 * 8 * 60
    assert by_variant["rest_pg"].generated_tokens == 10 * 8 * estimate.cap(settings, "rest_pg")
    assert estimate.cap(settings, "rest_pg") > 40 + 60 - 1  # reasoning, separator and response
    judges = [w for w in work if w.stage == "judge"]
    assert all(w.judge_passes == 80 and w.generated_tokens == 0 for w in judges)


def test_training_jobs_count_steps_batches_and_selections(tmp_path):
    settings = _settings(tmp_path)
    trains = [w for w in estimate.plan(settings, _counts()) if w.stage == "train"]
    assert [(w.iteration, w.variant) for w in trains] == [
        (0, "sft"), (0, "sft_reasoning"), (1, "rest_em"), (1, "rest_pg"), (2, "rest_em"), (2, "rest_pg")]
    sft = trains[0]
    assert sft.train_tokens == 10 * 4 * (300 + 60)
    # selections at steps 0, 4, 8 and the last step 10, five examples each
    assert sft.generated_outputs == 4 * 5 and sft.judge_passes == 20 and sft.generated_tokens == 20 * 60


def test_reasoning_is_planned_only_when_a_variant_reasons(tmp_path):
    plain = estimate.plan(_settings(tmp_path, "loop.variants=[sft, rest_em]"), _counts())
    assert "reason" not in {w.stage for w in plain}
    assert {w.variant for w in plain if w.stage == "train"} == {"sft", "rest_em"}
    reasoning = estimate.plan(_settings(tmp_path, "loop.variants=[rest_pg]", "models.teacher=packaged:gemma3-270m"), _counts())
    (reason,) = [w for w in reasoning if w.stage == "reason"]
    assert (reason.generated_tokens, reason.generated_outputs) == (10 * 40, 10)
    extractive = estimate.plan(_settings(tmp_path, "loop.variants=[rest_pg]", "models.teacher=extractive"), _counts())
    (reason,) = [w for w in extractive if w.stage == "reason"]
    assert (reason.generated_tokens, reason.generated_outputs) == (0, 0)  # slots written without a model
    assert {w.variant for w in reasoning if w.stage == "train"} == {"sft_reasoning", "rest_pg"}


def test_seconds_add_each_kind_of_work_at_its_rate_and_are_unknown_without_one():
    w = estimate.Work("train", 1, "rest_pg", generated_tokens=1000, judge_passes=10, train_tokens=4000)
    rates = {"generate_tokens_per_s": 100.0, "judge_outputs_per_s": 5.0, "train_tokens_per_s": 400.0}
    assert estimate.seconds(w, rates) == pytest.approx(10 + 2 + 10)
    assert estimate.seconds(w, {k: v for k, v in rates.items() if k != "judge_outputs_per_s"}) is None
    sampled = estimate.Work("sample", 1, "rest_pg", generated_tokens=1000, sampled=True)
    assert estimate.seconds(sampled, {"sample_tokens_per_s": 250.0}) == pytest.approx(4)


def test_batched_single_output_generation_is_timed_at_its_rows_up_to_the_samplers_rate(tmp_path):
    """Evaluation, selection and validation decode a batch of prompts at once: 16 rows make 16 times the
    one-row rate, never more than the measured full-batch sampler. At the demo's sizes the old one-row
    timing put evaluation at 542 s against 134 s measured (whole run: 1.14 h estimated, 0.50 h measured)."""
    rates = {"generate_tokens_per_s": 10.0, "sample_tokens_per_s": 120.0}
    assert estimate.seconds(estimate.Work("evaluate", None, "sft", generated_tokens=1200), rates) == pytest.approx(120)
    assert estimate.seconds(estimate.Work("evaluate", None, "sft", generated_tokens=1200, rows=4), rates) == pytest.approx(30)
    assert estimate.seconds(estimate.Work("evaluate", None, "sft", generated_tokens=1200, rows=64), rates) == pytest.approx(10)
    assert estimate.seconds(estimate.Work("evaluate", None, "sft", generated_tokens=1200, rows=64),
                            {"generate_tokens_per_s": 10.0}) == pytest.approx(120)  # no sampler rate: one row's
    work = {w.stage: w for w in estimate.plan(_settings(tmp_path), _counts())}
    assert work["evaluate"].rows == min(_counts().split_inputs["test"], estimate.INFERENCE_ROWS)
    assert work["train"].rows == min(_settings(tmp_path).train.selection_examples, estimate.INFERENCE_ROWS)


def test_table_and_totals_at_rates_from_a_bench_file(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"machine": {"name": "box"}, "model": "m", "rates": {
        "generate_tokens_per_s": 50, "sample_tokens_per_s": 200, "judge_outputs_per_s": 4, "train_tokens_per_s": 100,
        "embed_texts_per_s": 20, "unrelated": 1}}))
    rates, source = estimate.load_rates(path)
    assert set(rates) == set(estimate.RATE_KEYS) and "box" in source
    work = estimate.plan(_settings(tmp_path), _counts())
    totals = estimate.totals(work, rates)
    assert totals["hours"] == pytest.approx(sum(estimate.seconds(w, rates) for w in work) / 3600, abs=1e-3)
    assert 0 < totals["hours_per_em_iteration"] < totals["hours"]
    text = estimate.table(work, rates)
    assert "n/a" not in text and "per EM iteration" in text
    assert "n/a" in estimate.table(work, {})


def test_the_rates_come_from_the_newest_bench_result_that_has_them(tmp_path):
    """Other benchmarks (bench_continuous) write their own JSON into bench/results: a newer one of those is
    not where `make bench`'s rates are."""
    import os

    rated, other = tmp_path / "cpu.json", tmp_path / "continuous-cpu.json"
    rated.write_text(json.dumps({"rates": {"sample_tokens_per_s": 200}}))
    other.write_text(json.dumps({"mixed": {"rounds": []}}))
    os.utime(rated, (1, 1))
    assert estimate.latest_bench(tmp_path) == rated
    assert estimate.latest_bench(tmp_path / "none") is None


def test_run_counts_the_examples_table(spark, tmp_path, capsys):
    settings = _settings(tmp_path)
    rows = [example_row(f"e{i}", f"u{i % 2}", split="train") for i in range(5)] + [example_row("t0", "u0", split="test")]
    write_rows(spark, settings, "examples", rows)
    out = estimate.run(spark, settings, run_id="test", bench=None)
    assert out["train_inputs"] == 5 and out["splits"] == {"train": 5, "test": 1}
    assert out["embedded_texts"] == 2 * 3 + 6  # three items per user, six inputs
    assert out["generated_tokens"] > 0 and "sample" in capsys.readouterr().out


@pytest.mark.spark
def test_databricks_profile_is_estimated_with_no_workspace_or_credentials(tmp_path):
    """Sizing a Databricks run before there is a workspace: no tracking store, no credentials, no catalog."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABRICKS_", "MLFLOW_"))}
    env["DATABRICKS_CONFIG_FILE"] = str(tmp_path / "none.databrickscfg")
    home = tmp_path / "home"
    restpg = Path(sys.executable).with_name("restpg")
    out = subprocess.run([str(restpg), "estimate", "--profile", "databricks", "--home", str(home)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["stage", "t", "variant"] and "per EM iteration" in out.stdout
    assert {line.split()[0] for line in lines[2:-4]} >= {"retrieve", "reason", "train", "sample", "judge", "evaluate", "promote"}
    assert "Traceback" not in out.stderr and "no catalog 'main'" in out.stderr
    assert "GPU memory per role" in out.stdout and any(line.startswith("teacher   google/gemma-7b-it") for line in lines)
    [result] = (home / "results").glob("estimate-*.json")
    assert json.loads(result.read_text())["iterations"] == 3 and lines[-1] == f"result: {result}"
    assert not (home / "mlflow.db").exists() and not (home / "mlruns").exists()


def test_gpu_memory_per_role_at_the_databricks_profiles_sizes(tmp_path):
    """The arithmetic on the published dims of the profile's models (gemma-2b policy, gemma-7b-it teacher and judge)."""
    from restpg import prompts

    settings = make_settings(tmp_path / "home", profile="databricks")
    roles = {r["role"]: r for r in estimate.gpu_memory(settings)}
    assert list(roles) == ["sampling", "teacher", "judge", "training"]
    gib, vocab, output = 2**30, 256_000, 512 + prompts.SEPARATOR_ALLOWANCE + 1536  # rest_pg's cap: the longest
    policy, teacher = 2_506_172_416, 8_537_680_896  # parameters of gemma-2b and gemma-7b(-it)

    sampling = roles["sampling"]
    kv = 2 * 18 * 1 * 256 * 2  # layers x kv heads (MQA) x head dim, keys and values, bf16
    assert (sampling["tokens_per_row"], sampling["rows"]) == (5120 + output, 64)
    assert sampling["weights"] == policy * 2 and sampling["kv_per_token"] == kv
    assert sampling["batch"] == 64 * (kv * (5120 + output) + vocab * 4)
    assert sampling["total"] == policy * 2 + sampling["batch"]

    for role, tokens in (("teacher", 7680 + 512), ("judge", 4096 + 8)):
        r = roles[role]
        kv = 2 * 28 * 16 * 256 * 2  # 448 KiB a token: gemma-7b keeps every head's keys and values
        assert r["kv_per_token"] == kv and r["tokens_per_row"] == tokens and r["weights"] == teacher * 2
        assert r["rows_fit"][80] == int((0.9 * 80 * gib - teacher * 2) // (kv * tokens + vocab * 4))
    assert roles["teacher"]["rows_fit"] == {24: 1, 40: 5, 80: 16}  # nowhere near 64 rows of 8k tokens

    training = roles["training"]["parts"]
    tokens = 8 * (5120 + output)  # micro-batch 8
    assert training["weights"] == training["gradients"] == 4 * policy
    assert training["optimizer"] < 0.01 * training["weights"]  # adafactor's factored second moments
    assert training["logits"] == 8 * (output + 1) * vocab * 10  # the completion window only
    assert training["activations"] == 34 * 2048 * tokens * 18
    checkpointed = estimate.gpu_memory(make_settings(tmp_path / "home", "train.gradient_checkpointing=true",
                                                     profile="databricks"))[-1]["parts"]
    assert checkpointed["activations"] == 2 * 2048 * tokens * 18 + 34 * 2048 * tokens  # one layer recomputed at a time
    assert "teacher   google/gemma-7b-it" in estimate.memory_table(estimate.gpu_memory(settings))
