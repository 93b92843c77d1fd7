"""Budgets sized from the data: `prompt.max_response_tokens: auto` becomes one integer per run.

The response budget is then the smallest one that holds `prompt.response_percentile` percent of the run's
training targets (`policy_inputs.training_inputs`: the train split of `examples`, capped at
`data.max_examples`) together with the end-of-sequence token (`sft_data.fits`), counted in the policy's
tokens, and at most `prompt.max_response_cap`. It depends only on the examples table's version, the
policy, `data.max_examples`, the percentile and the cap, so every stage of a run sees the same number
whether one `restpg pipeline` process runs them all or each is its own Databricks task; a new ingest
changes it, and with it the fingerprints of the stages that read it. The token counts are memoized per
process, so a stage pays for them once.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from restpg.config import AUTO, Settings
from restpg.sft_data import fits
from restpg.tracking import say

SPLITS = ("train", "val", "test")


class Unresolved(LookupError):
    """`auto` cannot be sized yet: no examples table, or no training targets in it."""


@dataclass(frozen=True)
class TargetLengths:
    """Token counts of the targets of one examples table version, in one policy's tokenizer."""
    version: int
    train: tuple[int, ...]  # the run's training inputs (after data.max_examples)
    splits: dict  # split → token counts of every example of that split


_lengths: dict[tuple, TargetLengths] = {}


def is_auto(settings: Settings) -> bool:
    return settings.prompt.max_response_tokens == AUTO


def token_lengths(tokenizer, texts) -> list[int]:
    """Tokens of each text as `sft_data` counts them (no special tokens; end-of-sequence comes on top)."""
    texts = list(texts)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids] if texts else []


def response_budget(lengths, percentile: float, cap: int) -> int:
    """The smallest budget under which `percentile` percent of targets of these token counts fit with
    their end-of-sequence token (the inverted-CDF percentile, + 1), at most `cap`."""
    ordered = sorted(lengths)
    if not ordered:
        raise ValueError("no targets to size a response budget on")
    must_fit = max(1, math.ceil(round(percentile * len(ordered) / 100, 9)))
    return min(cap, ordered[must_fit - 1] + 1)


def over_budget(lengths, budget: int) -> int:
    """How many targets of these token counts a budget drops (`sft_data`'s target_too_long)."""
    return sum(not fits(n, budget) for n in lengths)


def target_lengths(spark, settings: Settings) -> TargetLengths:
    """Token counts of the examples table's targets in the policy's tokenizer, per split and for the
    run's training inputs; computed once per (table, version, policy, data.max_examples) in a process."""
    from restpg import catalog, models
    from restpg.policy_inputs import training_inputs

    if not catalog.exists(spark, settings, "examples"):
        raise Unresolved(f"prompt.max_response_tokens is {AUTO!r}: it is sized from the training targets of the "
                         f"examples table, which has not been written yet: run `restpg ingest` first "
                         f"(or set a number: --set prompt.max_response_tokens=N)")
    r = catalog.ref(settings, "examples")
    version = catalog.version(spark, settings, "examples")
    policy = models.resolve_ref(settings.models.policy, settings)
    key = (r.fqn, r.path, version, policy, settings.data.max_examples)
    if key not in _lengths:
        rows = catalog.read(spark, settings, "examples", version=version).select("example_id", "split", "target").collect()
        train_ids = {t.example_id for t in training_inputs(spark, settings).select("example_id").collect()}
        tokenizer = models.load_tokenizer(policy, settings)
        counts = token_lengths(tokenizer, (row.target for row in rows))
        splits: dict[str, list[int]] = {}
        for row, n in zip(rows, counts):
            splits.setdefault(row.split, []).append(n)
        train = tuple(n for row, n in zip(rows, counts) if row.example_id in train_ids)
        _lengths[key] = TargetLengths(version, train, {k: tuple(v) for k, v in splits.items()})
    return _lengths[key]


def _sized(spark, settings: Settings) -> tuple[int, TargetLengths]:
    p = settings.prompt
    lengths = target_lengths(spark, settings)
    if not lengths.train:
        raise Unresolved(f"prompt.max_response_tokens is {AUTO!r} and examples version {lengths.version} holds no "
                         f"training-split targets (data.max_examples={settings.data.max_examples}) to size it on")
    return response_budget(lengths.train, p.response_percentile, p.max_response_cap), lengths


def resolve(spark, settings: Settings) -> Settings:
    """`settings` with `prompt.max_response_tokens: auto` replaced by the budget sized from the data
    (unchanged when it is a number). Raises `Unresolved` before ingest."""
    if not is_auto(settings):
        return settings
    budget, lengths = _sized(spark, settings)
    p = settings.prompt
    say(f"budgets: response {budget} tokens (p{p.response_percentile:g} of {len(lengths.train)} training targets "
        f"of examples version {lengths.version}, cap {p.max_response_cap})")
    return dataclasses.replace(settings, prompt=dataclasses.replace(p, max_response_tokens=budget))


def describe(spark, settings: Settings) -> str:
    """One summary line: the budgets, how the response budget was chosen, and how many targets of each
    split it drops. `settings` as configured (`auto` or a number)."""
    p = settings.prompt
    lengths = target_lengths(spark, settings)
    if is_auto(settings):
        budget, _ = _sized(spark, settings)
        wanted = response_budget(lengths.train, p.response_percentile, 10**9)
        capped = f" needs {wanted}, capped at" if wanted > p.max_response_cap else ", cap"
        how = f"auto: p{p.response_percentile:g} of {len(lengths.train)} training targets{capped} {p.max_response_cap}"
    else:
        budget, how = p.max_response_tokens, "fixed"
    counted = {"train": lengths.train, **{k: v for k, v in lengths.splits.items() if k != "train"}}
    order = [k for k in SPLITS if k in counted] + sorted(set(counted) - set(SPLITS))
    over = ", ".join(f"{k} {over_budget(counted[k], budget)}/{len(counted[k])}" for k in order)
    return (f"Budgets: response {budget} tokens ({how}), reasoning {p.max_reasoning_tokens} — "
            f"targets over the response budget: {over}")
