"""Reasoning synthesis for the run's training inputs, within the reasoning budget."""
import pytest

from helpers import SMOLLM2, example_row, make_settings, write_rows
from restpg import catalog, prompts, reason
from restpg.policy_inputs import training_inputs


@pytest.mark.parametrize("reasoning, target, n, expected", [
    ("the user likes short sentences and puns", "a completely different text here", 3, 0.0),
    ("one two three four", "zero one two three four five", 3, 1.0),
    ("one two three four five", "one two three", 3, 1 / 3),
    ("too short", "too short", 3, 0.0),
])
def test_copy_overlap(reasoning, target, n, expected):
    assert reason.copy_overlap(reasoning, target, n) == pytest.approx(expected)


def _tables(spark, s, n_train: int):
    rows = [example_row(f"e{i}", f"u{i % 2}", target=f"Kettle review {i}: boils fast.") for i in range(n_train)]
    rows.append(example_row("v0", "u0", split="val"))
    write_rows(spark, s, "examples", rows)
    write_rows(spark, s, "retrievals", [{"example_id": r["example_id"], "retriever": s.models.retriever, "k": 1,
                                         "items": [{"rank": 1, "item_id": "p", "score": 0.5, "text": r["profile"][0]["text"]}]}
                                        for r in rows])


def _paths(spark, s):
    return catalog.read_slice(spark, s, "reasoning_paths", reason.path_slice(s)).toPandas().set_index("example_id")


def _merges(spark, s, run_id):
    """MERGE commits of `run_id` in the history of reasoning_paths."""
    history = spark.sql(f"DESCRIBE HISTORY delta.`{catalog.ref(s, 'reasoning_paths').path}`").collect()
    return sum(h.operation == "MERGE" and f'"run_id": "{run_id}"' in (h.userMetadata or "") for h in history)


def test_teacher_writes_for_the_training_inputs_within_the_reasoning_budget(spark, tiny, tmp_path):
    home = tmp_path / "home"
    common = [f"models.teacher={tiny}", f"models.policy={tiny}", "prompt.max_input_tokens=200", "prompt.max_reasoning_tokens=5"]
    s = make_settings(home, *common, "data.max_examples=3", "reason.chunk_examples=2")
    _tables(spark, s, 5)
    report = reason.run(spark, s, run_id="r1")
    assert _merges(spark, s, "r1") == 2  # 3 inputs in chunks of 2: two commits
    wanted = sorted(r.example_id for r in training_inputs(spark, s).collect())
    paths = _paths(spark, s)
    assert wanted == ["e0", "e1", "e2"] and sorted(paths.index) == wanted  # data.max_examples caps the teacher's work
    assert report["rows"] == report["inputs"] == report["generated"] == 3 and report["max_new_tokens"] == 5
    assert paths["n_tokens"].max() == 5 and (paths["n_tokens"] <= 5).all()  # the cap is prompt.max_reasoning_tokens
    assert set(paths["teacher"]) == {tiny} and set(paths["template_version"]) == {prompts.template("teacher_reasoning").version}
    assert paths["copy_overlap"].between(0, 1).all() and set(paths["run_id"]) == {"r1"}

    more = make_settings(home, *common, "data.max_examples=4")
    resumed = reason.run(spark, more, run_id="r2")  # only the missing input is generated
    paths = _paths(spark, more)
    assert resumed["generated"] == 1 and resumed["reused"] == 3 and resumed["rows"] == 4
    assert paths["run_id"].to_dict() == {"e0": "r1", "e1": "r1", "e2": "r1", "e3": "r2"}

    again = reason.run(spark, more, run_id="r2b")  # nothing missing: nothing generated, nothing written
    assert again["generated"] == 0 and _merges(spark, s, "r2b") == 0 and len(_paths(spark, more)) == 4

    redone = reason.run(spark, s, run_id="r3", force=True)  # force replaces the slice with this run's inputs
    paths = _paths(spark, s)
    assert redone["generated"] == 3 and sorted(paths.index) == ["e0", "e1", "e2"] and set(paths["run_id"]) == {"r3"}


@pytest.mark.slow
def test_packaged_teacher_writes_reasoning(spark, tmp_path):
    s = make_settings(tmp_path / "home", f"models.teacher={SMOLLM2}", "prompt.max_reasoning_tokens=16")
    _tables(spark, s, 2)
    report = reason.run(spark, s, run_id="r1")
    paths = _paths(spark, s)
    assert report["rows"] == 2 and report["empty"] == 0 and (paths["reasoning"].str.strip().str.len() > 0).all()
    assert (paths["n_tokens"] <= 16).all() and set(paths["teacher"]) == {SMOLLM2}
