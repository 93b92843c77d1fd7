"""Log-probabilities of whole labels (a judge's scores "1".."10") with one prefill per prompt.

A label is scored as a complete answer: its tokens, then a token that ends it. Tokenizers that split
digits (Gemma's, Llama's) write "10" as "1" + "0", so the summed log-probability of the label's tokens
alone can never rank "10" above "1" (log p("1") + log p("0" | "1") ≤ log p("1")). Here "1" only counts
when what follows does not continue the number: p("1" complete) = p("1") · p(end | "1"), and likewise
for every label, with the same end set. A number ends at any token whose text does not start with an
ASCII digit (a newline, a space, punctuation, end-of-turn or EOS), so the events "the answer is 1"
and "the answer is 10" are disjoint and comparable.

The prompts are prefilled once. The candidates' tokens form a trie ("1" is the first node of "10"); its
nodes are appended to every prompt's row in a single forward with a tree attention mask (each node attends
to the prompt and to its own ancestors, never to its siblings), which gives, for every candidate, its
tokens' log-probabilities and the distribution of the token after it without copying the prompt's cache.

Consecutive prompts that share a long token prefix (a judge's m samples of one input share the criteria,
the request and the expected output; only the response differs) are prefilled in two steps: the shared
prefix once per group, then each prompt's own suffix on a copy of the prefix's cache. The tokens fed are
exactly each prompt's own tokens (the prefix is a common prefix of the prompts' token ids, not of their
texts), so the scores equal the one-prompt-at-a-time ones. A candidate is tokenized on its own (no special tokens, no space
added) and appended to the prompt's tokens, so the prompt should end where the label starts (the judge
template ends with a newline; a chat template ends with the assistant turn's header).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from restpg.generation import DecodeState, encode, prefill

DIGITS = frozenset("0123456789")
TREE_ATTENTION = ("sdpa", "eager")  # attention implementations that apply the labels' tree mask
MIN_SHARED = 16  # prompts share a prefill when their token ids agree on at least this many leading tokens
_ends_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer → {vocab_size: mask}


@dataclass
class ScoringStats:
    prompts: int = 0
    prefill_passes: int = 0
    candidate_passes: int = 0
    suffix_passes: int = 0
    shared_tokens: int = 0  # prompt tokens not computed again because a group's prefix was computed once


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


def tree_logprobs(logits: torch.Tensor, tokens: list[int], paths: list[list[int]], ends: torch.Tensor) -> torch.Tensor:
    """[rows, labels] log p(label's tokens, then an end token), from the labels' trie (`label_tree`).

    logits: [rows, 1 + nodes, vocab] next-token logits after the prompt, then after each trie node;
    tokens: each node's token; paths: each label's nodes; ends: [vocab] bool."""
    norm = torch.logsumexp(logits, -1)
    ended = torch.logsumexp(logits.masked_fill(~ends.to(logits.device)[None, None, :], float("-inf")), -1) - norm
    scores = []
    for path in paths:
        before = [0] + [node + 1 for node in path[:-1]]  # the distribution each of the label's tokens is drawn from
        said = logits[:, before, [tokens[node] for node in path]] - norm[:, before]
        scores.append(said.sum(1) + ended[:, path[-1] + 1])
    return torch.stack(scores, dim=1)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(ids: list[list[int]], max_rows: int, min_shared: int = MIN_SHARED) -> list[tuple[list[int], int]]:
    """(prompt indices, shared prefix length) of runs of consecutive prompts whose token ids share at least
    `min_shared` leading tokens, at most `max_rows` prompts each; the prefix leaves every prompt at least
    one token of its own. A prompt that shares nothing is a group of one with prefix 0."""
    groups: list[tuple[list[int], int]] = []
    for i, row in enumerate(ids):
        if groups and len(groups[-1][0]) < max_rows:
            members, shared = groups[-1]
            # within the group's prefix (a lone first prompt: all but its last token), leaving `row` a token too
            n = min(common_prefix(ids[members[0]][:shared or -1], row), len(row) - 1)
            if n >= min_shared:
                groups[-1] = (members + [i], n)
                continue
        groups.append(([i], 0))
    return groups


@torch.inference_mode()
def _prefix_state(model, tokenizer, ids: list[list[int]], groups: list[tuple[list[int], int]],
                  stats: ScoringStats) -> DecodeState:
    """The state after every prompt of `groups`: each group's shared prefix computed once (left-padded), its
    cache copied to the group's prompts, then every prompt's own suffix (left-padded after the prefix)."""
    device, pad = model.device, tokenizer.pad_token_id or 0
    groups = [(members, shared or len(ids[members[0]]) - 1) for members, shared in groups]  # a lone prompt: all but its last token
    heads = [ids[members[0]][:shared] for members, shared in groups]
    width = max(len(h) for h in heads)
    head_ids = torch.tensor([[pad] * (width - len(h)) + h for h in heads], device=device)
    head_mask = torch.tensor([[0] * (width - len(h)) + [1] * len(h) for h in heads], device=device)
    cache = DynamicCache(config=model.config)
    model(input_ids=head_ids, attention_mask=head_mask, position_ids=(head_mask.cumsum(-1) - 1).clamp(min=0),
          past_key_values=cache, use_cache=True, logits_to_keep=1)
    stats.prefill_passes += 1
    owner = [g for g, (members, _) in enumerate(groups) for _ in members]
    cache.batch_select_indices(torch.tensor(owner, device=device))
    rows = [(i, shared) for members, shared in groups for i in members]
    stats.shared_tokens += sum(shared * (len(members) - 1) for members, shared in groups)
    tails = [ids[i][shared:] for i, shared in rows]
    tail_width = max(len(t) for t in tails)
    tail_ids = torch.tensor([[pad] * (tail_width - len(t)) + t for t in tails], device=device)
    tail_mask = torch.tensor([[0] * (tail_width - len(t)) + [1] * len(t) for t in tails], device=device)
    starts = torch.tensor([shared for _, shared in rows], device=device)
    mask = torch.cat([head_mask[owner], tail_mask], dim=1)
    out = model(input_ids=tail_ids, attention_mask=mask,
                position_ids=(starts[:, None] + tail_mask.cumsum(-1) - 1).clamp(min=0),
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    stats.suffix_passes += 1
    return DecodeState(cache=cache, mask=mask, positions=starts + tail_mask.sum(-1), logits=out.logits[:, -1].float(),
                       rows=list(range(len(rows))))


def label_tree(cand: list[list[int]]) -> tuple[list[int], torch.Tensor, list[list[int]]]:
    """The labels' token trie: (token of each node, [nodes, nodes] ancestor-or-self matrix, each label's node
    path). Labels that share leading tokens share nodes ("1" is the first node of "10")."""
    index: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    paths: list[list[int]] = []
    for c in cand:
        path: list[int] = []
        for d in range(len(c)):
            key = tuple(c[: d + 1])
            if key not in index:
                index[key] = len(tokens)
                tokens.append(c[d])
                parents.append(path[-1] if path else -1)
            path.append(index[key])
        paths.append(path)
    ancestors = torch.eye(len(tokens), dtype=torch.bool)
    for i, parent in enumerate(parents):  # a parent is always made before its children
        if parent >= 0:
            ancestors[i] |= ancestors[parent]
    return tokens, ancestors, paths


def _tree_masks(model, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, ancestors: torch.Tensor,
                depth: torch.Tensor):
    """The attention masks, built by the model's own mask functions, for trie nodes appended to a cache: each
    node sees the cached prompt (less its padding) and its own ancestors, not its siblings. A sliding-window
    layer measures the window from the node's position (the prompt's end plus its depth), not from its index
    in the row. One mask per layer type (a dict) for models that mix full and sliding-window layers."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = model.config
    embeds = torch.empty(*ids.shape, 1, dtype=model.dtype, device=ids.device)  # only its shape, dtype, device are read
    ancestors = ancestors.to(ids.device)

    def build(create, layer: int, window: int | None):
        start = cache.get_query_offset(layer)  # the index of the first node, in this layer's indexing

        def tree(batch, head, q, kv):
            node, other = (q - start).clamp(min=0), (kv - start).clamp(min=0)
            seen = kv > start + depth[node] - window if window else kv >= 0
            return torch.where(kv < start, seen, ancestors[node, other])
        # or + and: exactly `tree` wherever the layer's own rule (causal, its window) would differ; padding still applies
        return create(config=config, inputs_embeds=embeds, attention_mask=mask, past_key_values=cache,
                      or_mask_function=tree, and_mask_function=tree, layer_idx=layer)

    types = list(getattr(config, "layer_types", None) or [])
    if "sliding_attention" not in types:
        return build(create_causal_mask, types.index("full_attention") if "full_attention" in types else 0, None)
    masks = {"sliding_attention": build(create_sliding_window_causal_mask, types.index("sliding_attention"),
                                        config.sliding_window)}
    if "full_attention" in types:
        masks["full_attention"] = build(create_causal_mask, types.index("full_attention"), None)
    return masks


@torch.inference_mode()
def _score_state(model, state: DecodeState, cand: list[list[int]], ends: torch.Tensor,
                 stats: ScoringStats) -> torch.Tensor:
    """[prompts, candidates] whole-label log-probabilities from the state after each prompt (one row each).

    The labels' token trie is appended to each prompt's row in one forward, with a tree attention mask (a node
    attends to the prompt and its ancestors), so the prompt's cache is used once, not copied per label."""
    tokens, ancestors, paths = label_tree(cand)
    device, rows = model.device, len(state.rows)
    depth = ancestors.sum(1).to(device) - 1
    ids = torch.tensor([tokens] * rows, device=device)
    mask = torch.cat([state.mask, torch.ones_like(ids)], dim=1)
    out = model(input_ids=ids, attention_mask=_tree_masks(model, ids, mask, state.cache, ancestors, depth),
                position_ids=state.positions[:, None] + depth[None, :], past_key_values=state.cache, use_cache=True)
    stats.candidate_passes += 1
    logits = torch.cat([state.logits[:, None], out.logits.float()], dim=1)  # after the prompt, after each node
    return tree_logprobs(logits, tokens, paths, ends)


@torch.inference_mode()
def _score_group(model, tokenizer, prompts: list[str], cand: list[list[int]], ends: torch.Tensor,
                 stats: ScoringStats) -> torch.Tensor:
    """[prompts, candidates] whole-label log-probabilities, the prompts prefilled whole."""
    state = prefill(model, tokenizer, prompts, 1)
    stats.prefill_passes += 1
    return _score_state(model, state, cand, ends, stats)


def score_candidates(model, tokenizer, prompts: list[str], candidates: list[str], max_rows: int = 64,
                     ends: torch.Tensor | None = None, share: bool = True) -> tuple[list[dict[str, float]], ScoringStats]:
    """{candidate: log p(candidate as a whole answer | prompt)} per prompt; one prefill per group of
    max_rows // len(candidates) prompts (the logits kept per prompt grow with the candidates). `ends`
    (default `number_ends`) is the set of tokens that end a candidate, the same for every candidate. With
    `share`, consecutive prompts with a common token prefix of at least MIN_SHARED tokens compute it once
    (`prefix_groups`)."""
    attention = model.config._attn_implementation
    if attention not in TREE_ATTENTION:  # flash-attention kernels take no arbitrary mask: the labels would see each other
        raise ValueError(f"scoring labels needs an attention that applies a mask ({', '.join(TREE_ATTENTION)}), not {attention!r}")
    stats = ScoringStats(prompts=len(prompts))
    cand = candidate_ids(tokenizer, candidates)
    if ends is None:
        ends = number_ends(tokenizer, model.get_output_embeddings().weight.shape[0])
    per_group = max(1, max_rows // len(cand))
    ids = [encode(tokenizer, p) for p in prompts] if share else None
    groups = prefix_groups(ids, per_group) if share else [([i], 0) for i in range(len(prompts))]
    scores: list[dict[str, float]] = []
    batch: list[tuple[list[int], int]] = []
    for k, group in enumerate(groups):
        batch.append(group)
        rows = sum(len(members) for members, _ in batch)
        following = len(groups[k + 1][0]) if k + 1 < len(groups) else None
        if following is not None and rows + following <= per_group:
            continue
        if all(len(members) == 1 for members, _ in batch) or any(len(ids[members[0]]) < 2 for members, _ in batch):
            table = _score_group(model, tokenizer, [prompts[members[0]] for members, _ in batch], cand, ends, stats)
        else:
            table = _score_state(model, _prefix_state(model, tokenizer, ids, batch, stats), cand, ends, stats)
        scores += [dict(zip(candidates, row)) for row in table.tolist()]
        batch = []
    return scores, stats
