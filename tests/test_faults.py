"""Fault suite (issue 14): every long stage killed with SIGKILL after it committed a chunk, then run
again, ends with exactly the rows of an uninterrupted run (no duplicate, no loss, the same texts);
a corpus of malformed inputs never stops ingest; an unusable MLflow tracking store stops a stage
with one line before any work. Prints ``faults: N survived, M failed`` (tests/conftest.py); `make test-faults` runs it.

One tiny upstream home (ingest → retrieve → sft_data → SFT → E-step samples), built once per suite (under
pytest-xdist by whichever worker comes first), is copied for every case: the killed run is a real
`restpg <stage>` process (its Spark JVM and Python workers die with it), the rerun and the uninterrupted reference run in this process (for `sample`, the
upstream home's own samples are the reference).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import make_settings, tiny_overrides
from restpg import catalog, cli, demo_data

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

RESTPG = Path(sys.executable).with_name("restpg")
PROGRESS = re.compile(r": (\d+)/(\d+) \(")


def overrides(tiny: str) -> list[str]:
    """The e2e test's tiny run, one example per committed chunk in every stage, a training job long
    enough to be killed between two of its resume states."""
    return [*tiny_overrides(tiny, m=3), "sample.chunk_examples=1", "reason.chunk_examples=1", "judge.chunk_examples=1",
            "evaluate.chunk_examples=1", "spark.driver_memory=2g",
            "judge.reward=embedding", "train.steps=8", "train.eval_every=4", "train.checkpoint_every=2",
            "train.log_every=1", "mlflow.policy_model_name=faults-policy"]


@pytest.fixture(scope="module")
def upstream(spark, tiny, tmp_path_factory):
    """A home with examples, retrievals, the SFT model (registered) and rest_em's iteration-1 samples. Built once
    per suite: under pytest-xdist the first worker to get here builds it (the others wait on a file lock) and
    every worker copies it per case, with the builder's settings (its tiny model's path among them)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: the workers' common folder
    root, lock = shared / "faults-upstream", shared / "faults-upstream.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not (root / "settings.json").exists():
            shutil.rmtree(root, ignore_errors=True)  # a builder that failed halfway
            # the upstream SFT model only has to exist: two steps (the training case runs the full job itself)
            s = make_settings(root / "upstream", *overrides(tiny), "train.steps=2", "train.eval_every=2")
            source = demo_data.write(root / "demo.jsonl", users_per_task=1, profile_items=3, examples_per_user=3, seed=7)
            for stage, args in (("ingest", {"source": str(source), "task": None, "split": None}), ("retrieve", {}),
                                ("sft_data", {"variants": ["sft"]}),
                                ("train", {"variant": "sft", "iteration": 0, "init_ref": None}),
                                ("sample", {"variant": "rest_em", "iteration": 1, "policy": None})):
                cli.run_stage(stage, spark, s, **args)
            (root / "settings.json").write_text(json.dumps(overrides(tiny)))
    cases = tmp_path_factory.mktemp("faults")
    return root, cases, json.loads((root / "settings.json").read_text())


def home_copy(upstream, name: str):
    root, cases, sets = upstream
    shutil.copytree(root / "upstream", cases / name)
    return make_settings(cases / name, *sets)


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc), children first found first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_when(settings, sets: list[str], argv: list[str], ready, timeout: float = 400) -> tuple[bool, list[str]]:
    """Run `restpg <argv>` on settings' home and SIGKILL it, with every process it started (its Spark
    JVM and Python workers), as soon as `ready(stderr lines)` holds. (killed, stderr lines)."""
    cmd = [str(RESTPG), *argv, "--home", str(settings.home_dir)] + [x for o in sets for x in ("--set", o)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    deadline, killed = time.time() + timeout, False
    try:
        while proc.poll() is None and time.time() < deadline:
            if ready(list(lines)):
                for pid in [*_descendants(proc.pid), proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed = True
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        proc.wait(timeout=60)
        reader.join(timeout=10)
    return killed, lines


def committed(label: str):
    """ready(): a progress line of `label` says at least one chunk, not all, was committed."""
    def ready(lines):
        for line in lines:
            m = PROGRESS.search(line) if label in line else None
            if m and 0 < int(m.group(1)) < int(m.group(2)):
                return True
        return False
    return ready


def rows_of(spark, settings, table: str, slice_: dict):
    return catalog.read_slice(spark, settings, table, slice_).toPandas()


def check_no_loss_no_duplicate(after, reference, keys: list[str], same: list[str]) -> None:
    assert not after.duplicated(keys).any(), "duplicate keys after the rerun"
    assert len(after) == len(reference) > 0
    a, r = after.set_index(keys).sort_index(), reference.set_index(keys).sort_index()
    assert list(a.index) == list(r.index), "keys differ from the uninterrupted run"
    for column in same:
        assert a[column].tolist() == pytest.approx(r[column].tolist()) if a[column].dtype.kind == "f" \
            else a[column].tolist() == r[column].tolist(), column


# The cases that need no upstream home come first: under xdist one worker runs them while the other builds it.
def test_malformed_inputs_never_stop_ingest(spark, tmp_path):
    from restpg import ingest

    s = make_settings(tmp_path / "home", "data.max_field_chars=100")
    good = {"reviewerId": "u1", "input": "Write a review of a lamp.", "output": "Bright and solid.",
            "profile": [{"overall": "5.0", "summary": "ok", "reviewText": "Fine lamp.", "description": "lamp"}]}
    corpus = {  # line → what must become of it
        json.dumps(good): "valid",
        "\ufeff" + json.dumps({**good, "reviewerId": "bom"}): "valid",
        json.dumps({**good, "reviewerId": 12345}): "valid",  # a numeric id becomes a string id
        json.dumps({**good, "reviewerId": "items", "profile": [good["profile"][0], "a string", {"reviewText": "y" * 150}]}): "valid",
        json.dumps({**good, "reviewerId": "nul", "output": "a\u0000b"}): "contains NUL",
        json.dumps({**good, "reviewerId": "long", "output": "x" * 120}): "output too long",
        json.dumps({**good, "reviewerId": {"id": 1}}): "user id is a dict",
        json.dumps({**good, "reviewerId": "type", "input": ["a", "list"]}): "input is not a string",
        "{not json": "not JSON",
        json.dumps([1, 2]): "not a JSON object",
        json.dumps({k: v for k, v in good.items() if k != "output"}): "missing output",
        "": "blank", "   ": "blank",
    }
    lines = list(corpus)
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = ingest.run(spark, s, source=str(path), task="product_review", split="train", run_id="faults")
    assert report["records_read"] == len(lines)
    assert report["valid"] + report["quarantined"] + report["blank_lines"] == report["records_read"]
    expected = list(corpus.values())
    assert (report["valid"], report["blank_lines"]) == (expected.count("valid"), expected.count("blank"))
    assert report["profile_items_dropped"] == 2  # the bad items alone, not their example
    q = catalog.read(spark, s, "quarantine").toPandas()
    by_line = {int(r.record_number): r.reason for r in q.itertuples() if r.reason and not r.reason.startswith("profile item")}
    for number, (line, outcome) in enumerate(corpus.items(), start=1):
        if outcome not in ("valid", "blank"):
            assert by_line[number].startswith(outcome), (number, by_line.get(number), outcome)

    broken = tmp_path / "broken.json"
    broken.write_text('[{"reviewerId": "u9", "input": "a", "output": "b"},\n {"reviewerId": ')
    report = ingest.run(spark, s, source=str(broken), task="product_review", split="train", run_id="faults-array")
    assert (report["valid"], report["quarantined"]) == (0, 1)
    reasons = [r.reason for r in catalog.read(spark, s, "quarantine").collect()]
    assert any(r.startswith("file: not a readable JSON array") for r in reasons)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", "sqlite:///{file}/mlflow.db"])
def test_unusable_tracking_store_stops_before_any_work(uri, tmp_path):
    from restpg.runtime import TrackingUnavailable, setup_mlflow

    a_file = tmp_path / "not-a-directory"
    a_file.write_text("")
    uri = uri.format(port=_closed_port(), file=a_file)
    home = tmp_path / "home"
    started = time.time()
    out = subprocess.run([str(RESTPG), "judge", "--variant", "rest_em", "--iteration", "1", "--home", str(home),
                          "--set", f"mlflow.tracking_uri={uri}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    [line] = out.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("restpg: MLflow tracking") and uri in line
    assert time.time() - started < 60
    assert not (home / "warehouse").exists()  # Spark never started, no table was touched
    with pytest.raises(TrackingUnavailable):
        setup_mlflow(make_settings(home, f"mlflow.tracking_uri={uri}"))


# stage → (sub-command arguments, run_stage arguments, table, slice, keys, columns equal to the reference's, label)
CHUNKED = {
    "sample": (["sample", "--variant", "rest_em", "--iteration", "1"], {"variant": "rest_em", "iteration": 1, "policy": None},
               "trajectories", {"variant": "rest_em", "iteration": 1}, ["example_id", "sample_index"], ["raw_text", "seed"],
               "sample rest_em t=1"),
    "judge": (["judge", "--variant", "rest_em", "--iteration", "1"], {"variant": "rest_em", "iteration": 1, "force": False},
              "judge_scores", {"variant": "rest_em", "iteration": 1}, ["example_id", "sample_index"], ["reward", "format_ok"],
              "judge rest_em t=1"),
    "reason": (["reason"], {"force": False}, "reasoning_paths", {}, ["example_id"], ["reasoning", "n_tokens"], "reason paths"),
    "evaluate": (["evaluate", "--variant", "sft"], {"variants": ["sft"], "force": False}, "eval_predictions",
                 {"ablation": "", "variant": "sft", "split": "test"}, ["example_id"], ["raw_text", "response"], "evaluate sft"),
}


@pytest.mark.parametrize("stage", list(CHUNKED))
def test_kill_during_a_chunked_stage_then_rerun(stage, spark, upstream):
    argv, args, table, slice_, keys, same, label = CHUNKED[stage]
    killed_home = home_copy(upstream, f"{stage}-killed")
    if stage == "sample":  # the upstream run's samples are the uninterrupted reference; the killed home starts empty
        reference_home = make_settings(upstream[0] / "upstream", *upstream[2])
        catalog.replace_slice(spark, killed_home, catalog.read_slice(spark, killed_home, table, slice_).limit(0), table, slice_, "reset")
    else:
        reference_home = home_copy(upstream, f"{stage}-whole")

    killed, lines = kill_when(killed_home, upstream[2], argv, committed(label))
    assert killed, "the stage finished before it could be killed:\n" + "".join(lines[-20:])
    partial = rows_of(spark, killed_home, table, slice_) if catalog.exists(spark, killed_home, table) else None

    cli.run_stage(stage, spark, killed_home, **args)  # the retry
    if stage != "sample":
        cli.run_stage(stage, spark, reference_home, **args)  # what an uninterrupted run writes
    after, reference = rows_of(spark, killed_home, table, slice_), rows_of(spark, reference_home, table, slice_)
    assert partial is not None and 0 < len(partial) < len(reference), "the kill came before the first or after the last chunk"
    check_no_loss_no_duplicate(after, reference, keys, same)
    kept = after.set_index(keys).loc[partial.set_index(keys).index]
    assert (kept["run_id"].values == partial["run_id"].values).all()  # the killed run's chunks were kept, not redone
    if stage == "evaluate":
        score_slice = {"ablation": "", "variant": "sft", "split": "test"}
        check_no_loss_no_duplicate(rows_of(spark, killed_home, "eval_scores", score_slice),
                                   rows_of(spark, reference_home, "eval_scores", score_slice), ["example_id"],
                                   ["judge_score", "rouge1"])


def test_kill_during_training_then_resume(spark, upstream):
    from mlflow import MlflowClient

    from restpg.runtime import setup_mlflow

    killed_home, reference_home = home_copy(upstream, "train-killed"), home_copy(upstream, "train-whole")
    states = killed_home.home_dir / "checkpoints"
    killed, lines = kill_when(killed_home, upstream[2], ["train", "--variant", "sft", "--iteration", "0"],
                              lambda _: any(states.glob("*/resume/state-*/state.pt")))
    assert killed, "training finished before it could be killed:\n" + "".join(lines[-20:])
    args = {"variant": "sft", "iteration": 0, "init_ref": None}
    resumed = cli.run_stage("train", spark, killed_home, **args)
    whole = cli.run_stage("train", spark, reference_home, **args)
    assert 0 < resumed["resumed_from"] < whole["steps"] == resumed["steps"] and whole["resumed_from"] == 0
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-3)
    assert resumed["best_step"] == whole["best_step"]

    setup_mlflow(reference_home)
    expected = {m.step: m.value for m in MlflowClient().get_metric_history(whole["run_id"], "loss")}
    setup_mlflow(killed_home)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(killed_home.mlflow.experiment).experiment_id],
                              "tags.`restpg.stage` = 'train' and attributes.status = 'RUNNING'")
    [dead] = [r.info.run_id for r in runs]  # the killed job's MLflow run never ended
    # the killed job's steps up to its resume state, then the rerun's: the uninterrupted loss curve
    before = {m.step: m.value for m in client.get_metric_history(dead, "loss") if m.step <= resumed["resumed_from"]}
    stitched = {**before, **{m.step: m.value for m in client.get_metric_history(resumed["run_id"], "loss")}}
    steps = list(range(1, whole["steps"] + 1))
    assert sorted(stitched) == sorted(expected) == steps
    assert [stitched[k] for k in steps] == pytest.approx([expected[k] for k in steps], rel=1e-3)
    versions = [v for v in client.search_model_versions("name = 'faults-policy'")
                if v.tags.get("variant") == "sft" and v.tags.get("iteration") == "0"]
    assert len(versions) == 2  # the upstream SFT model and the resumed job's; the killed job registered nothing
