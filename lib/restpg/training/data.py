"""Training rows → token features → padded batches, and the order rows are visited in.

One tokenization: the prompt strings in ``training_sets`` are already rendered (chat template
included), and they are encoded exactly as inference encodes them (`generation.encode`, which adds
no second BOS when the rendered text starts with one). A completion longer than the variant's
output budget is dropped and counted, never truncated: the model would learn to stop mid-text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from restpg import generation

IGNORE_INDEX = -100


def build_features(tokenizer, prompt: str, completion: str) -> dict:
    """Token ids of prompt + completion + EOS, and labels with every prompt position masked (-100)."""
    prompt_ids = generation.encode(tokenizer, prompt)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + completion_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids}


@dataclass
class Featurized:
    features: list[dict]  # build_features(...) plus "weight"
    dropped_too_long: int  # rows whose completion exceeds the output budget
    longest_dropped: int = 0  # completion tokens of the longest dropped row
    prompts_over_budget: int = 0  # prompts whose instruction and input alone exceed the budget (kept whole)


def featurize(tokenizer, rows, *, max_prompt_tokens: int, max_completion_tokens: int) -> Featurized:
    """Features of (prompt, completion, weight) rows. A completion over `max_completion_tokens`
    (EOS not counted: the same cap as generation's new tokens) is dropped; a prompt over
    `max_prompt_tokens` is kept as it is and counted: the fitter upstream drops profile items first and
    never cuts the instruction or the input, and inference sees the same prompt whole."""
    features, dropped, longest, over = [], 0, 0, 0
    for prompt, completion, weight in rows:
        f = build_features(tokenizer, prompt, completion)
        n_prompt = f["labels"].count(IGNORE_INDEX)
        over += n_prompt > max_prompt_tokens
        n_completion = len(f["input_ids"]) - n_prompt - 1
        if n_completion > max_completion_tokens:
            dropped, longest = dropped + 1, max(longest, n_completion)
            continue
        features.append({**f, "weight": float(weight)})
    return Featurized(features, dropped, longest, over)


def bucket_length(n: int, buckets) -> int:
    """Smallest bucket ≥ n; past the largest, n rounded up to a multiple of 128 (one more XLA shape)."""
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    return -(-n // 128) * 128


def collate(features: list[dict], weights: list[float], buckets, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the smallest bucket that fits the longest example.

    No attention mask: with right padding a causal model never lets a real token see a pad, and pad
    positions carry label -100, so the mask would change nothing but the graph XLA compiles.
    """
    length = bucket_length(max(len(f["input_ids"]) for f in features), buckets)
    input_ids = torch.full((len(features), length), pad_id, dtype=torch.long)
    labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
    return {"input_ids": input_ids, "labels": labels, "weights": torch.tensor(weights, dtype=torch.float32)}


def length_grouped(indices: list[int], lengths: list[int], micro: int) -> list[list[int]]:
    """One optimizer step's rows cut into micro-batches of similar length (longest first), so each
    micro-batch pads to its own longest row, not the step's. The step still sees the same rows with
    the same weights and one normaliser, so its gradient is unchanged; only padding goes. (`token_grouped`
    with no token bound.)"""
    return token_grouped(indices, lengths, micro, math.inf, ())


def token_grouped(indices: list[int], lengths: list[int], max_rows: int, max_tokens: int, buckets) -> list[list[int]]:
    """One optimizer step's rows, longest first, cut into micro-batches of at most `max_rows` rows whose padded
    size (rows x the bucketed width of their longest) stays within `max_tokens`; a row longer than that goes
    alone. A forward pass's activations grow with its padded tokens, so this bounds a training job's peak
    memory whatever the data's lengths, while short rows still share a pass. As `length_grouped`, the step's
    rows, weights and normaliser are unchanged: so is its gradient."""
    groups: list[list[int]] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        g = groups[-1] if groups else None
        if g and len(g) < max_rows and (len(g) + 1) * bucket_length(lengths[g[0]], buckets) <= max_tokens:
            g.append(i)
        else:
            groups.append([i])
    return groups


def padded_tokens(groups: list[list[int]], lengths: list[int], buckets) -> int:
    """Positions the forward passes of `groups` compute, padding included (collate's bucketed widths)."""
    return sum(len(g) * bucket_length(max(lengths[i] for i in g), buckets) for g in groups if g)


class DataOrder:
    """Row indices without end: a fresh permutation of the n rows every epoch, drawn from one seeded
    generator. A fixed step budget therefore repeats a small training set (epochs > 1) and stops
    part-way through a large one. `state_dict` captures the position exactly, for resuming."""

    def __init__(self, n: int, seed: int):
        self.n, self.generator = n, torch.Generator().manual_seed(seed)
        self.permutation: list[int] = []
        self.position = 0
        self.epoch = 0  # permutations started
        self.taken = 0  # indices handed out in total

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.position == len(self.permutation):
                self.permutation = torch.randperm(self.n, generator=self.generator).tolist()
                self.position, self.epoch = 0, self.epoch + 1
            end = min(len(self.permutation), self.position + k - len(out))
            out += self.permutation[self.position:end]
            self.position = end
        self.taken += k
        return out

    @property
    def epochs(self) -> float:
        """Passes over the data so far (2.5 = every row seen twice, half of them a third time)."""
        return self.taken / self.n

    def state_dict(self) -> dict:
        return {"rng": self.generator.get_state(), "permutation": list(self.permutation), "position": self.position,
                "epoch": self.epoch, "taken": self.taken, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"resume state is for {state['n']} training rows, this job has {self.n}")
        self.generator.set_state(state["rng"])
        self.permutation, self.position = list(state["permutation"]), state["position"]
        self.epoch, self.taken = state["epoch"], state["taken"]
