"""Sampling m outputs per prompt with the prompt's prefill paid once, and its Spark job.

`generate(num_return_sequences=m)` copies each prompt m times before prefill (transformers issue
#27449), so m samples pay the prompt m times. Here a batch of prompts is prefilled once, its KV
cache is repeated m times, and every (prompt, sample) row decodes with its own seeded generator.
With continuous batching a finished row's slot goes to the next (prompt, sample) of the queue at
the next step: prompts are prefilled as the batch needs them and their rows merged into the running
cache, right-aligned (see `regroup`); per-row generators make the outputs those of fixed groups.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import weakref
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from restpg import models, prompts
from restpg.config import Settings
from restpg.prompts import SEPARATOR_ALLOWANCE

log = logging.getLogger(__name__)


@dataclass
class Sample:
    text: str
    n_tokens: int  # generated tokens, end-of-sequence excluded
    finished: bool  # stopped at end-of-sequence before the length cap
    forced: bool = False  # the separator was written by the decoder: the reasoning hit its budget or ended early


@dataclass
class SamplingStats:
    prompts: int = 0
    prefill_passes: int = 0
    decode_passes: int = 0
    new_tokens: int = 0
    refilled_rows: int = 0  # rows that took the slot of a finished row while the batch was decoding
    peak_rows: int = 0  # most rows decoded in one step (at most `max_rows`)
    row_steps: int = 0  # rows summed over decode steps: slots used are row_steps / (decode_passes * max_rows)


@dataclass
class DecodeState:
    """A batch mid-decoding: cache, attention mask, last positions and next-token logits per row."""

    cache: DynamicCache
    mask: torch.Tensor  # [rows, cached + 1 tokens]
    positions: torch.Tensor  # [rows] position of the next input token
    logits: torch.Tensor  # [rows, vocab] float32
    rows: list = field(default_factory=list)  # original row index of each live row


def sample_seed(example_id: str, sample_index: int, iteration: int, base_seed: int) -> int:
    """A stable 63-bit seed per sample, so a rerun (or a resumed run) reproduces the same text."""
    digest = hashlib.sha1(f"{base_seed}:{iteration}:{example_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def output_cap(settings: Settings, variant: str) -> int:
    """New-token cap of a variant's outputs (sampling, evaluation): its response budget, plus the
    reasoning budget and the separator for reasoning variants, never one budget shared by both."""
    return prompts.output_budget(variant, settings.prompt.max_reasoning_tokens, settings.prompt.max_response_tokens)


def limits(settings: Settings, variant: str) -> dict:
    """The decoding budgets of a variant, as `sample`/`generate_df` keywords: plain variants get the
    response budget; reasoning variants the reasoning budget, then the separator, then the response budget."""
    reasoning = settings.prompt.max_reasoning_tokens if prompts.uses_reasoning(variant) else None
    return {"max_new_tokens": settings.prompt.max_response_tokens, "reasoning_tokens": reasoning}


def render_chat(tokenizer, text: str) -> str:
    """The text as a user turn of the tokenizer's chat template (if it has one), ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        return text
    turn = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, text: str) -> list[int]:
    """Prompt token ids; a rendered chat template may already start with BOS, so it is not added twice."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids


def count_tokens(tokenizer, text: str) -> int:
    return len(encode(tokenizer, text))


def fit_prompt(tokenizer, head: str, items: list[str], tail: str, max_tokens: int) -> tuple[str, bool]:
    """head + items + tail within `max_tokens`: items (carrying their own separators) are dropped or
    shortened from the end; the instruction in head and tail is always kept."""
    def compose(kept: list[str]) -> str:
        return head + "".join(kept) + tail

    kept = list(items)
    if count_tokens(tokenizer, compose(kept)) <= max_tokens:
        return compose(kept), False
    dropped = ""
    while kept and count_tokens(tokenizer, compose(kept)) > max_tokens:
        dropped = kept.pop()
    room = max_tokens - count_tokens(tokenizer, compose(kept))
    ids = tokenizer(dropped, add_special_tokens=False).input_ids
    for n in range(min(room, len(ids)), 0, -1):  # re-tokenizing a cut can shift counts by a token or two
        part = tokenizer.decode(ids[:n], skip_special_tokens=True)
        if count_tokens(tokenizer, compose(kept + [part])) <= max_tokens:
            return compose(kept + [part]), True
    return compose(kept), True


def left_pad(tokenizer, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), padded on the left so every prompt ends at the last column."""
    encoded = [encode(tokenizer, p) for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    return ids, mask


# positions a decoding cache reserves at a time: a 2,048-token budget regrows its cache 8 times (DynamicLayer: once
# per token) without holding a long budget's room for rows that end early
CACHE_ROOM = 256


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer written in place into room reserved `room` positions at a time.
    DynamicLayer concatenates at every decode step, copying the whole cache of every layer once per token
    (43% of a CPU decode step's time at 64 rows); here a step writes one position and attention reads a view."""

    def __init__(self, room: int):
        super().__init__()
        self.room, self.length, self._k, self._v = room, 0, None, None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self._k is None or self.length + n > self._k.shape[-2]:
            self._reserve(self.length + n + self.room, key_states, value_states)
        self._k[..., self.length:self.length + n, :].copy_(key_states)
        self._v[..., self.length:self.length + n, :].copy_(value_states)
        self.length += n
        self._views()
        return self.keys, self.values

    def _reserve(self, capacity: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        k = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        v = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if self.length:
            k[..., :self.length, :].copy_(self.keys)
            v[..., :self.length, :].copy_(self.values)
        self._k, self._v = k, v

    def _views(self) -> None:
        self.keys, self.values = self._k[..., :self.length, :], self._v[..., :self.length, :]

    def adopt(self, parts: list, width: int) -> None:
        """The layer becomes the rows `index` of each part's (keys, values, index), in that order, right-aligned
        at `width` positions: a part with fewer positions is padded on the left with zeros (masked positions),
        one with more loses its leftmost (masked for all its rows: `regroup` chooses the width)."""
        keys = parts[0][0]
        rows = sum(len(index) for _, _, index in parts)
        k = keys.new_empty((rows, keys.shape[1], width + self.room, keys.shape[-1]))
        v = parts[0][1].new_empty(k.shape)
        start = 0
        for part_keys, part_values, index in parts:
            have, end = min(part_keys.shape[-2], width), start + len(index)
            for buffer, source in ((k, part_keys), (v, part_values)):
                buffer[start:end, :, :width - have].zero_()  # zeros, not garbage: a NaN times a masked weight is NaN
                buffer[start:end, :, width - have:width] = source[:, :, source.shape[-2] - have:].index_select(0, index)
            start = end
        self._k, self._v, self.length = k, v, width
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self._k, self._v = self._k.repeat_interleave(repeats, dim=0), self._v.repeat_interleave(repeats, dim=0)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # checks the argument and shortens the views
        if self.is_initialized and self._k is not None:
            self.length = self.keys.shape[-2]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self._k.device) if self._k is not None else beam_idx)

    def reset(self) -> None:
        super().reset()
        self.length, self._k, self._v = 0, None, None


def decoding_cache(model, room: int) -> DynamicCache:
    """The model's cache with every full-attention layer a GrowingLayer that reserves `room` positions
    beyond the prompt (sliding-window layers stay as they are: they drop old positions anyway)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@torch.inference_mode()
def prefill(model, tokenizer, prompts: list[str], m: int, room: int = 0) -> DecodeState:
    """One forward over the left-padded prompts, then cache, mask and logits repeated m times per prompt;
    the cache reserves `room` positions for the tokens to come."""
    ids, mask = left_pad(tokenizer, prompts, model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = decoding_cache(model, room)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(m)
    return DecodeState(
        cache=cache,
        mask=mask.repeat_interleave(m, dim=0),
        positions=positions[:, -1].repeat_interleave(m) + 1,
        logits=out.logits[:, -1].float().repeat_interleave(m, dim=0),
        rows=list(range(len(prompts) * m)),
    )


@torch.inference_mode()
def step(model, state: DecodeState, tokens: torch.Tensor) -> None:
    """Feeds one token per live row and stores the next-token logits."""
    state.mask = torch.cat([state.mask, state.mask.new_ones(len(tokens), 1)], dim=1)
    out = model(input_ids=tokens[:, None], attention_mask=state.mask, position_ids=state.positions[:, None],
                past_key_values=state.cache, use_cache=True)
    state.positions = state.positions + 1
    state.logits = out.logits[:, -1].float()


def keep_rows(state: DecodeState, keep: torch.Tensor) -> None:
    """Drops finished rows so they cost no more compute."""
    state.cache.batch_select_indices(keep)
    state.mask, state.positions, state.logits = state.mask[keep], state.positions[keep], state.logits[keep]
    state.rows = [state.rows[i] for i in keep.tolist()]


def _right_aligned(t: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, ..., positions, d] → [rows, ..., width, d]: zeros added on the left, or the leftmost positions cut."""
    have = t.shape[-2]
    if have >= width:
        return t[..., have - width:, :]
    return torch.cat([t.new_zeros((*t.shape[:-2], width - have, t.shape[-1])), t], dim=-2)


def regroup(parts: list[tuple[DecodeState, list[int], list[int]]], cache: DynamicCache) -> DecodeState:
    """One batch of the rows `index` of each part (state, index, row ids), in `cache` (the first part's own
    cache, or a new one: a part's cache is read before it is replaced).

    Caches of different lengths are aligned on the right, as left padding aligns prompts: a shorter row gets
    masked positions on its left, and positions that no row attends to any more (the padding of rows gone)
    are cut. A row's positions and mask are its own, so its logits are those it would have in any batch, up
    to float rounding of reductions over more or fewer masked positions."""
    index = [torch.tensor(i, device=state.mask.device) for state, i, _ in parts]
    width = max(int(state.mask.sum(-1)[i].max()) for (state, _, _), i in zip(parts, index))
    for li, layer in enumerate(cache.layers):
        sources = [(state.cache.layers[li].keys, state.cache.layers[li].values, i) for (state, _, _), i in zip(parts, index)]
        if not layer.is_initialized:
            layer.lazy_initialization(sources[0][0], sources[0][1])
        if isinstance(layer, GrowingLayer):
            layer.adopt(sources, width)
            continue
        if type(layer) is DynamicLayer:
            n = width
        elif getattr(layer, "is_sliding", False) and type(layer).__name__ == "DynamicSlidingWindowLayer":
            n, layer.cumulative_length = min(width, layer.sliding_window - 1), width  # it holds the last window only
        else:
            raise NotImplementedError(f"regrouping a {type(layer).__name__} cache layer")
        layer.keys = torch.cat([_right_aligned(k.index_select(0, i), n) for k, _, i in sources])
        layer.values = torch.cat([_right_aligned(v.index_select(0, i), n) for _, v, i in sources])
    mask = torch.cat([_right_aligned(state.mask[i][:, None, :, None], width)[:, 0, :, 0]
                      for (state, _, _), i in zip(parts, index)])
    return DecodeState(cache=cache, mask=mask,
                       positions=torch.cat([state.positions[i] for (state, _, _), i in zip(parts, index)]),
                       logits=torch.cat([state.logits[i] for (state, _, _), i in zip(parts, index)]),
                       rows=[r for _, _, ids in parts for r in ids])


NUCLEUS_K = 256  # most probable tokens ranked per step; the whole vocabulary only when a nucleus is wider


def choose_tokens(logits: torch.Tensor, generators: list, temperature: float, top_p: float) -> torch.Tensor:
    """Greedy at temperature 0, else nucleus sampling with one uniform draw per row from its own generator.

    The nucleus is a prefix of the tokens by falling probability, so ranking the NUCLEUS_K most probable
    (a partial selection) picks the same token as ranking the whole vocabulary (a full sort, several
    times slower per step at a 49k vocabulary) whenever they hold top_p of the mass; only the rows whose
    top NUCLEUS_K hold less are sorted whole."""
    if temperature <= 0:
        return logits.argmax(-1)
    full = torch.softmax(logits / temperature, dim=-1)
    draws = torch.stack([torch.rand((), generator=g) for g in generators]).to(logits.device)
    probs, order = full.topk(min(NUCLEUS_K, full.shape[-1]), dim=-1)
    wide = probs.sum(-1) < top_p if probs.shape[-1] < full.shape[-1] else torch.zeros_like(draws, dtype=torch.bool)
    if not bool(wide.any()):
        return _nucleus_pick(probs, order, draws, top_p)
    chosen = torch.empty(len(draws), dtype=torch.long, device=logits.device)
    narrow = ~wide
    if bool(narrow.any()):
        chosen[narrow] = _nucleus_pick(probs[narrow], order[narrow], draws[narrow], top_p)
    chosen[wide] = _nucleus_pick(*full[wide].sort(dim=-1, descending=True), draws[wide], top_p)
    return chosen


def _nucleus_pick(probs: torch.Tensor, order: torch.Tensor, draws: torch.Tensor, top_p: float) -> torch.Tensor:
    """Token ids drawn from each row's nucleus, given its probabilities by falling value and their ids."""
    probs = probs * ((probs.cumsum(-1) - probs) < top_p)  # the nucleus; the top token always stays
    cumulative = probs.cumsum(-1)
    picked = torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None]).clamp(max=probs.shape[-1] - 1)
    return order.gather(1, picked).squeeze(1)


def eos_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured]) | {tokenizer.eos_token_id}
    return {i for i in ids if i is not None}


class Rows:
    """Per-row decoding state of a batch: tokens so far, which part each row is writing, its budgets.

    A reasoning row writes its reasoning until the separator (detected in its decoded tail) or its
    reasoning budget; at the budget, or at an end-of-sequence before any separator, the decoder writes
    the separator itself (budget forcing, as s1 does for "Final Answer") and the row goes on with its
    response budget. So reasoning and response never compete for one cap, and every reasoning output
    has a response part to judge; `forced` records where the decoder stepped in.
    """

    def __init__(self, tokenizer, n: int, response_tokens: int, reasoning_tokens: int | None):
        self.tokenizer, self.response_tokens, self.reasoning_tokens = tokenizer, response_tokens, reasoning_tokens
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.reasoning = [reasoning_tokens is not None] * n  # still writing the reasoning
        self.queue: list[list[int]] = [[] for _ in range(n)]  # separator tokens still to force
        self.response_start = [0] * n  # index of the first response token
        self.finished, self.forced, self.done = [False] * n, [False] * n, [False] * n
        self.separator = tokenizer(prompts.SEPARATOR, add_special_tokens=False).input_ids
        self.marker = prompts.SEPARATOR.strip()
        self.tail = len(self.separator) + 4  # decoded tail long enough to hold the marker

    def take(self, r: int, token: int, is_end: bool) -> int:
        """Records the token row r chose (or the one forced on it) and returns what it feeds next."""
        forcing = bool(self.queue[r])
        if not forcing and self.reasoning[r] and (is_end or len(self.tokens[r]) >= self.reasoning_tokens):
            self.forced[r], self.queue[r], forcing = True, list(self.separator), True
        if forcing:
            token, is_end = self.queue[r].pop(0), False
        if is_end:
            self.finished[r] = self.done[r] = True
            return token
        self.tokens[r].append(token)
        if self.reasoning[r] and (not self.queue[r] if forcing else self._wrote_marker(r)):
            self.reasoning[r], self.response_start[r] = False, len(self.tokens[r])
        if not self.reasoning[r] and len(self.tokens[r]) - self.response_start[r] >= self.response_tokens:
            self.done[r] = True  # response budget spent: cut, not finished
        return token

    def _wrote_marker(self, r: int) -> bool:
        # the marker can only have been completed by a token whose text holds its last character: the tail
        # is decoded only then, not for every reasoning row at every step
        if not _holds(self.tokenizer, self.tokens[r][-1], self.marker[-1]):
            return False
        return self.marker in self.tokenizer.decode(self.tokens[r][-self.tail:], skip_special_tokens=True)


_pieces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer → {(token, char): bool}


def _holds(tokenizer, token: int, char: str) -> bool:
    """Whether the text of `token` alone contains `char` (an ASCII character), memoized per tokenizer."""
    known = _pieces.setdefault(tokenizer, {})
    key = (token, char)
    if key not in known:
        known[key] = char in tokenizer.decode([token], skip_special_tokens=True)
    return known[key]


class Admission:
    """The queue of (prompt, sample) rows not decoding yet: prompts in queue order, each prefilled once, when
    its first row is admitted, into a pool that keeps one copy of its cache until its m rows have left."""

    def __init__(self, model, tokenizer, prompts: list[str], order: list[int], m: int, max_rows: int, stats):
        self.model, self.tokenizer, self.prompts, self.m, self.stats = model, tokenizer, prompts, m, stats
        self.queue = deque(order)
        self.pools: list[DecodeState] = []  # rows: prompt indices
        self.next = {}  # prompt → its next sample index
        # prompts prefilled together at least: m = 1 (evaluation) would otherwise pay a forward per freed slot
        self.ahead = max(1, math.ceil(max_rows / (4 * m)))

    def __bool__(self) -> bool:
        return bool(self.queue or self.pools)

    def group(self, size: int, room: int) -> DecodeState:
        """A fresh batch: the next `size` prompts prefilled together, m rows each (the sampler's fixed groups)."""
        group = [self.queue.popleft() for _ in range(min(size, len(self.queue)))]
        state = prefill(self.model, self.tokenizer, [self.prompts[i] for i in group], self.m, room)
        state.rows = [i * self.m + j for i in group for j in range(self.m)]
        self.stats.prefill_passes += 1
        return state

    def take(self, free: int) -> list[tuple[DecodeState, list[int], list[int]]]:
        """Up to `free` rows, as `regroup` parts (pool, pool rows, row ids), prefilling the next prompts if needed."""
        waiting = sum(self.m - self.next[p] for pool in self.pools for p in pool.rows)
        if waiting < free and self.queue:
            n = min(len(self.queue), max(self.ahead, math.ceil((free - waiting) / self.m)))
            group = [self.queue.popleft() for _ in range(n)]
            pool = prefill(self.model, self.tokenizer, [self.prompts[i] for i in group], 1)
            pool.rows = group
            self.next.update(dict.fromkeys(group, 0))
            self.pools.append(pool)
            self.stats.prefill_passes += 1
        parts = []
        for pool in self.pools:
            index, ids = [], []
            for i, p in enumerate(pool.rows):
                while self.next[p] < self.m and len(ids) < free:
                    index.append(i)
                    ids.append(p * self.m + self.next[p])
                    self.next[p] += 1
            if ids:
                parts.append((pool, index, ids))
                free -= len(ids)
        self.pools = [pool for pool in self.pools if any(self.next[p] < self.m for p in pool.rows)]
        return parts


def _decode(model, tokenizer, prompts, order, seeds, temperature, top_p, max_new_tokens, reasoning_tokens, max_rows,
            continuous, stats) -> list[Sample]:
    """Samples of every (prompt, sample) row, row i * m + j for sample j of prompt i.

    Without `continuous`, fixed groups of max_rows // m prompts in `order`, each decoded until its last row
    ends. With it, the first group likewise, then a row that ends leaves its slot to the next row of the
    queue: finished rows are fed one more (ignored) token and leave at the next step's regroup, which also
    brings the new rows in, so the cache is copied once for both."""
    m = len(seeds[0])
    generators = [torch.Generator().manual_seed(s) for row in seeds for s in row]
    budget = max_new_tokens + (reasoning_tokens or 0) + SEPARATOR_ALLOWANCE
    room = min(budget, CACHE_ROOM)
    stop = torch.tensor(sorted(eos_ids(model, tokenizer)), device=model.device)
    rows = Rows(tokenizer, len(generators), max_new_tokens, reasoning_tokens)
    waiting = Admission(model, tokenizer, prompts, order, m, max_rows, stats)
    state = None
    while max_new_tokens > 0:
        if state is None and not waiting.pools:
            if not waiting:
                break
            state = waiting.group(max(1, max_rows // m), room)
        live = [] if state is None else [i for i, r in enumerate(state.rows) if not rows.done[r]]
        if continuous and waiting and len(live) < max_rows:
            parts = waiting.take(max_rows - len(live))
            stats.refilled_rows += sum(len(ids) for _, _, ids in parts) if live else 0
            running = [(state, live, [state.rows[i] for i in live])] if live else []
            state = regroup(running + parts, state.cache if live else decoding_cache(model, room))
        stats.peak_rows = max(stats.peak_rows, len(state.rows))
        chosen = choose_tokens(state.logits, [generators[r] for r in state.rows], temperature, top_p)
        ended = torch.isin(chosen, stop).tolist()
        fed = [rows.take(r, tok, end) for r, tok, end in zip(state.rows, chosen.tolist(), ended)]
        live = [i for i, r in enumerate(state.rows) if not rows.done[r]]
        if not live:
            state = None
            continue
        if len(live) < len(state.rows) and not (continuous and waiting):
            keep_rows(state, torch.tensor(live, device=model.device))
            fed = [fed[i] for i in live]
        step(model, state, torch.tensor(fed, device=model.device))
        stats.decode_passes += 1
        stats.row_steps += len(live)
    stats.new_tokens += sum(len(t) for t in rows.tokens)
    return [Sample(tokenizer.decode(t, skip_special_tokens=True), len(t), f, forced)
            for t, f, forced in zip(rows.tokens, rows.finished, rows.forced)]


def length_groups(tokenizer, prompts: list[str], size: int) -> list[list[int]]:
    """Indices of `prompts` in groups of at most `size`, shortest prompts first (by tokens, ties in input
    order): less left padding to prefill and to attend over at every decode step. One group keeps the order."""
    if len(prompts) <= size:
        return [list(range(len(prompts)))]
    order = sorted(range(len(prompts)), key=lambda i: count_tokens(tokenizer, prompts[i]))
    return [order[start:start + size] for start in range(0, len(order), size)]


def sample(model, tokenizer, prompts: list[str], seeds: list[list[int]], *, temperature: float, top_p: float,
           max_new_tokens: int, reasoning_tokens: int | None = None, max_rows: int = 64,
           continuous: bool = True) -> tuple[list[list[Sample]], SamplingStats]:
    """len(seeds[i]) samples of prompts[i] (one per seed, the same number for every prompt), at most
    `max_rows` rows decoding at a time, prompts taken shortest first (`length_groups`; results come back
    in the order of `prompts`). Each prompt is prefilled once for its m rows. Without `continuous`, fixed
    groups of max_rows // m prompts, each decoded until its longest row ends; with it, a finished row's
    slot goes to the next (prompt, sample) at once. The outputs are the same either way: a row's tokens
    depend only on its prompt and its seed's generator.

    `max_new_tokens` caps the response; with `reasoning_tokens` each output is a reasoning of at most
    that many tokens, the separator, then the response (see `Rows`)."""
    stats = SamplingStats(prompts=len(prompts))
    if not prompts:
        return [], stats
    m = len(seeds[0])
    order = [i for group in length_groups(tokenizer, prompts, max(1, max_rows // m)) for i in group]
    out = _decode(model, tokenizer, prompts, order, seeds, temperature, top_p, max_new_tokens, reasoning_tokens,
                  max_rows, continuous, stats)
    return [out[i * m:(i + 1) * m] for i in range(len(prompts))], stats


def prompts_of(tokenizer, chunk, chat: bool, budget: int) -> tuple[list[str], list[bool]]:
    """Rendered prompts of a batch: a `prompt` column as is, or head/items/tail fitted to the budget."""
    if "prompt" in chunk:
        return list(chunk["prompt"]), [False] * len(chunk)
    # the template's own tokens, BOS not counted twice (fit_prompt counts it already)
    overhead = count_tokens(tokenizer, render_chat(tokenizer, "")) - count_tokens(tokenizer, "") if chat else 0
    fitted = [fit_prompt(tokenizer, head, list(items), tail, budget - overhead)
              for head, items, tail in zip(chunk["head"], chunk["items"], chunk["tail"])]
    return [render_chat(tokenizer, text) if chat else text for text, _ in fitted], [cut for _, cut in fitted]


@dataclass(frozen=True)
class SamplingJob:
    """What an executor needs to sample (small and picklable); called by mapInPandas on each partition."""

    ref: str
    env: dict
    id_col: str
    m: int
    iteration: int
    seed: int
    params: dict
    chat: bool
    budget: int
    batch_rows: int
    with_worker_info: bool
    counter: object = None  # a Spark accumulator (embedding.watch) that gets the prompts answered

    def __call__(self, batches):
        import pandas as pd

        settings = models.worker_settings(self.env)
        for pdf in batches:
            model, tokenizer = models.cached_causal_lm(self.ref, settings)  # loaded on the first batch only
            room = self.budget + (self.params["reasoning_tokens"] or 0) + self.params["max_new_tokens"] + 16
            params = {**self.params, "max_rows": models.inference_rows(model, room, self.params["max_rows"])}  # a GPU's rows
            for start in range(0, len(pdf), self.batch_rows):
                chunk = pdf.iloc[start:start + self.batch_rows]
                ids = [str(i) for i in chunk[self.id_col]]
                prompts, truncated = prompts_of(tokenizer, chunk, self.chat, self.budget)
                seeds = [[sample_seed(i, j, self.iteration, self.seed) for j in range(self.m)] for i in ids]
                samples, stats = sample(model, tokenizer, prompts, seeds, **params)
                log.info("sampled %d prompts x %d (%d truncated): %d tokens, %d prefills", len(ids), self.m,
                         sum(truncated), stats.new_tokens, stats.prefill_passes)
                out = pd.DataFrame([
                    {self.id_col: i, "sample_index": j, "seed": seeds[k][j], "text": s.text, "n_tokens": s.n_tokens,
                     "finished": s.finished, "reasoning_forced": s.forced, "prompt_truncated": truncated[k]}
                    for k, i in enumerate(ids) for j, s in enumerate(samples[k])
                ])
                if self.with_worker_info:
                    out["worker_pid"], out["worker_loads"] = os.getpid(), models.load_count(self.ref)
                if self.counter is not None:
                    self.counter.add(len(ids))
                yield out


def progress_partitions(workers: int, prompts: int | None, group: int) -> int:
    """Partitions for a counted generation job: `PROGRESS_STEPS` per worker, fewer when that would leave
    a partition less than one decoding `group` of prompts (when their number is known), never fewer than
    one per worker."""
    from restpg.embedding import PROGRESS_STEPS

    most = workers * PROGRESS_STEPS
    if prompts is None:
        return most
    return max(workers, min(most, math.ceil(prompts / group)))


def generate_df(df, model_ref: str, settings: Settings, *, m: int, temperature: float, top_p: float,
                max_new_tokens: int, iteration: int, seed: int, reasoning_tokens: int | None = None,
                prompt_col: str = "prompt",
                id_col: str = "example_id", chat: bool = False, max_rows: int = 64, with_worker_info: bool = False,
                counter=None, n_prompts: int | None = None, budget: int | None = None):
    """m samples per row → rows (id, sample_index 0..m-1, seed, text, n_tokens, finished, reasoning_forced,
    prompt_truncated). Budgets as in `sample`.

    `prompt_col` is either the rendered prompt (string, used as is) or a struct (head, items, tail) that is
    fitted to `budget` (default `settings.prompt.max_input_tokens`) with the model's own tokenizer on the executor (and
    rendered with the chat template when `chat`); `prompt_truncated` reports which prompts lost profile.
    `with_worker_info` adds each row's worker pid and that worker's model-load count. `counter` (see
    `embedding.watch`) gets the prompts answered; with it the prompts are spread over up to `PROGRESS_STEPS`
    partitions per core so the count moves before the end, but (given their number, `n_prompts`) no
    partition gets less than one decoding group: on a CPU a group of 2 rows makes half the tokens per
    second of a group of 16, so finer progress would cost more than it shows.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import StructType

    ref = models.resolve_ref(model_ref, settings)  # pinned: what the job description and the log name
    path = models.executor_path(ref, settings)  # resolved once on the driver: executors load it, never the registry
    if isinstance(df.schema[prompt_col].dataType, StructType):
        columns = [F.col(f"{prompt_col}.{part}").alias(part) for part in ("head", "items", "tail")]
    else:
        columns = [F.col(prompt_col).alias("prompt")]
    schema = (f"`{id_col}` string, sample_index int, seed long, text string, n_tokens int, finished boolean, "
              "reasoning_forced boolean, prompt_truncated boolean" + (", worker_pid int, worker_loads int" if with_worker_info else ""))
    job = SamplingJob(
        ref=path, env=models.worker_env(settings), id_col=id_col, m=m, iteration=iteration, seed=seed,
        params={"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                "reasoning_tokens": reasoning_tokens, "max_rows": max_rows,
                "continuous": settings.sample.continuous_batching},
        chat=chat, budget=budget or settings.prompt.max_input_tokens, batch_rows=settings.spark.arrow_batch_rows,
        with_worker_info=with_worker_info, counter=counter,
    )
    df.sparkSession.sparkContext.setJobDescription(
        f"restpg sample: {m} x {max_new_tokens} tokens per prompt from {ref}, iteration {iteration}")
    log.info("sampling %d per prompt from %s (temperature %.2f, top-p %.2f)", m, ref, temperature, top_p)
    out = df.select(F.col(id_col).cast("string").alias(id_col), *columns)
    workers = df.sparkSession.sparkContext.defaultParallelism
    partitions = workers if counter is None else progress_partitions(workers, n_prompts, max(1, max_rows // m))
    return by_length(out, partitions, prompt_length(out), id_col).mapInPandas(job, schema)


def prompt_length(df):
    """A prompt's expected length in characters: of the `prompt` column, or of its head, items and tail."""
    from pyspark.sql import functions as F

    if "prompt" in df.columns:
        return F.length("prompt")
    items = F.aggregate("items", F.lit(0), lambda total, item: total + F.length(item))
    return F.length("head") + F.coalesce(items, F.lit(0)) + F.length("tail")


def by_length(df, partitions: int, length, id_col: str):
    """df in `partitions` ranges of `length` (a column), shortest first within each: every Arrow batch, and so
    every `sample` call, gets prompts of similar length (less padding to prefill and to attend over), and a
    partition's prompts are alike too. The ranges cost one sampling pass over df (Spark's range bounds)."""
    return (df.withColumn("_length", length).repartitionByRange(partitions, "_length", id_col)
            .sortWithinPartitions("_length", id_col).drop("_length"))
