"""Log-probabilities of whole labels (a judge's scores "1".."10") with one prefill per prompt.

A label is scored as a complete answer: its tokens, then a token that ends it. Tokenizers that split
digits (Gemma's, Llama's) write "10" as "1" + "0", so the summed log-probability of the label's tokens
alone can never rank "10" above "1" (log p("1") + log p("0" | "1") ≤ log p("1")). Here "1" only counts
when what follows does not continue the number: p("1" complete) = p("1") · p(end | "1"), and likewise
for every label, with the same end set. A number ends at any token whose text does not start with an
ASCII digit (a newline, a space, punctuation, end-of-turn or EOS), so the events "the answer is 1"
and "the answer is 10" are disjoint and comparable.

The prompts are prefilled once; their KV cache is repeated once per candidate and a single forward over
the right-padded candidate tokens gives, for every candidate, its tokens' log-probabilities and the
distribution of the token after it. A candidate is tokenized on its own (no special tokens, no space
added) and appended to the prompt's tokens, so the prompt should end where the label starts (the judge
template ends with a newline; a chat template ends with the assistant turn's header).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from restpg.generation import prefill

DIGITS = frozenset("0123456789")
_ends_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer → {vocab_size: mask}


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


def number_ends(tokenizer, vocab_size: int) -> torch.Tensor:
    """[vocab_size] True for the tokens that end a number: their text does not start with an ASCII digit.
    Ids past the tokenizer's vocabulary (padding rows of the output layer) count as ends."""
    known = _ends_cache.setdefault(tokenizer, {})
    if vocab_size not in known:
        known[vocab_size] = _number_ends(tokenizer, vocab_size)
    return known[vocab_size]


def _number_ends(tokenizer, vocab_size: int) -> torch.Tensor:
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
    ends = torch.ones(vocab_size, dtype=torch.bool)
    ends[: len(tokens)] = torch.tensor([not (t and t[0] in DIGITS) for t in tokens])
    return ends


def label_logprobs(steps: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """log p(label's tokens, then an end token) per row.

    steps: [rows, width + 1, vocab] log-probabilities of the next token after 0..width label tokens;
    tokens: [rows, width] label tokens, right-padded; lengths: [rows] label lengths; ends: [vocab] bool."""
    rows, width = tokens.shape
    present = torch.arange(width, device=tokens.device)[None, :] < lengths[:, None]
    picked = steps[:, :width].gather(2, tokens[..., None]).squeeze(2)
    said = torch.where(present, picked, torch.zeros_like(picked)).sum(1)
    after = steps[torch.arange(rows, device=tokens.device), lengths]  # the token after the label's last one
    ended = torch.logsumexp(after.masked_fill(~ends.to(after.device)[None, :], float("-inf")), dim=-1)
    return said + ended


@torch.inference_mode()
def _score_group(model, tokenizer, prompts: list[str], cand: list[list[int]], ends: torch.Tensor,
                 stats: ScoringStats) -> torch.Tensor:
    """[prompts, candidates] whole-label log-probabilities."""
    n = len(cand)
    state = prefill(model, tokenizer, prompts, n)
    stats.prefill_passes += 1
    width, pad = max(len(c) for c in cand), tokenizer.pad_token_id or 0
    tokens = torch.tensor([c + [pad] * (width - len(c)) for c in cand] * len(prompts), device=model.device)
    lengths = torch.tensor([len(c) for c in cand] * len(prompts), device=model.device)
    present = (torch.arange(width, device=model.device)[None, :] < lengths[:, None]).long()
    out = model(input_ids=tokens, attention_mask=torch.cat([state.mask, present], dim=1),
                position_ids=state.positions[:, None] + torch.arange(width, device=model.device),
                past_key_values=state.cache, use_cache=True)
    stats.candidate_passes += 1
    steps = torch.log_softmax(torch.cat([state.logits[:, None], out.logits.float()], dim=1), -1)
    return label_logprobs(steps, tokens, lengths, ends).view(len(prompts), n)


def score_candidates(model, tokenizer, prompts: list[str], candidates: list[str], max_rows: int = 64,
                     ends: torch.Tensor | None = None) -> tuple[list[dict[str, float]], ScoringStats]:
    """{candidate: log p(candidate as a whole answer | prompt)} per prompt; one prefill per group of
    max_rows // len(candidates) prompts. `ends` (default `number_ends`) is the set of tokens that end a
    candidate, the same for every candidate."""
    stats = ScoringStats(prompts=len(prompts))
    cand = candidate_ids(tokenizer, candidates)
    if ends is None:
        ends = number_ends(tokenizer, model.get_output_embeddings().weight.shape[0])
    per_group = max(1, max_rows // len(cand))
    scores: list[dict[str, float]] = []
    for start in range(0, len(prompts), per_group):
        table = _score_group(model, tokenizer, prompts[start:start + per_group], cand, ends, stats)
        scores += [dict(zip(candidates, row)) for row in table.tolist()]
    return scores, stats
