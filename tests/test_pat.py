"""The `pat` variant: its prompt carries own items and peers' cues, its output is dual reasoning then the
response after the separator, and its SFT start is teacher dual reasoning on the PAT prompt."""
import pytest

from helpers import example_row, make_settings, write_rows
from restpg import catalog, pat_sft, policy_inputs, prompts, sft_data, variants


def test_pat_is_an_em_variant_with_its_own_sft_start_and_peers():
    v = variants.get("pat")
    assert v.is_em and v.uses_reasoning and v.uses_peers and variants.base_of("pat") == "pat"
    assert not any(variants.uses_peers(n) for n in ("sft", "sft_reasoning", "rest_em", "rest_pg"))
    assert variants.uses_peers("pat:m=8")  # an ablation tag keeps the variant's nature


def test_cues_alternate_by_rank_after_the_users_own_items():
    peers = [{"trajectory": "topic", "rank": 2, "text": "T2"}, {"trajectory": "style", "rank": 1, "text": "S1"},
             {"trajectory": "topic", "rank": 1, "text": "T1"}, {"trajectory": "style", "rank": 2, "text": "S2"}]
    assert policy_inputs.pat_item_texts(["own a"], peers) == [
        "(own) own a", "(style cue) S1", "(topic cue) T1", "(style cue) S2", "(topic cue) T2"]
    assert policy_inputs.pat_item_texts([], []) == []


def test_pat_prompt_asks_for_style_topic_merge_then_the_separator():
    head, items, tail = policy_inputs.pat_parts("product_review", "Review a kettle.", ["(own) x", "(style cue) y"], 200)
    text = head + "".join(items) + tail
    assert text.index("Style:") < text.index("Topic:") < text.index("Merged:") < text.index(prompts.SEPARATOR.strip())
    assert items == ["[1] (own) x\n", "[2] (style cue) y\n"] and "Review a kettle." in tail
    raw = "Style: short, upbeat.\nTopic: price.\nMerged: short note on price." + prompts.SEPARATOR + "Cheap and cheerful!"
    out = prompts.parse_output("pat", raw)
    assert out.format_ok and out.response == "Cheap and cheerful!" and out.reasoning.startswith("Style:")
    assert not prompts.parse_output("pat", "Style: no separator, no response").format_ok


def test_teacher_prompt_shows_cues_input_and_target_and_ends_in_style():
    head, items, tail = prompts.teacher_parts("Review a kettle.", "Great kettle.", ["(own) a\nb", "(topic cue) c"], 200,
                                              name=pat_sft.TEMPLATE)
    assert items == ["(own) a b | ", "(topic cue) c | "]
    assert "Review a kettle." in tail and "Great kettle." in tail and tail.rstrip().endswith("Style:")


@pytest.mark.slow
def test_pat_sft_writes_dual_paths_and_iteration_zero_on_pat_prompts(spark, tiny, tmp_path):
    s = make_settings(tmp_path / "home", f"models.policy={tiny}", "models.teacher=extractive", "prompt.max_input_tokens=900",
                      "prompt.max_reasoning_tokens=96", "prompt.max_response_tokens=40", "reason.copy_threshold=1.0")
    rows = [example_row("t1", "u1", target="The quick brown fox."), example_row("t2", "u2", target="A lazy dog."),
            example_row("v1", "u3", split="val", target="10 apples.")]
    write_rows(spark, s, "examples", rows)
    write_rows(spark, s, "retrievals", [{"example_id": r["example_id"], "retriever": s.models.retriever, "k": 1,
                                         "items": [{"rank": 1, "item_id": "i", "score": 1.0, "text": f"own item of {r['user_id']}"}]}
                                        for r in rows])
    peer = lambda eid, trajectory, text: {"example_id": eid, "retriever": s.models.retriever, "mode": "similar",
                                          "trajectory": trajectory, "rank": 1, "text": text}
    write_rows(spark, s, "peer_retrievals", [peer("t1", "style", "STYLE-CUE-1"), peer("t1", "topic", "TOPIC-CUE-1"),
                                             peer("t2", "style", "STYLE-CUE-2")])
    report = pat_sft.run(spark, s, run_id="t")
    paths = {r.example_id: r for r in catalog.read_slice(spark, s, "reasoning_paths", pat_sft.path_slice(s)).collect()}
    assert set(paths) == {"t1", "t2"}  # the training inputs only
    assert all(p.reasoning.startswith("Style:") and p.template_version.startswith("teacher_pat@v1#") for p in paths.values())
    assert all(sft_data.degeneracy(p.reasoning, prompts.SLOTS["teacher_pat"]) is None and p.finished for p in paths.values())
    train = {r.example_id: r for r in catalog.read_slice(spark, s, "training_sets", {"variant": "pat", "iteration": 0}).collect()}
    assert report["rows"] == len(train) == 2 and report["inputs"] == 2 and set(train) == {"t1", "t2"}
    assert report["truncated_share"] == 0 and report["finished_share"] == 1
    for eid, r in train.items():
        assert r.template_version.startswith("policy_pat@v1#") and "own item of" in r.prompt
        reasoning, response, found = prompts.split_reasoning(r.completion)
        assert found and reasoning == paths[eid].reasoning and response == next(x["target"] for x in rows if x["example_id"] == eid)
    if "t1" in train:
        assert "STYLE-CUE-1" in train["t1"].prompt and "TOPIC-CUE-1" in train["t1"].prompt


def test_merged_part_is_the_last_merged_section_on_one_line():
    assert policy_inputs.merged_part("Style: terse.\nTopic: price.\nMerged: short,\n on price.", 100) == "short, on price."
    assert policy_inputs.merged_part("Merged: a\nMerged: b", 100) == "b"
    assert policy_inputs.merged_part("no labels at all", 5) == "no la"
    assert policy_inputs.merged_part(None, 10) == "" and policy_inputs.merged_part("Merged:  ", 10) == ""


def test_refinement_starts_at_iteration_two_for_pat_only(tmp_path):
    s = make_settings(tmp_path, "loop.iterations=2")
    assert [policy_inputs.refines(s, "pat", t) for t in (0, 1, 2, 3)] == [False, False, True, True]
    assert not policy_inputs.refines(s, "rest_pg", 2) and policy_inputs.refines(s, "pat:random_peers", 2)
    assert policy_inputs.refines_at_evaluation(s, "pat")
    assert not policy_inputs.refines_at_evaluation(make_settings(tmp_path, "loop.iterations=1"), "pat")
    assert not policy_inputs.refines(make_settings(tmp_path, "loop.pat_refine=false"), "pat", 2)


def _reasoned(style: str, merged: str, response: str = "Nice.") -> str:
    return f"Style: {style}\nTopic: kettles.\nMerged: {merged}{prompts.SEPARATOR}{response}"


@pytest.mark.slow
def test_refinement_prompts_carry_the_best_well_formed_merged_reasoning_into_training(spark, tiny, tmp_path):
    """Iteration 2 of `pat`: each input's prompt carries the merged reasoning of its best well-formed sample of
    iteration 1 (malformed samples never count, whatever they say), in the refinement template; inputs
    without one keep the plain PAT prompt; the filter's training rows use exactly the sampled prompts."""
    from restpg import filtering, rewards

    s = make_settings(tmp_path / "home", f"models.policy={tiny}", "prompt.max_input_tokens=900", "filter.tau=0.5",
                      "loop.iterations=2")
    rows = [example_row(e, f"u{e}") for e in ("t1", "t2", "t3")]
    write_rows(spark, s, "examples", rows)
    write_rows(spark, s, "retrievals", [{"example_id": r["example_id"], "retriever": s.models.retriever, "k": 0, "items": []}
                                        for r in rows])
    write_rows(spark, s, "peer_retrievals", [{"example_id": "t1", "retriever": s.models.retriever, "mode": "similar",
                                              "trajectory": "style", "rank": 1, "text": "STYLE-CUE"}])
    kind = rewards.kind_label(s)
    samples = [("t1", 0, _reasoned("a", "WORSE-ONE"), True, 0.2), ("t1", 1, _reasoned("b", "BEST-ONE"), True, 0.9),
               ("t1", 2, _reasoned("c", "BROKEN-ONE"), False, 0.0), ("t2", 0, _reasoned("d", "ONLY-BROKEN"), False, 0.0),
               ("t3", 0, "Plain thought without labels" + prompts.SEPARATOR + "Ok.", True, 0.4)]

    def write_iteration(t, rows_):
        slice_ = {"variant": "pat", "iteration": t}
        write_rows(spark, s, "trajectories", [
            {**slice_, "example_id": e, "task": "product_review", "sample_index": i, "raw_text": raw,
             "reasoning": prompts.split_reasoning(raw)[0], "format_ok": ok, "finished": True} for e, i, raw, ok, _ in rows_], slice_)
        write_rows(spark, s, "judge_scores", [
            {**slice_, "example_id": e, "task": "product_review", "sample_index": i, "reward_kind": kind, "reward": r,
             "format_ok": ok} for e, i, _, ok, r in rows_], {**slice_, "reward_kind": kind})

    write_iteration(1, samples)
    assert policy_inputs.previous_reasoning(spark, s, "pat", 1) is None  # iteration 1 has nothing to revise
    previous = {r.example_id: r.previous for r in policy_inputs.previous_reasoning(spark, s, "pat", 2).collect()}
    assert previous == {"t1": "BEST-ONE", "t3": "Plain thought without labels"}
    examples = catalog.read(spark, s, "examples")
    prompts_ = {r.example_id: r for r in policy_inputs.policy_prompts(
        spark, s, examples, "pat", previous=policy_inputs.previous_reasoning(spark, s, "pat", 2)).collect()}
    refine, plain = prompts.template("policy_pat_refine").version, prompts.template("policy_pat").version
    assert prompts_["t1"].template_version == refine and "BEST-ONE" in prompts_["t1"].prompt
    assert "STYLE-CUE" in prompts_["t1"].prompt and "WORSE-ONE" not in prompts_["t1"].prompt
    assert prompts_["t2"].template_version == plain and "earlier reasoning" not in prompts_["t2"].prompt
    with pytest.raises(ValueError, match="only PAT variants"):
        policy_inputs.policy_prompts(spark, s, examples, "rest_pg", previous=policy_inputs.previous_reasoning(spark, s, "pat", 2))

    write_iteration(2, [("t1", 0, _reasoned("e", "REVISED"), True, 0.8), ("t2", 0, _reasoned("f", "NEW"), True, 0.7)])
    filtering.run(spark, s, variant="pat", iteration=2, run_id="t")
    kept = {r.example_id: r for r in catalog.read_slice(spark, s, "training_sets", {"variant": "pat", "iteration": 2}).collect()}
    assert set(kept) == {"t1", "t2"}
    assert kept["t1"].prompt == prompts_["t1"].prompt and kept["t1"].template_version == refine
    assert kept["t2"].prompt == prompts_["t2"].prompt and kept["t2"].template_version == plain


@pytest.mark.parametrize("raw, expected", [
    ("terse, upbeat.", "Style: terse, upbeat."), ("Style: terse.\nTopic: price.", "Style: terse.\nTopic: price."), ("", "")])
def test_teacher_path_gets_the_prefix_once(raw, expected):
    """The PAT teacher's prompt ends with "Style:"; a chat-tuned teacher often answers "Style: …" itself,
    which must not become "Style: Style: …"."""
    from restpg.reason import slotted

    assert slotted(raw, prompts.SLOTS["teacher_pat"], False)[0] == expected


