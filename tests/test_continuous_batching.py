"""Continuous batching: a finished row's slot goes to the next (prompt, sample) of the queue, its prompt's
cache merged into the running one right-aligned, and the outputs are those of fixed groups, seed for seed."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from restpg import generation, models  # noqa: E402
from restpg.generation import sample, sample_seed  # noqa: E402

PROMPTS = ["The quick brown fox", "10 apples and the lazy dog jumps over it all, a review", "an email", "hi",
           "Write a long and careful review of a kettle that boils water", "x y z", "dear team,", "ok then we go"]
M, MAX_ROWS = 3, 8  # groups of 2 prompts: 6 rows of 8 slots


@pytest.fixture(scope="module")
def stopping(tiny, settings):
    """The tiny model with one token in nine ending a row, so rows of one batch end at different steps."""
    model, tokenizer = models.load_causal_lm(tiny, settings)
    model.generation_config.eos_token_id = list(range(2, len(tokenizer), 9))
    return model, tokenizer


_runs: dict = {}


def both_ways(model, tokenizer, **kw):
    """(samples, stats) of fixed groups, then of continuous batching (kept for the module's other tests)."""
    key = tuple(sorted(kw.items()))
    if key not in _runs:
        seeds = [[sample_seed(f"ex-{i}", j, 1, 0) for j in range(M)] for i in range(len(PROMPTS))]
        _runs[key] = [sample(model, tokenizer, PROMPTS, seeds, max_rows=MAX_ROWS, continuous=on, top_p=0.95,
                             max_new_tokens=12, **kw) for on in (False, True)]
    return _runs[key]


def test_a_finished_row_leaves_its_slot_to_the_next_sample(stopping):
    (fixed, fixed_stats), (refilled, stats) = both_ways(*stopping, temperature=1.0, reasoning_tokens=None)
    assert len({s.n_tokens for row in fixed for s in row}) > 3  # rows end at different steps: there are slots to fill
    assert fixed_stats.refilled_rows == 0 and fixed_stats.peak_rows == 2 * M  # fixed groups leave 2 of 8 slots idle
    assert stats.refilled_rows > 0 and stats.peak_rows == MAX_ROWS
    # the same rows decoded (same outputs), in fewer and fuller steps
    assert stats.row_steps == fixed_stats.row_steps and stats.decode_passes < fixed_stats.decode_passes


@pytest.mark.parametrize("temperature, reasoning_tokens", [(0.0, None), (1.0, None), (1.0, 5)])
def test_same_outputs_with_and_without_continuous_batching(stopping, temperature, reasoning_tokens):
    (fixed, _), (refilled, stats) = both_ways(*stopping, temperature=temperature, reasoning_tokens=reasoning_tokens)
    assert stats.refilled_rows > 0
    assert refilled == fixed


def plain_next_logits(model, tokenizer, text: str, extra: list[int] = ()) -> torch.Tensor:
    ids = generation.encode(tokenizer, text) + list(extra)
    return model(torch.tensor([ids])).logits[0, -1]


@pytest.fixture(params=["growing", "dynamic", "sliding"])
def any_cache(request, lm, monkeypatch):
    """The tiny Llama with the sampler's in-place cache or a plain DynamicCache, or a tiny Mistral whose
    sliding window (4) is shorter than the prompts, so its cache layers hold the last positions only."""
    from transformers import DynamicCache, MistralConfig, MistralForCausalLM

    model, tokenizer = lm
    if request.param == "dynamic":
        monkeypatch.setattr(generation, "decoding_cache", lambda model, room: DynamicCache(config=model.config))
    if request.param == "sliding":
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=4, max_position_embeddings=256, pad_token_id=0)).eval()
    return model, tokenizer


@torch.inference_mode()
def test_regrouped_rows_keep_the_logits_of_their_own_forwards(any_cache):
    """Rows merged from caches of different lengths (shorter ones padded on the left), then a merge that
    drops the longest rows (their columns cut), give each row the logits of its text forwarded alone."""
    model, tokenizer = any_cache
    short, long_ = PROMPTS[2], PROMPTS[4]
    state = generation.prefill(model, tokenizer, [PROMPTS[0], PROMPTS[1]], 2, room=3)
    fed = {r: [] for r in range(4)}  # row id → tokens fed after its prompt
    texts = {0: PROMPTS[0], 1: PROMPTS[0], 2: PROMPTS[1], 3: PROMPTS[1], 4: long_, 5: long_, 6: short}

    def advance(state, token: int):
        tokens = [token + i for i in range(len(state.rows))]
        generation.step(model, state, torch.tensor(tokens))
        for r, t in zip(state.rows, tokens):
            fed.setdefault(r, []).append(t)

    def check(state):
        for i, r in enumerate(state.rows):
            expected = plain_next_logits(model, tokenizer, texts[r], fed.get(r, []))
            torch.testing.assert_close(state.logits[i], expected, atol=1e-5, rtol=1e-5)

    advance(state, 10)
    advance(state, 20)
    pool = generation.prefill(model, tokenizer, [short, long_], 1)  # longer than the running rows
    state = generation.regroup([(state, [0, 3], [0, 3]), (pool, [1, 1], [4, 5])], state.cache)
    check(state)
    advance(state, 30)
    check(state)
    pool = generation.prefill(model, tokenizer, [short], 1)
    width = state.mask.shape[1]
    state = generation.regroup([(state, [0], [0]), (pool, [0], [6])], generation.decoding_cache(model, 2))
    assert state.mask.shape[1] < width  # the long rows' columns are gone
    check(state)
    advance(state, 40)
    advance(state, 50)
    check(state)


def test_generation_work_is_split_by_prompt_length(spark):
    """generate_df's split: ranges of prompt length across partitions, shortest first within each, so a
    `sample` call gets prompts of similar length (struct prompts measured by their head, items and tail)."""
    from pyspark.sql import functions as F

    rows = [(f"ex-{i}", "w" * ((i * 7) % 23 + 1), ["i" * (i % 3)], "t") for i in range(40)]
    df = spark.createDataFrame(rows, "example_id string, head string, items array<string>, tail string").repartition(3)
    split = generation.by_length(df, 4, generation.prompt_length(df), "example_id")
    parts = (split.withColumn("part", F.spark_partition_id()).withColumn("n", generation.prompt_length(df)).toPandas())
    lengths = [list(group.n) for _, group in parts.groupby("part", sort=True)]
    assert len(lengths) > 1 and all(ls == sorted(ls) for ls in lengths)  # sorted within each partition
    assert all(a[-1] <= b[0] for a, b in zip(lengths, lengths[1:]))  # and the partitions are ranges
    assert sorted(parts.n) == sorted(len(h) + len(i[0]) + 1 for _, h, i, _ in rows)


@pytest.mark.slow
def test_gemma_refills_slots_across_its_sliding_window_layers_with_the_same_outputs(settings):
    """The packaged Gemma 3 270M (BOS-emitting template, digit-splitting tokenizer, sliding-window layers beside
    full-attention ones, as the paper's Gemma policies): refilled rows decode what fixed groups decode."""
    from helpers import GEMMA

    model, tokenizer = models.cached_causal_lm(GEMMA, settings)
    eos = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = list(range(2, len(tokenizer), 7))  # rows end at different steps
        seeds = [[sample_seed(f"g-{i}", j, 1, 0) for j in range(2)] for i in range(4)]
        fixed, refilled = (sample(model, tokenizer, PROMPTS[:4], seeds, max_rows=4, continuous=on, temperature=0.0,
                                  top_p=1.0, max_new_tokens=8) for on in (False, True))
    finally:
        model.generation_config.eos_token_id = eos
    assert refilled[1].refilled_rows > 0
    assert [[s.text for s in row] for row in refilled[0]] == [[s.text for s in row] for row in fixed[0]]
