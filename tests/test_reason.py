"""Reasoning synthesis for the run's training inputs, within the reasoning budget."""
import json

import pytest

from helpers import SMOLLM2, example_row, make_settings, write_rows
from restpg import catalog, prompts, reason
from restpg.policy_inputs import training_inputs

SLOTS = prompts.SLOTS["teacher_reasoning"]


@pytest.mark.parametrize("reasoning, target, n, expected", [
    ("the user likes short sentences and puns", "a completely different text here", 3, 0.0),
    ("one two three four", "zero one two three four five", 3, 1.0),
    ("one two three four five", "one two three", 3, 1 / 3),
    ("too short", "too short", 3, 0.0),
])
def test_copy_overlap(reasoning, target, n, expected):
    assert reason.copy_overlap(reasoning, target, n) == pytest.approx(expected)


@pytest.mark.parametrize("raw, finished, expected", [
    # the prompt ends with "Style:": the answer continues it, the label goes back in front once
    (" terse.\nTopics: tea.\nPlan: short.", True, ("Style: terse.\nTopics: tea.\nPlan: short.", True)),
    ("Style: terse.\nTopics: tea.\nPlan: short.", True, ("Style: terse.\nTopics: tea.\nPlan: short.", True)),
    # every slot there and the last one's line ended: kept up to it, and it ended, whatever came after
    (" terse.\nTopics: tea.\nPlan: short.\n=== Response ===\nGreat tea", False, ("Style: terse.\nTopics: tea.\nPlan: short.", True)),
    (" terse. Topics: tea. Plan: short.\nI hope this helps", False, ("Style: terse.\nTopics: tea.\nPlan: short.", True)),
    # cut inside the last slot's line, a slot missing or repeated: as written, finished as the teacher did
    (" terse.\nTopics: tea.\nPlan: sho", False, ("Style: terse.\nTopics: tea.\nPlan: sho", False)),
    (" | / | / | / | /", False, ("Style: | / | / | / | /", False)),
    (" terse.\nPlan: short.\n", False, ("Style: terse.\nPlan: short.", False)),
    (" a.\nTopics: b.\nPlan: c.\nStyle: a.\nTopics: b.\nPlan: c.\n", False,
     ("Style: a.\nTopics: b.\nPlan: c.\nStyle: a.\nTopics: b.\nPlan: c.", False)),
    ("", True, ("", True)), ("   ", False, ("", False)),
])
def test_slotted_puts_the_label_back_once_and_ends_after_the_last_slot(raw, finished, expected):
    assert reason.slotted(raw, SLOTS, finished) == expected


def test_v2_templates_ask_for_the_slots_and_a_teacher_prompt_cuts_a_long_target():
    teacher, policy = prompts.template("teacher_reasoning"), prompts.template("policy_reasoning")
    assert teacher.version.startswith("teacher_reasoning@v2#") and policy.version.startswith("policy_reasoning@v2#")
    assert teacher.text.rstrip().endswith(SLOTS[0]) and all(f"\n{s}" in teacher.text and f'"{s}"' in policy.text for s in SLOTS)
    assert prompts.SEPARATOR.strip() in policy.text
    _, _, tail = prompts.teacher_parts("Review a kettle.", "x" * 50 + "ZZZ", ["a"], 200, max_target_chars=20)
    assert "x" * 20 in tail and "x" * 21 not in tail and "ZZZ" not in tail
    assert "ZZZ" in prompts.teacher_parts("Review a kettle.", "x" * 50 + "ZZZ", ["a"], 200)[2]  # 0: whole


def _fit(tokenizer, s, example, budget):
    """The teacher's prompt of `example` as generation fits it (chat template, `budget` tokens)."""
    import pandas as pd

    from restpg import generation

    items = [it["text"] for it in example["profile"][:s.retrieve.k]]
    head, parts, tail = prompts.teacher_parts(example["input"], example["target"], items, s.prompt.max_item_chars,
                                              s.reason.max_target_chars)
    chunk = pd.DataFrame({"head": [head], "items": [parts], "tail": [tail]})
    (prompt,), (truncated,) = generation.prompts_of(tokenizer, chunk, chat=True, budget=budget)
    return prompt, truncated, parts


def test_the_teachers_prompt_holds_k_profile_items_of_demo_and_long_amazon_examples(amazon_path, tmp_path):
    """The teacher's instruction, worked example, input and expected output take room the policy's prompt does
    not have: fitted to the policy's budget the profile was cut to nothing (every local path was written
    blind). Its own budget, `reason.max_input_tokens`, holds k items for every demo example and for the
    shared Amazon sample's longest example (its expected output cut to `reason.max_target_chars`)."""
    from restpg import demo_data, ingest, models

    s = make_settings(tmp_path / "home")
    tok = models.load_tokenizer(SMOLLM2, s)
    demo = [ingest.parse_record(json.dumps(r), None, None).example for r in demo_data.generate(2, 6, 3)]
    amazon = [ingest.parse_record(line, "product_review", None).example for line in amazon_path.open()]
    longest = max((e for e in amazon if e), key=lambda e: len(e["input"]) + len(e["target"]))
    assert len(longest["target"]) > 4000 and len(longest["profile"]) >= s.retrieve.k  # a long one, with k items
    for example in [*demo, longest]:
        prompt, truncated, items = _fit(tok, s, example, s.reason.max_input_tokens)
        assert not truncated and len(items) == s.retrieve.k and all(item in prompt for item in items), example["example_id"]
        # the profile, then the expected output, then the first slot label the answer starts with
        assert prompt.index(items[-1]) < prompt.index("Expected output:") < prompt.rindex(SLOTS[0])
    assert _fit(tok, s, demo[0], s.prompt.max_input_tokens)[1]  # the policy's budget would cut it


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
    # the teacher's own prompt budget (reason.max_input_tokens) holds the profile the policy's 200 tokens would cut
    assert report["truncated_share"] == 0 and not paths["prompt_truncated"].any()
    assert report["finished_share"] == (paths["finished"].sum() / 3) and report["at_length_cap"] == (~paths["finished"]).sum()
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


def test_the_extractive_teacher_writes_finished_slotted_paths_in_the_same_stage(spark, tiny, tmp_path):
    """`models.teacher: extractive` loads no model: its paths are rows of the same slice shape, every one
    finished, untruncated, slotted and within its share of the reasoning budget in the policy's tokens."""
    from restpg import extractive, models, sft_data

    s = make_settings(tmp_path / "home", "models.teacher=extractive", f"models.policy={tiny}", "prompt.max_reasoning_tokens=96")
    _tables(spark, s, 3)
    report = reason.run(spark, s, run_id="x1")
    paths = _paths(spark, s)
    assert report["teacher"] == extractive.VERSION and set(paths["teacher"]) == {extractive.VERSION}
    assert set(paths["template_version"]) == {prompts.template("teacher_reasoning").version}
    assert report["rows"] == report["generated"] == 3 and report["truncated_share"] == 0 and report["finished_share"] == 1
    assert paths["finished"].all() and not paths["prompt_truncated"].any() and not paths["copied"].any()
    tok = models.load_tokenizer(tiny, s)
    for r in paths.itertuples():
        assert sft_data.degeneracy(r.reasoning, SLOTS) is None and "kettles" in r.reasoning  # a word of the items
        assert r.n_tokens == len(tok(r.reasoning, add_special_tokens=False).input_ids) <= int(extractive.FILL * 96)
    again = reason.run(spark, s, run_id="x2")
    assert again["generated"] == 0 and again["reused"] == 3


@pytest.mark.slow
def test_packaged_teacher_writes_slotted_reasoning(spark, tmp_path):
    """The packaged 135M model as the teacher, on the v2 template and its own prompt budget: every profile item
    reaches it and its answers start at the first slot (whether it fills the others is its quality)."""
    s = make_settings(tmp_path / "home", f"models.teacher={SMOLLM2}", "prompt.max_reasoning_tokens=48")
    _tables(spark, s, 2)
    report = reason.run(spark, s, run_id="r1")
    paths = _paths(spark, s)
    assert report["rows"] == 2 and report["empty"] == 0 and report["truncated_share"] == 0
    assert paths["reasoning"].str.startswith(SLOTS[0] + " ").all() and not paths["prompt_truncated"].any()
    assert (paths["n_tokens"] <= 48).all() and set(paths["teacher"]) == {SMOLLM2}
    assert set(paths["template_version"]) == {prompts.template("teacher_reasoning").version}
    assert 0 <= report["finished_share"] <= 1
    for r in paths.itertuples():
        print(f"--- {r.Index} finished={r.finished} n_tokens={r.n_tokens}\n{r.reasoning}")
