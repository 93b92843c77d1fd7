"""Whole-label scoring: a label counts only when followed by a token that ends it, so "10" can beat "1"
under tokenizers that split digits; the one-prefill path equals a plain full forward."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from restpg import generation, models, rewards, scoring  # noqa: E402

PROMPTS = ["Score: ", "The lazy dog jumps over the quick brown fox, a review. Score:", "an email"]
CANDIDATES = ["1", "10", " 10", "3 apples"]
SCORES = (1, 3, 5, 7, 10)

# A judge whose next token depends on the last token only: after the prompt it says "1" most often,
# but "1" is nearly always the start of "10". Whole labels: "10" = .6 · .9 · 1 = .54, "1" = .6 · .1 = .06,
# "3", "5", "7" = .1 each. Summed label tokens alone: "1" = .6 > "10" = .54.
JUDGE_DEFAULT = {"1": 0.6, "3": 0.1, "5": 0.1, "7": 0.1, "\n": 0.1}
JUDGE_TABLE = {"1": {"0": 0.9, "\n": 0.1}, "0": {"\n": 1.0}, "3": {"\n": 1.0}, "5": {"\n": 1.0}, "7": {"\n": 1.0}}


def make_bigram_lm(path: Path, tokenizer_dir: Path, table: dict, default: dict, floor: float = -30.0) -> Path:
    """A real Llama checkpoint whose next-token distribution depends only on the last token: `table[tok]`
    after a listed single-token string, `default` after any other token (unlisted tokens get `floor`).

    Every layer adds nothing to the residual stream (o_proj and down_proj are zero), so the final norm
    sees the last token's embedding: one basis vector per listed token, a shared one for the rest."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def token_id(text: str) -> int:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{text!r} is {len(ids)} tokens in the tiny tokenizer"
        return ids[0]

    hidden = 16
    assert len(table) < hidden
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-12)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = torch.zeros(len(tokenizer), hidden)
        embed[:, 0] = 1.0
        head = torch.full((len(tokenizer), hidden), floor)
        for k, (context, dist) in enumerate([(None, default), *table.items()]):
            if context is not None:
                embed[token_id(context)] = torch.nn.functional.one_hot(torch.tensor(k), hidden).float()
            for text, p in dist.items():
                head[token_id(text), k] = math.log(p)
        model.model.embed_tokens.weight.copy_(embed)
        model.lm_head.weight.copy_(head / math.sqrt(hidden))  # the norm scales a basis vector by sqrt(hidden)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bigram_judge(tiny_dir, tmp_path_factory) -> str:
    return str(make_bigram_lm(tmp_path_factory.mktemp("bigram-judge"), tiny_dir, JUDGE_TABLE, JUDGE_DEFAULT))


@torch.inference_mode()
def full_forward(model, tokenizer, prompt: str, candidate: str, prefix: int | None = None) -> tuple[float, float]:
    """(summed log-probability of the candidate's first `prefix` tokens (all by default), log-probability
    that a number ends after them), from one plain forward over prompt + candidate."""
    prompt_ids = generation.encode(tokenizer, prompt)
    cand_ids = tokenizer(candidate, add_special_tokens=False).input_ids[:prefix]
    logprobs = torch.log_softmax(model(torch.tensor([prompt_ids + cand_ids])).logits[0].double(), -1)  # float64: a reference
    said = sum(logprobs[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(cand_ids))
    ends = scoring.number_ends(tokenizer, logprobs.shape[-1])
    return said, torch.logsumexp(logprobs[-1][ends], 0).item()


# ---- the pure function on hand-made log-prob tables ------------------------------------------------
VOCAB = ["1", "0", "3", "5", "7", "\n", "<eos>", "."]
ENDS = torch.tensor([t[0] not in "0123456789" for t in VOCAB])


def dist_row(dist: dict) -> torch.Tensor:
    return torch.tensor([math.log(dist[t]) if dist.get(t) else -1e9 for t in VOCAB])


def steps_for(label: list[str], next_token: dict) -> torch.Tensor:
    """[width + 1, vocab] log-probabilities after each prefix of `label`, from {prefix: {token: p}}."""
    return torch.stack([dist_row(next_token[tuple(label[:j])]) for j in range(len(label) + 1)])


def whole_labels(next_token: dict, labels: list[list[str]]) -> dict[str, float]:
    """The labels' trie scored on a table: row 0 after the prompt, row 1 + i after trie node i."""
    tokens, ancestors, paths = scoring.label_tree([[VOCAB.index(t) for t in lab] for lab in labels])
    prefixes = [tuple(VOCAB[tokens[a]] for a in ancestors[i].nonzero().flatten().tolist()) for i in range(len(tokens))]
    logits = torch.stack([dist_row(next_token[()])] + [dist_row(next_token[p]) for p in prefixes])[None]
    out = scoring.tree_logprobs(logits, tokens, paths, ENDS)[0]
    return {"".join(lab): v for lab, v in zip(labels, out.tolist())}


def test_label_tree_shares_leading_tokens():
    tokens, ancestors, paths = scoring.label_tree([[1], [1, 0], [3], [1, 0, 0], [5, 0]])
    assert tokens == [1, 0, 3, 0, 5, 0] and paths == [[0], [0, 1], [2], [0, 1, 3], [4, 5]]
    assert ancestors.tolist() == [[i == j or (i, j) in {(1, 0), (3, 0), (3, 1), (5, 4)} for j in range(6)]
                                  for i in range(6)]


LABELS = [["1"], ["3"], ["5"], ["7"], ["1", "0"]]
SPLIT_TEN = {(): {"1": 0.6, "3": 0.1, "5": 0.1, "7": 0.1, "\n": 0.1}, ("1",): {"0": 0.9, "\n": 0.1},
             ("1", "0"): {"\n": 0.5, "<eos>": 0.5}, ("3",): {"\n": 1}, ("5",): {"\n": 1}, ("7",): {".": 1}}
REALLY_ONE = {**SPLIT_TEN, ("1",): {"0": 0.05, "\n": 0.5, "<eos>": 0.3, "5": 0.15}}
ALL_ENDS_COUNT = {**SPLIT_TEN, ("1",): {"0": 0.2, "\n": 0.2, "<eos>": 0.2, ".": 0.2, "5": 0.2}}


@pytest.mark.parametrize("table, expected, probability", [
    (SPLIT_TEN, 10, {"10": 0.6 * 0.9, "1": 0.6 * 0.1, "3": 0.1, "7": 0.1}),
    (REALLY_ONE, 1, {"1": 0.6 * 0.8, "10": 0.6 * 0.05}),          # "1" then "5" is neither label
    (ALL_ENDS_COUNT, 1, {"1": 0.6 * 0.6, "10": 0.6 * 0.2}),       # newline, EOS and "." all end a label
])
def test_whole_label_logprobs_on_tables(table, expected, probability):
    got = whole_labels(table, LABELS)
    for label, p in probability.items():
        assert got[label] == pytest.approx(math.log(p), abs=1e-5)
    assert rewards.pick_score(got, list(SCORES)) == expected
    assert sum(math.exp(v) for v in got.values()) <= 1 + 1e-6  # disjoint answers


def test_summed_tokens_alone_never_pick_ten_when_digits_split():
    """Why the end token is needed: the old rule (sum of the label's token log-probs) on the same table."""
    summed = {"".join(lab): sum(steps_for(lab, SPLIT_TEN)[j, VOCAB.index(t)].item() for j, t in enumerate(lab))
              for lab in LABELS}
    assert rewards.pick_score(summed, list(SCORES)) == 1
    assert rewards.pick_score(whole_labels(SPLIT_TEN, LABELS), list(SCORES)) == 10


def test_number_ends_marks_tokens_that_do_not_continue_a_number(lm):
    _, tokenizer = lm
    ends = scoring.number_ends(tokenizer, len(tokenizer) + 3)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    for text in ("0", "1", "7"):
        assert not ends[tokens.index(text)]
    for text in ("\n", ".", " 10", "a"):
        (i,) = tokenizer(text, add_special_tokens=False).input_ids
        assert ends[i], text
    assert ends[tokenizer.eos_token_id] and ends[-3:].all()


# ---- the model path ------------------------------------------------------------------------------
def test_candidates_score_like_a_full_forward(lm):
    model, tokenizer = lm
    lengths = [len(ids) for ids in scoring.candidate_ids(tokenizer, CANDIDATES)]
    assert lengths[0] == 1 and lengths[1] > 1  # "1" and "10" really differ in length
    scores, stats = scoring.score_candidates(model, tokenizer, PROMPTS, CANDIDATES)
    for prompt, row in zip(PROMPTS, scores):
        assert list(row) == CANDIDATES
        for candidate, logprob in row.items():
            assert logprob == pytest.approx(sum(full_forward(model, tokenizer, prompt, candidate)), abs=1e-4)
    assert stats.prefill_passes == 1 and stats.candidate_passes == 1  # not one per candidate


def test_grouping_prompts_changes_nothing(lm):
    model, tokenizer = lm
    grouped, stats = scoring.score_candidates(model, tokenizer, PROMPTS, CANDIDATES, max_rows=len(CANDIDATES))
    assert stats.prefill_passes == len(PROMPTS)
    together, _ = scoring.score_candidates(model, tokenizer, PROMPTS, CANDIDATES)
    for a, b in zip(grouped, together):
        assert a == pytest.approx(b, abs=1e-5)


def test_prefix_groups_are_runs_of_prompts_sharing_leading_tokens():
    head, other = list(range(100, 120)), list(range(200, 230))
    ids = [head + [1, 2], head + [3], head + [4, 5, 6], other, head[:5] + [9] * 20, other + [7]]
    assert scoring.prefix_groups(ids, max_rows=8) == [([0, 1, 2], 20), ([3], 0), ([4], 0), ([5], 0)]
    # the prefix leaves each prompt a token of its own; at most max_rows prompts per group
    assert scoring.prefix_groups([head, head + [1]], max_rows=8) == [([0, 1], 19)]
    assert scoring.prefix_groups(ids[:3], max_rows=2) == [([0, 1], 20), ([2], 0)]
    assert scoring.prefix_groups(ids[:3], max_rows=8, min_shared=21) == [([0], 0), ([1], 0), ([2], 0)]


def _judge_prompts(tokenizer) -> list[str]:
    """Judge prompts as the E-step makes them: m responses per input share criteria, request and truth."""
    template = rewards.judge_template(SCORES)
    inputs = [("Write a review of a kettle.", "Great kettle, boils fast and looks good on the counter."),
              ("Write an email about the meeting.", "Hi Sam, the meeting moved to 3pm.")]
    responses = ["Great kettle.", "It boils water fast, and the handle stays cool; I would buy it again.", "Meh", ""]
    return [generation.render_chat(tokenizer, template.render(x, y, r)) for x, y in inputs for r in responses] + ["an email"]


@pytest.mark.parametrize("ref", ["tiny", pytest.param("gemma", marks=pytest.mark.slow)])
def test_shared_prefixes_score_like_prompts_prefilled_whole(ref, request, settings):
    """Judge prompts of one input computed with their common prefix once give the scores of prompts
    prefilled whole, on the tiny model and on Gemma 3 270M (BOS in its chat template, split digits)."""
    if ref == "gemma":
        model, tokenizer = models.cached_causal_lm(GEMMA, settings)
    else:
        model, tokenizer = request.getfixturevalue("lm")
    prompts_ = _judge_prompts(tokenizer)
    labels = [str(s) for s in SCORES]
    alone, plain = scoring.score_candidates(model, tokenizer, prompts_, labels, share=False)
    shared, stats = scoring.score_candidates(model, tokenizer, prompts_, labels)
    assert stats.suffix_passes == 1 and stats.shared_tokens > 20 * (len(prompts_) - 3) and plain.shared_tokens == 0
    for a, b in zip(shared, alone):
        assert list(a) == labels and a == pytest.approx(b, abs=2e-4)
    # the labels' trie in one row each equals a plain forward over prompt + label (on Gemma one prompt: 11
    # forwards of a 270M model per prompt)
    checked = [0] if ref == "gemma" else [0, 1, -1]
    for prompt, row in zip([prompts_[i] for i in checked], [alone[i] for i in checked]):
        assert row == pytest.approx({c: sum(full_forward(model, tokenizer, prompt, c)) for c in labels}, abs=2e-4)
    # in groups small enough to split an input's prompts, and a lone prompt in a batch of its own
    split, _ = scoring.score_candidates(model, tokenizer, prompts_, labels, max_rows=3 * len(labels))
    for a, b in zip(split, alone):
        assert a == pytest.approx(b, abs=2e-4)


def test_bigram_judge_prefers_ten_as_a_whole_label(bigram_judge, settings):
    """On a real checkpoint through the real judge prompt: the judge's answer is "10" → reward 1.0;
    the summed label tokens of the same model would say "1"."""
    model, tokenizer = models.load_causal_lm(bigram_judge, settings)
    template = rewards.judge_template(SCORES)
    prompt = rewards.fit_judge_prompt(tokenizer, template, "Write a review.", "Great kettle.", "Nice kettle.", 4096)
    (judgement,) = rewards.judge_with(model, tokenizer, [prompt], SCORES)
    assert judgement.score == 10 and judgement.reward == 1.0
    assert judgement.criterion_logprobs["10"] == pytest.approx(math.log(0.54), abs=1e-3)
    assert judgement.criterion_logprobs["1"] == pytest.approx(math.log(0.06), abs=1e-3)
    summed = {str(s): full_forward(model, tokenizer, prompt, str(s))[0] for s in SCORES}
    assert rewards.pick_score(summed, list(SCORES)) == 1


# ---- the packaged Gemma 3 270M (digit-splitting tokenizer) ---------------------------------------
GEMMA = "packaged:gemma3-270m"
SHOTS = [("Write a review of a kettle.", "Great kettle, boils fast."),
         ("Write an email to a colleague about the meeting.", "Hi Sam, the meeting moved to 3pm. Best, Ana"),
         ("Write the abstract of a paper on sorting.", "We present a faster sorting algorithm.")]


@pytest.mark.slow
def test_gemma_tokenizer_splits_ten(settings):
    tokenizer = models.load_tokenizer(GEMMA, settings)
    ten, one = (tokenizer(x, add_special_tokens=False).input_ids for x in ("10", "1"))
    assert len(ten) == 2 and ten[0] == one[0]


@pytest.mark.slow
def test_gemma_judge_gives_ten_and_tau_one_keeps_it(spark, settings):
    """Few-shot judge prompt (three identical answers scored 10, then a fourth): Gemma's answer is "10"."""
    from restpg import filtering
    from restpg.config import FilterConfig

    model, tokenizer = models.cached_causal_lm(GEMMA, settings)
    template = rewards.judge_template(SCORES)
    prompt = "".join(template.render(x, y, y) + "10\n\n" for x, y in SHOTS) + template.render(
        "Write a review of a tent.", "Sturdy tent, easy to set up.", "Sturdy tent, easy to set up.")
    (judgement,) = rewards.judge_with(model, tokenizer, [prompt], SCORES)
    assert judgement.score == 10 and judgement.reward == 1.0
    one, ten = full_forward(model, tokenizer, prompt, "10", prefix=1)[0], full_forward(model, tokenizer, prompt, "10")[0]
    assert one >= ten  # summing the label's tokens alone (the old rule) ranks "1" above "10" on the same prompt
    df = spark.createDataFrame([("e", 0, judgement.reward, True)],
                               "example_id string, sample_index int, reward double, format_ok boolean")
    tau = FilterConfig().tau  # the paper's τ
    assert tau == 1.0 and filtering.keep_high_reward(df, tau, 10).count() == 1


@pytest.mark.slow
def test_gemma_labels_after_a_prompt_longer_than_its_sliding_window(settings):
    """Gemma 3 mixes full and sliding-window layers: the tree mask of each layer type still gives the plain
    forward's scores when the prompt is longer than the window (left padding from a shorter prompt beside it)."""
    model, tokenizer = models.cached_causal_lm(GEMMA, settings)
    window = model.config.sliding_window
    long = "Rate this review. " + "The kettle boils fast and the handle stays cool. " * (window // 8) + "Score:\n"
    prompts_ = [long, "Rate this review: great kettle. Score:\n"]
    assert len(generation.encode(tokenizer, long)) > window + 20
    labels = [str(s) for s in SCORES]
    scores, _ = scoring.score_candidates(model, tokenizer, prompts_, labels, share=False)
    for prompt, row in zip(prompts_, scores):
        assert row == pytest.approx({c: sum(full_forward(model, tokenizer, prompt, c)) for c in labels}, abs=3e-4)


def test_an_attention_that_ignores_masks_is_refused(lm):
    """A flash-attention kernel would let the labels see each other: refused with a clear error, not scored."""
    from types import SimpleNamespace

    _, tokenizer = lm
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="flash_attention_2"):
        scoring.score_candidates(flash, tokenizer, PROMPTS[:1], CANDIDATES)
