"""Checkpoint selection as in the paper (Appendix B): the checkpoint kept is the trained one whose
own outputs earn the highest mean reward on a fixed sample of validation inputs. The untrained start
(step 0) is scored too, as the baseline of the curve, but is never kept (`trainer.fit`).

The sample is the `train.selection_examples` validation examples with the lowest hash of their
example id — the same inputs for every training job of a run, whatever its variant or iteration, so
their curves compare. Each input gets one output at the evaluation temperature, capped at the
variant's output budget; an output whose format is not ok (`prompts.parse_output`: a reasoning variant
without its own separator — the decoder wrote it — or with it twice, or cut off at the cap) earns 0,
and the response alone is rewarded against the target.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

from restpg import generation, prompts
from restpg.config import Settings

Score = Callable[[Settings, list, list, list], list]  # rewards.score(settings, inputs, targets, responses)
SELECTION_SEED_ITERATION = -1  # seeds of selection outputs: apart from every E-step's, equal for every job


@dataclass(frozen=True)
class SelectionSample:
    example_ids: list[str]
    prompts: list[str]  # rendered policy prompts of the variant
    inputs: list[str]
    targets: list[str]


def selection_sample(spark, settings: Settings, variant: str) -> SelectionSample:
    """The fixed validation sample with the variant's prompts, collected on the driver (it is small)."""
    from pyspark.sql import functions as F

    from restpg import catalog, policy_inputs

    n = settings.train.selection_examples
    if n <= 0:
        return SelectionSample([], [], [], [])
    val = catalog.read(spark, settings, "examples").where(F.col("split") == "val")
    picked = val.orderBy(F.sha2(F.col("example_id"), 256)).limit(n).select("example_id", "input", "target").collect()
    if not picked:
        raise ValueError("checkpoint selection needs validation inputs, and examples has no split='val' row; "
                         "set train.selection_examples=0 to keep the last step instead")
    ids = sorted(r.example_id for r in picked)
    by_id = {r.example_id: r for r in picked}
    rendered = policy_inputs.policy_prompts(spark, settings, val.where(F.col("example_id").isin(ids)), variant)
    prompt_of = {r.example_id: r.prompt for r in rendered.select("example_id", "prompt").collect()}
    return SelectionSample(ids, [prompt_of[i] for i in ids], [by_id[i].input for i in ids], [by_id[i].target for i in ids])


def weights_digest(model, stride: int = 997) -> str:
    """A fingerprint of the model's weights: every parameter's name, shape and every `stride`-th value.
    An optimizer step moves (nearly) every weight, so two states with one digest are the same state."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(p.detach().reshape(-1)[::stride].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()


# Selection results of one process by (weights, what was asked): every M-step of a run restarts from the same
# base (train.restart_from = base), so its step-0 baseline is the same generation and reward each time.
_memo: dict[tuple, tuple[float, dict]] = {}
MEMO_SIZE = 32


class Selector:
    """`selector(model)` → the mean reward of the model's outputs on the sample; `last` keeps the
    outputs and rewards of the latest call. A state already scored in this process with the same
    sample, decoding and reward (the shared start of every M-step) is not generated again."""

    def __init__(self, sample: SelectionSample, tokenizer, settings: Settings, variant: str,
                 score: Score | None = None, max_rows: int = 16):
        self.sample, self.tokenizer, self.settings, self.variant = sample, tokenizer, settings, variant
        if score is None:  # imported here, so that a missing reward fails before any training
            from restpg import rewards

            score = rewards.score
        self.score, self.max_rows = score, max_rows
        self.seeds = [[generation.sample_seed(i, 0, SELECTION_SEED_ITERATION, settings.sample.seed)]
                      for i in sample.example_ids]
        self.last: dict = {}

    def _key(self, model) -> tuple:
        from restpg import rewards

        s = self.settings
        return (weights_digest(model), type(model).__name__, tuple(self.sample.prompts), tuple(self.sample.targets),
                tuple(map(tuple, self.seeds)), s.evaluate.temperature, s.evaluate.top_p,
                tuple(sorted(generation.limits(s, self.variant).items())), prompts.uses_reasoning(self.variant),
                rewards.kind_label(s), rewards.judge_model(s), tuple(s.judge.scores), self.score)

    def __call__(self, model) -> float:
        key = self._key(model)
        if key in _memo:
            reward, last = _memo[key]
            self.last = dict(last)
            return reward
        reward = self._generate_and_score(model)
        while len(_memo) >= MEMO_SIZE:
            _memo.pop(next(iter(_memo)))  # the oldest first
        _memo[key] = (reward, dict(self.last))
        return reward

    def _generate_and_score(self, model) -> float:
        s = self.settings
        samples, _ = generation.sample(model, self.tokenizer, self.sample.prompts, self.seeds,
                                       temperature=s.evaluate.temperature, top_p=s.evaluate.top_p,
                                       max_rows=self.max_rows, continuous=s.sample.continuous_batching,
                                       **generation.limits(s, self.variant))
        outputs = [prompts.parse_output(self.variant, group[0].text, group[0].finished, group[0].forced)
                   for group in samples]
        responses = [o.response if o.format_ok else "" for o in outputs]
        scored = self.score(s, self.sample.inputs, self.sample.targets, responses)
        rewards = [float(r) if o.format_ok else 0.0 for o, r in zip(outputs, scored)]
        self.last = {"responses": responses, "rewards": rewards, "format_ok": [o.format_ok for o in outputs]}
        return sum(rewards) / len(rewards)
