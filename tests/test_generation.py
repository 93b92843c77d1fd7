"""Shared-prefill sampling: same logits as plain forwards, one prefill per prompt group, seeded and
reproducible, and the Spark job gives the direct sampler's texts with one model load per worker."""
from __future__ import annotations

import dataclasses
import os
import shutil

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from restpg import generation, models, prompts  # noqa: E402
from restpg.generation import fit_prompt, sample, sample_seed  # noqa: E402

PROMPTS = ["The quick brown fox", "10 apples and the lazy dog jumps over it all, a review", "an email"]
SAMPLING = dict(temperature=0.8, top_p=0.9, max_new_tokens=6)


def plain_next_logits(model, tokenizer, text: str, extra: list[int] = ()) -> torch.Tensor:
    ids = generation.encode(tokenizer, text) + list(extra)
    return model(torch.tensor([ids])).logits[0, -1]


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed("ex-1", 0, 1, 0) == sample_seed("ex-1", 0, 1, 0)
    seeds = {sample_seed(e, j, t, b) for e in ("ex-1", "ex-2") for j in range(4) for t in (1, 2) for b in (0, 1)}
    assert len(seeds) == 32 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("kept, slack, truncated", [
    (2, 0, False),  # everything fits exactly
    (1, 3, True),  # the last item is dropped or cut to the few tokens left
    (0, -1, True),  # even the instruction alone is over budget: it is kept, all profile goes
])
def test_fit_prompt_keeps_the_instruction_and_cuts_profile_from_the_end(lm, kept, slack, truncated):
    _, tokenizer = lm
    head, tail = "Profile:", "Write a review about foxes."
    items = ["<a> one two</a>", "<b> three four five six seven eight nine ten</b>"]
    budget = generation.count_tokens(tokenizer, head + "".join(items[:kept]) + tail) + slack
    text, was_cut = fit_prompt(tokenizer, head, items, tail, budget)
    assert was_cut == truncated
    assert text.startswith(head + "".join(items[:kept])) and text.endswith(tail)
    if kept < len(items):
        assert items[kept] not in text
    if slack >= 0:
        assert generation.count_tokens(tokenizer, text) <= budget
    else:
        assert text == head + tail


def test_chat_prompts_fit_the_budget_with_the_template_counted(tiny, settings):
    tokenizer = models.load_tokenizer(tiny, settings)
    tokenizer.chat_template = "{% for m in messages %}<s>[user] {{ m['content'] }} [assistant]{% endfor %}"
    long_items = ["<a>" + " one two" * 30 + "</a>", "<b> three</b>"]
    chunk = pd.DataFrame({"head": ["Profile:"] * 2, "items": [["<a> one</a>"], long_items], "tail": ["Write."] * 2})
    budget = generation.count_tokens(tokenizer, generation.render_chat(tokenizer, "Profile:<a> one</a>Write.")) + 2
    prompts, truncated = generation.prompts_of(tokenizer, chunk, chat=True, budget=budget)
    assert truncated == [False, True]
    assert all(p.startswith("<s>[user] Profile:") and p.endswith("Write. [assistant]") for p in prompts)
    assert generation.count_tokens(tokenizer, prompts[1]) <= budget


def test_cache_expansion_with_left_padding_matches_plain_forwards(lm):
    model, tokenizer = lm
    m = 3
    state = generation.prefill(model, tokenizer, PROMPTS, m)
    with torch.inference_mode():
        for i, prompt in enumerate(PROMPTS):
            expected = plain_next_logits(model, tokenizer, prompt)
            for j in range(m):
                torch.testing.assert_close(state.logits[i * m + j], expected, atol=1e-5, rtol=1e-5)
        fed = torch.arange(10, 10 + len(PROMPTS) * m)  # a different token per row
        generation.step(model, state, fed)
        for row, token in enumerate(fed.tolist()):
            expected = plain_next_logits(model, tokenizer, PROMPTS[row // m], [token])
            torch.testing.assert_close(state.logits[row], expected, atol=1e-5, rtol=1e-5)


def test_decoding_cache_writes_in_place_and_samples_what_the_concatenating_cache_samples(lm, monkeypatch):
    from transformers import DynamicCache

    model, tokenizer = lm
    state = generation.prefill(model, tokenizer, PROMPTS, 2, room=5)
    layer = state.cache.layers[0]
    assert isinstance(layer, generation.GrowingLayer)
    reserved, length = layer._k, layer.length
    for t in range(5):  # within the room: every step writes into the buffer reserved at prefill
        generation.step(model, state, torch.full((len(state.rows),), 10 + t))
        assert layer._k is reserved and layer.keys.data_ptr() == reserved.data_ptr() and layer.length == length + t + 1
    generation.step(model, state, torch.full((len(state.rows),), 20))  # past it: more room, the past kept
    assert layer._k is not reserved and layer.length == length + 6
    assert torch.equal(layer._k[..., :length + 5, :], reserved)

    seeds = [[sample_seed(f"ex-{i}", j, 1, 0) for j in range(3)] for i in range(len(PROMPTS))]
    in_place, _ = sample(model, tokenizer, PROMPTS, seeds, **SAMPLING)
    monkeypatch.setattr(generation, "decoding_cache", lambda model, room: DynamicCache(config=model.config))
    concatenated, _ = sample(model, tokenizer, PROMPTS, seeds, **SAMPLING)
    assert in_place == concatenated


def test_growing_layer_keeps_what_a_concatenating_layer_keeps():
    from transformers.cache_utils import DynamicLayer

    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(4, 2, n, 8, generator=g) for n in (5, 1, 1, 3, 1)]
    grown, plain = generation.GrowingLayer(room=2), DynamicLayer()
    for i, chunk in enumerate(chunks):
        k_grown, v_grown = grown.update(chunk, -chunk)
        k_plain, v_plain = plain.update(chunk, -chunk)
        assert torch.equal(k_grown, k_plain) and torch.equal(v_grown, v_plain) and grown.get_seq_length() == k_plain.shape[-2]
        if i == 2:  # drop the last two positions, select and repeat rows: the next writes land after what is kept
            grown.crop(-2), plain.crop(-2)
            rows = torch.tensor([3, 0, 2])
            grown.batch_select_indices(rows), plain.batch_select_indices(rows)
            grown.reorder_cache(torch.tensor([1, 1, 0, 2])), plain.batch_select_indices(torch.tensor([1, 1, 0, 2]))  # 4 rows again
    assert grown.keys.shape == plain.keys.shape and torch.equal(grown.keys, plain.keys)


def test_greedy_matches_transformers_generate(lm):
    model, tokenizer = lm
    samples, _ = sample(model, tokenizer, PROMPTS, [[0, 1]] * len(PROMPTS), temperature=0.0, top_p=1.0,
                        max_new_tokens=8)
    for prompt, (first, second) in zip(PROMPTS, samples):
        ids = torch.tensor([generation.encode(tokenizer, prompt)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert first.text == second.text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_m_samples_share_one_prefill_and_reproduce(lm):
    model, tokenizer = lm
    m = 4
    seeds = [[sample_seed(f"ex-{i}", j, 1, 0) for j in range(m)] for i in range(len(PROMPTS))]
    samples, stats = sample(model, tokenizer, PROMPTS, seeds, **SAMPLING)
    assert [len(s) for s in samples] == [m] * len(PROMPTS)
    assert stats.prefill_passes == 1 and stats.decode_passes <= SAMPLING["max_new_tokens"] - 1
    again, _ = sample(model, tokenizer, PROMPTS, seeds, **SAMPLING)
    assert again == samples
    assert len({s.text for row in samples for s in row}) > len(PROMPTS)  # seeds differ, so do samples

    grouped, grouped_stats = sample(model, tokenizer, PROMPTS, seeds, max_rows=2 * m, **SAMPLING)
    assert grouped_stats.prefill_passes == 2  # groups of 2 prompts x m rows, never one prefill per sample
    assert [[s.text for s in row] for row in grouped] == [[s.text for s in row] for row in samples]


def test_rows_stop_at_end_of_sequence(tiny, settings):
    model, tokenizer = models.load_causal_lm(tiny, settings)
    [[free]], _ = sample(model, tokenizer, PROMPTS[:1], [[0]], temperature=0.0, top_p=1.0, max_new_tokens=6)
    assert free.n_tokens == 6 and not free.finished
    ids = torch.tensor([generation.encode(tokenizer, PROMPTS[0])])
    stop = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)[0, -1].item()
    model.generation_config.eos_token_id = stop  # greedy decoding now ends at its third token
    [[cut]], _ = sample(model, tokenizer, PROMPTS[:1], [[0]], temperature=0.0, top_p=1.0, max_new_tokens=6)
    assert cut.finished and cut.n_tokens <= 2


def test_spark_sampling_matches_direct_sampling_with_one_load_per_worker(spark, settings, tiny, tmp_path):
    # a path of its own: Python workers outlive test modules, so a shared ref may carry earlier loads
    tiny = str(shutil.copytree(tiny, tmp_path / "tiny-copy"))
    small_batches = dataclasses.replace(settings, spark=dataclasses.replace(settings.spark, arrow_batch_rows=2))
    ids = [f"ex-{i}" for i in range(6)]
    prompts = [PROMPTS[i % len(PROMPTS)] + f" {i}" for i in range(6)]
    df = spark.createDataFrame(pd.DataFrame({"example_id": ids, "prompt": prompts})).repartition(2)
    m, iteration, seed = 3, 2, 7

    def run() -> pd.DataFrame:
        out = generation.generate_df(df, tiny, small_batches, m=m, iteration=iteration, seed=seed,
                                     with_worker_info=True, **SAMPLING)
        return out.toPandas().sort_values(["example_id", "sample_index"]).reset_index(drop=True)

    first, second = run(), run()
    assert first.groupby("example_id").sample_index.apply(list).tolist() == [list(range(m))] * len(ids)
    pd.testing.assert_frame_equal(first.drop(columns=["worker_pid"]), second.drop(columns=["worker_pid"]))
    assert (first.worker_loads == 1).all() and (second.worker_loads == 1).all()
    assert not first.prompt_truncated.any()

    model, tokenizer = models.load_causal_lm(tiny, settings)
    seeds = [[sample_seed(i, j, iteration, seed) for j in range(m)] for i in ids]
    direct, _ = sample(model, tokenizer, prompts, seeds, **SAMPLING)
    assert first.seed.tolist() == [s for row in seeds for s in row]
    assert first.text.tolist() == [s.text for row in direct for s in row]
    assert first.n_tokens.tolist() == [s.n_tokens for row in direct for s in row]
    assert first.finished.tolist() == [s.finished for row in direct for s in row]


def test_spark_sampling_fits_prompt_parts_and_reports_truncation(spark, settings, tiny):
    budget = dataclasses.replace(settings, prompt=dataclasses.replace(settings.prompt, max_input_tokens=30))
    rows = [("short", "Profile:", ["<a> one</a>"], "Write."),
            ("long", "Profile:", ["<a> one</a>", "<b>" + " two three" * 20 + "</b>"], "Write.")]
    df = spark.createDataFrame(rows, "example_id string, head string, items array<string>, tail string")
    df = df.selectExpr("example_id", "struct(head, items, tail) AS prompt")
    out = generation.generate_df(df, tiny, budget, m=2, temperature=0.0, top_p=1.0, max_new_tokens=3,
                                 iteration=1, seed=0).toPandas()
    assert out.groupby("example_id").prompt_truncated.all().to_dict() == {"long": True, "short": False}
    assert len(out) == 4


@pytest.mark.parametrize("variant, reasons", [("rest_em", False), ("sft", False), ("rest_pg", True), ("sft_reasoning", True)])
def test_output_cap_gives_reasoning_its_own_budget(lm, settings, variant, reasons):
    model, tokenizer = lm
    R, S = 5, 7
    budgets = dataclasses.replace(settings, prompt=dataclasses.replace(
        settings.prompt, max_reasoning_tokens=R, max_response_tokens=S))
    cap = generation.output_cap(budgets, variant)
    assert cap == (R + prompts.SEPARATOR_ALLOWANCE + S if reasons else S)
    seeds = [[sample_seed(f"ex-{i}", j, 1, 0) for j in range(4)] for i in range(len(PROMPTS))]
    samples, _ = sample(model, tokenizer, PROMPTS, seeds, temperature=1.0, top_p=1.0, max_new_tokens=cap)
    rows = [s for row in samples for s in row]
    assert all(s.n_tokens <= cap for s in rows)
    assert any(not s.finished for s in rows) and all(s.n_tokens == cap for s in rows if not s.finished)


# ---- budget forcing: reasoning ≤ R tokens, the separator, response ≤ S tokens ---------------------
def test_reasoning_that_never_stops_gets_the_separator_at_its_budget(lm, settings):
    model, tokenizer = lm  # random weights: it never writes the separator by itself
    R, S = 5, 4
    seeds = [[sample_seed(f"ex-{i}", j, 1, 0) for j in range(3)] for i in range(len(PROMPTS))]
    samples, _ = sample(model, tokenizer, PROMPTS, seeds, temperature=1.0, top_p=1.0, max_new_tokens=S,
                        reasoning_tokens=R)
    separator = tokenizer(prompts.SEPARATOR, add_special_tokens=False).input_ids
    for s in (s for row in samples for s in row):
        reasoning, response, found = prompts.split_reasoning(s.text)
        assert found and s.forced and reasoning
        assert s.n_tokens <= R + len(separator) + S
        assert s.finished or s.n_tokens == R + len(separator) + S  # a cut row spent both budgets exactly
        out = prompts.parse_output("rest_pg", s.text, s.finished)
        assert out.format_ok == s.finished and (out.format_issue is None or out.format_issue == prompts.LENGTH_CAP)
    plain, _ = sample(model, tokenizer, PROMPTS, seeds, temperature=1.0, top_p=1.0, max_new_tokens=S)
    assert all(not s.forced and s.n_tokens <= S for row in plain for s in row)
    assert not any(prompts.split_reasoning(s.text)[2] for row in plain for s in row)


def _feed(rows: generation.Rows, text: str, end: bool = False) -> list[int]:
    """Feeds text's tokens to row 0 as its choices, as the decode loop does (it stops at `done`)."""
    fed = []
    for i in rows.tokenizer(text, add_special_tokens=False).input_ids:
        if rows.done[0]:
            return fed
        fed.append(rows.take(0, i, False))
    if end:
        fed.append(rows.take(0, rows.tokenizer.eos_token_id, True))
    return fed


def _tokenizer(ref: str, request, settings):
    """The tiny model's tokenizer, or the packaged Gemma 3 270M's (digit-splitting, BOS-emitting; slow)."""
    from helpers import GEMMA

    if ref == "gemma":
        request.applymarker(pytest.mark.slow)
    return models.load_tokenizer(request.getfixturevalue("tiny") if ref == "tiny" else GEMMA, settings)


@pytest.mark.parametrize("ref", ["tiny", "gemma"])
def test_separator_written_by_the_policy_starts_the_response_budget(ref, request, settings):
    tokenizer = _tokenizer(ref, request, settings)
    rows = generation.Rows(tokenizer, 1, response_tokens=3, reasoning_tokens=50)
    fed = _feed(rows, "The user writes short, warm reviews." + prompts.SEPARATOR)
    assert not rows.reasoning[0] and not rows.forced[0] and not rows.done[0]
    assert fed == rows.tokens[0]  # nothing was forced
    _feed(rows, " Lovely kettle, boils in a minute and looks great")
    assert rows.done[0] and not rows.finished[0]  # 3 response tokens, then cut at the response budget
    assert len(rows.tokens[0]) - rows.response_start[0] == 3


@pytest.mark.parametrize("ref", ["tiny", "gemma"])
def test_end_of_sequence_before_the_separator_is_replaced_by_it(ref, request, settings):
    tokenizer = _tokenizer(ref, request, settings)
    rows = generation.Rows(tokenizer, 1, response_tokens=20, reasoning_tokens=50)
    _feed(rows, "Short and warm.", end=True)  # ends without ever writing the separator
    assert rows.forced[0] and not rows.done[0]
    while rows.queue[0]:  # the decoder feeds the rest of the separator whatever the model picks
        rows.take(0, tokenizer.eos_token_id, True)
    _feed(rows, "Great kettle.", end=True)
    assert rows.finished[0] and rows.done[0]
    out = prompts.parse_output("rest_pg", tokenizer.decode(rows.tokens[0], skip_special_tokens=True), True)
    assert out.format_ok and out.reasoning == "Short and warm." and out.response == "Great kettle."


def test_prompts_are_grouped_by_length_and_answered_in_their_own_order(lm):
    model, tokenizer = lm
    short, long_ = "Hi.", "Write a long and careful review of a kettle that boils water quickly and quietly. " * 3
    prompts_ = [long_, short, long_ + "!", short + "?"]
    assert generation.length_groups(tokenizer, prompts_, 2) == [[1, 3], [0, 2]]
    assert generation.length_groups(tokenizer, prompts_, 4) == [[0, 1, 2, 3]]  # one group: as given
    m = 2
    seeds = [[sample_seed(f"ex-{i}", j, 1, 0) for j in range(m)] for i in range(len(prompts_))]
    alone = [sample(model, tokenizer, [p], [s], **SAMPLING)[0][0] for p, s in zip(prompts_, seeds)]
    grouped, stats = sample(model, tokenizer, prompts_, seeds, max_rows=2 * m, **SAMPLING)
    assert stats.prefill_passes == 2 and [[x.text for x in row] for row in grouped] == [[x.text for x in row] for row in alone]


def test_counted_generation_keeps_whole_decoding_groups_per_partition():
    """Progress partitions are capped so that each holds at least one decoding group of prompts (16 prompts
    over 8 partitions decoded 2 at a time, at half the tokens per second), never below one per worker."""
    from restpg.embedding import PROGRESS_STEPS

    assert generation.progress_partitions(2, None, 64) == 2 * PROGRESS_STEPS  # unknown size: finest progress
    assert generation.progress_partitions(2, 16, 64) == 2  # evaluation-sized: one group per worker
    assert generation.progress_partitions(2, 40, 8) == 5
    assert generation.progress_partitions(2, 1000, 16) == 2 * PROGRESS_STEPS
    assert generation.progress_partitions(4, 1, 64) == 4
