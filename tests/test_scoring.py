"""Candidate log-probabilities from one prefill per prompt equal a full forward on prompt + candidate."""
from __future__ import annotations

import os

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from restpg import generation, scoring  # noqa: E402

PROMPTS = ["Score: ", "The lazy dog jumps over the quick brown fox, a review. Score:", "an email"]
CANDIDATES = ["1", "10", " 10", "3 apples"]


@torch.inference_mode()
def full_forward_logprob(model, tokenizer, prompt: str, candidate: str) -> float:
    prompt_ids = generation.encode(tokenizer, prompt)
    cand_ids = tokenizer(candidate, add_special_tokens=False).input_ids
    logprobs = torch.log_softmax(model(torch.tensor([prompt_ids + cand_ids])).logits[0].float(), -1)
    return sum(logprobs[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(cand_ids))


def test_single_and_multi_token_candidates_score_like_a_full_forward(lm):
    model, tokenizer = lm
    lengths = [len(ids) for ids in scoring.candidate_ids(tokenizer, CANDIDATES)]
    assert lengths[0] == 1 and lengths[1] > 1  # "1" and "10" really differ in length
    scores, stats = scoring.score_candidates(model, tokenizer, PROMPTS, CANDIDATES)
    for prompt, row in zip(PROMPTS, scores):
        assert list(row) == CANDIDATES
        for candidate, logprob in row.items():
            assert logprob == pytest.approx(full_forward_logprob(model, tokenizer, prompt, candidate), abs=1e-4)
    assert row["10"] != row["1"]
    assert stats.prefill_passes == 1 and stats.candidate_passes == 1  # not one per candidate


def test_one_prefill_per_prompt_group(lm):
    model, tokenizer = lm
    grouped, stats = scoring.score_candidates(model, tokenizer, PROMPTS, CANDIDATES, max_rows=len(CANDIDATES))
    assert stats.prefill_passes == len(PROMPTS)
    together, _ = scoring.score_candidates(model, tokenizer, PROMPTS, CANDIDATES)
    for a, b in zip(grouped, together):
        assert a == pytest.approx(b, abs=1e-5)


def test_single_token_candidates_need_no_second_forward(lm):
    model, tokenizer = lm
    _, stats = scoring.score_candidates(model, tokenizer, PROMPTS, ["1", "3"])
    assert stats.prefill_passes == 1 and stats.candidate_passes == 0


def test_spark_scores_equal_direct_computation(spark, settings, tiny, lm):
    model, tokenizer = lm
    df = spark.createDataFrame(pd.DataFrame({"example_id": ["a", "b", "c"], "prompt": PROMPTS})).repartition(2)
    out = scoring.score_df(df, tiny, settings, CANDIDATES).toPandas().sort_values("example_id")
    assert list(out.columns) == ["example_id", "prompt", "logprobs"]
    for prompt, row in zip(out.prompt, out.logprobs):
        expected = {c: full_forward_logprob(model, tokenizer, prompt, c) for c in CANDIDATES}
        assert dict(row) == pytest.approx(expected, abs=1e-4)
