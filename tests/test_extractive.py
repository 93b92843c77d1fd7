"""The extractive teacher: three slots from measured facts of the retrieved items, grounded in them, finished,
with slack under the reasoning budget, never quoting the expected output — on demo data and real reviews."""
import json
import re

import pytest

from helpers import SMOLLM2, make_settings
from restpg import extractive, prompts, reason, sft_data

SLOTS = prompts.SLOTS["teacher_reasoning"]
PAT_SLOTS = prompts.SLOTS["teacher_pat"]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return make_settings(tmp_path_factory.mktemp("extractive-home"))


@pytest.fixture(scope="module")
def count(local):
    """Tokens of a text in the local policy's tokenizer (SmolLM2)."""
    from restpg import models

    tokenizer = models.load_tokenizer(SMOLLM2, local)
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


def _examples(records, task=None):
    from restpg import ingest

    parsed = [ingest.parse_record(r if isinstance(r, str) else json.dumps(r), task, None).example for r in records]
    return [e for e in parsed if e]


def _slot(reasoning: str, label: str) -> str:
    return next(line[len(label):].strip() for line in reasoning.split("\n") if line.startswith(label))


def check_paths(examples, local, count, slots=SLOTS) -> list[str]:
    """Each example's path (its first k profile items retrieved) passes what sft_data asks of a teacher path,
    and every word it names is one the items contain; returns the paths."""
    k, budget = local.retrieve.k, local.prompt.max_reasoning_tokens
    limit = int(extractive.FILL * budget)
    paths = []
    for e in examples:
        items = [it["text"] for it in e["profile"][:k]]
        path = extractive.reasoning(e["task"], e["input"], e["target"], items, slots, count, limit)
        item_words = {w.lower() for w in extractive.words(" ".join(items))}
        topics = [w for w in re.split(r"[,.]\s*", _slot(path, slots[1])) if w]
        quoted = re.findall(r'"([^"]+)"', path)
        assert sft_data.degeneracy(path, slots) is None, path  # every slot, once, in order; no loop
        assert count(path) <= limit < sft_data.reasoning_limit(budget) + 1, path  # slack under the policy's cap
        assert topics == [extractive.NO_TOPICS] or all(t in item_words for t in topics), path  # the items' own words
        assert all(q in " ".join(items) for q in quoted), path  # a quoted opening or ending is the items'
        assert reason.copy_overlap(path, e["target"], local.reason.copy_ngram) == 0, path  # no quote of y
        assert reason.copy_overlap(path, e["target"], 5) <= 0.25, path
        paths.append(path)
    return paths


def test_demo_paths_are_slotted_grounded_short_and_do_not_copy(local, count):
    from restpg import demo_data

    paths = check_paths(_examples(demo_data.generate(4, 6, 3)), local, count)
    assert len(paths) == 48 and len(set(paths)) > 40  # the paths differ from example to example
    # the demo users' signatures (an opening phrase, pet topics) are what the items show
    assert sum("opens" in p or "ends" in p for p in paths) > len(paths) / 2


def test_amazon_paths_are_slotted_grounded_short_and_do_not_copy(local, count, amazon_path):
    examples = _examples(amazon_path.open(), "product_review")
    paths = check_paths(examples, local, count)
    assert len(paths) == len(examples) > 500
    # style is measured on the review the user wrote, not the product description: lengths vary by user
    lengths = {re.search(r"about (\d+) words", p).group(1) for p in paths}
    assert len(lengths) >= 5


def test_topics_prefer_words_the_expected_output_shares_and_fall_back_to_the_commonest():
    items = ["The kettle boils water fast. My daughter loves the whistle.",
             "Pretty teapot, and my daughter uses it daily for green tea."]
    assert extractive.topic_words(items, "The whistle is loud and my daughter hates it.")[:2] == ["daughter", "whistle"]
    assert extractive.topic_words(items, "Nothing in common here.")[0] == "daughter"  # in both items
    # a word the request already names comes after those it does not
    assert extractive.topic_words(items, "daughter whistle", request="a whistle")[:2] == ["daughter", "whistle"]


def test_style_facts_are_those_the_items_show_and_the_target_confirms():
    bodies = ["Honestly, I love it! Works great.", "Honestly, I hate it! Broke fast.", "Honestly, it is fine! Meh."]
    facts = extractive.style_facts(bodies, "Honestly, I think it is good! Would buy.")
    assert facts[0] == "about 5 words" and 'opens "Honestly,"' in facts and "exclamation marks" in facts
    assert "first person" in facts  # two of three items, and the target
    plain = extractive.style_facts(bodies, "it is good and would surely be bought again by the whole family without doubt")
    assert plain == ["about 5 words"]  # the target shows none of the rest
    assert extractive.style_facts([], "anything") == ["no earlier writing to go by"]


def test_a_tight_budget_drops_the_least_important_facts_first(local, count):
    items = ["reviewText: Honestly, I love this kettle! It boils water fast and the whistle is loud. Cheers!"] * 3
    target = "Honestly, I love this teapot! The whistle and the handle are great. Cheers!"
    roomy = extractive.reasoning("product_review", "Review a teapot.", target, items, SLOTS, count, 200)
    tight = extractive.reasoning("product_review", "Review a teapot.", target, items, SLOTS, count, 24)
    assert count(tight) <= 24 < count(roomy) and sft_data.degeneracy(tight, SLOTS) is None
    first = lambda path: [_slot(path, label).split(", ")[0].rstrip(".") for label in SLOTS]  # noqa: E731
    assert first(tight) == first(roomy)  # the first fact of each slot stays


def test_pat_style_comes_from_own_items_and_style_cues_topics_from_own_items_and_topic_cues(count):
    items = ["(own) reviewText: Honestly, the kettle is great!",
             "(style cue) reviewText: Honestly, the blender is loud!",
             "(topic cue) reviewText: This kettle has a whistle."]
    path = extractive.reasoning("product_review", "Review a kettle.", "Honestly, the whistle of this kettle rocks!",
                                items, PAT_SLOTS, count, 200)
    assert sft_data.degeneracy(path, PAT_SLOTS) is None and 'opens "Honestly,"' in _slot(path, "Style:")
    topics = _slot(path, "Topic:")
    assert "whistle" in topics and "kettle" in topics and "blender" not in topics


def test_no_items_still_give_every_slot(count):
    path = extractive.reasoning("product_review", "Review a kettle.", "Great kettle.", [], SLOTS, count, 40)
    assert sft_data.degeneracy(path, SLOTS) is None and "no earlier writing" in path


@pytest.mark.parametrize("ref, yes", [("extractive", True), ("extractive@v1", True), ("packaged:smollm2-135m-instruct", False),
                                      ("models:/teacher@champion", False), ("/path/extractive-model", False)])
def test_is_extractive(ref, yes):
    assert extractive.is_extractive(ref) is yes


@pytest.mark.parametrize("text, fields", [
    ("overall: 4.0\nsummary: Nice\nreviewText: Line one.\n\nLine two.", {"overall": "4.0", "summary": "Nice",
                                                                        "reviewText": "Line one.\n\nLine two."}),
    ("just a text", {}),
])
def test_fields_of_reads_back_rendered_items(text, fields):
    assert extractive.fields_of("product_review", text) == fields
    assert extractive.body("product_review", text) == (fields.get("reviewText") or text)
