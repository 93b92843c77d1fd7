"""Log-probabilities of candidate continuations (e.g. a judge's scores "1".."10") with one prefill per prompt.

The prompts are prefilled once; their KV cache is repeated once per candidate and a single forward over the
right-padded candidate tokens gives every candidate's teacher-forced log-probability. A candidate is
tokenized on its own (no special tokens, no space added) and appended to the prompt's tokens: pass " 10"
when the natural continuation of the prompt has a space before the number.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd
import torch

from restpg import models
from restpg.config import Settings
from restpg.generation import prefill

log = logging.getLogger(__name__)


@dataclass
class ScoringStats:
    prompts: int = 0
    prefill_passes: int = 0
    candidate_passes: int = 0


def candidate_ids(tokenizer, candidates: list[str]) -> list[list[int]]:
    ids = [tokenizer(c, add_special_tokens=False).input_ids for c in candidates]
    if not all(ids):
        raise ValueError("every candidate needs at least one token")
    return ids


@torch.inference_mode()
def _score_group(model, tokenizer, prompts: list[str], cand: list[list[int]], stats: ScoringStats) -> torch.Tensor:
    """[prompts, candidates] summed log-probabilities."""
    n = len(cand)
    state = prefill(model, tokenizer, prompts, n)
    stats.prefill_passes += 1
    width = max(len(c) for c in cand)
    tokens = torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in cand] * len(prompts),
                          device=model.device)
    present = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in cand] * len(prompts), device=model.device)
    logprobs = [torch.log_softmax(state.logits, -1)]  # predicts each candidate's first token
    if width > 1:
        mask = torch.cat([state.mask, present[:, :-1]], dim=1)
        positions = state.positions[:, None] + torch.arange(width - 1, device=model.device)
        out = model(input_ids=tokens[:, :-1], attention_mask=mask, position_ids=positions,
                    past_key_values=state.cache, use_cache=True)
        stats.candidate_passes += 1
        logprobs += list(torch.log_softmax(out.logits.float(), -1).unbind(1))
    picked = torch.stack([lp.gather(1, tokens[:, j:j + 1]).squeeze(1) for j, lp in enumerate(logprobs)], dim=1)
    return (picked * present).sum(1).view(len(prompts), n)


def score_candidates(model, tokenizer, prompts: list[str], candidates: list[str],
                     max_rows: int = 64) -> tuple[list[dict[str, float]], ScoringStats]:
    """{candidate: log p(candidate | prompt)} per prompt; one prefill per group of max_rows // len(candidates)."""
    stats = ScoringStats(prompts=len(prompts))
    cand = candidate_ids(tokenizer, candidates)
    per_group = max(1, max_rows // len(cand))
    scores: list[dict[str, float]] = []
    for start in range(0, len(prompts), per_group):
        table = _score_group(model, tokenizer, prompts[start:start + per_group], cand, stats)
        scores += [dict(zip(candidates, row)) for row in table.tolist()]
    return scores, stats


def score_df(df, model_ref: str, settings: Settings, candidates: list[str], prompt_col: str = "prompt",
             out_col: str = "logprobs", max_rows: int = 64):
    """Adds `out_col` map<string,double> (candidate → log-probability given the row's prompt)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, MapType, StringType

    ref = models.resolve_ref(model_ref, settings)
    models.checkpoint_dir(ref, settings)  # convert/download once on the driver
    env, batch_rows = models.worker_env(settings), settings.spark.arrow_batch_rows

    @F.pandas_udf(MapType(StringType(), DoubleType()))
    def logprobs(prompts: pd.Series) -> pd.Series:
        model, tokenizer = models.cached_causal_lm(ref, models.worker_settings(env))
        out: list[dict[str, float]] = []
        for start in range(0, len(prompts), batch_rows):
            scores, stats = score_candidates(model, tokenizer, list(prompts.iloc[start:start + batch_rows]),
                                             candidates, max_rows)
            log.info("scored %d prompts x %d candidates in %d prefills", stats.prompts, len(candidates),
                     stats.prefill_passes)
            out += scores
        return pd.Series(out)

    df.sparkSession.sparkContext.setJobDescription(f"restpg score: {len(candidates)} candidates with {ref}")
    return df.withColumn(out_col, logprobs(F.col(prompt_col)))
