"""Reasoning synthesis with the real packaged teacher (SmolLM2-135M-Instruct) through Spark."""
import pytest

from restpg import catalog, demo_data, ingest, prompts, reason, retrieve, sft_data
from restpg.config import load_settings


@pytest.mark.parametrize("reasoning, target, n, expected", [
    ("the user likes short sentences and puns", "a completely different text here", 3, 0.0),
    ("one two three four", "zero one two three four five", 3, 1.0),
    ("one two three four five", "one two three", 3, 1 / 3),
    ("too short", "too short", 3, 0.0),
])
def test_copy_overlap(reasoning, target, n, expected):
    assert reason.copy_overlap(reasoning, target, n) == pytest.approx(expected)


def test_teacher_writes_one_reasoning_per_training_example(spark, tmp_path):
    s = load_settings("local", ["data.demo_users=1", "reason.max_new_tokens=16"], home=str(tmp_path / "home"))
    path = demo_data.write(tmp_path / "demo.jsonl", users_per_task=1, profile_items=3, examples_per_user=3, seed=3)
    ingest.run(spark, s, str(path))
    retrieve.run(spark, s)
    report = reason.run(spark, s, run_id="r1")
    train = catalog.read(spark, s, "examples").where("split = 'train'").count()
    rows = catalog.read(spark, s, "reasoning_paths").toPandas()
    assert report["rows"] == train == len(rows) == 4
    assert (rows["reasoning"].str.strip().str.len() > 0).all()
    assert set(rows["template_version"]) == {prompts.template("teacher_reasoning").version}
    assert set(rows["teacher"]) == {"packaged:smollm2-135m-instruct"}
    assert rows["copy_overlap"].between(0, 1).all()
    again = reason.run(spark, s, run_id="r2")
    assert again["rows"] == 4 and catalog.read(spark, s, "reasoning_paths").count() == 4

    built = sft_data.run(spark, s, "sft_reasoning", run_id="b")
    assert built["rows"] == 4
    row = catalog.read(spark, s, "training_sets").where("variant = 'sft_reasoning'").first()
    assert prompts.SEPARATOR.strip() in row.completion and row.weight == 1.0 and row.sample_index == -1
    target = catalog.read(spark, s, "examples").where(f"example_id = '{row.example_id}'").first().target
    assert row.completion.endswith(target.strip())
