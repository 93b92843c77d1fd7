"""Rewards as plain functions no stage owns (Algorithm 1, line 6): the LLM judge of paper Fig. 6 (the
criterion whose score the judge finds most probable, / the top score) and the local embedding cosine.

Optionally a composite (the PAT review's response quality + style fidelity + topic relevance), on when
`judge.style_weight` or `judge.topic_weight` is above 0: reward = (quality + w_s·style + w_t·topic) /
(1 + w_s + w_t), where quality is the configured reward above, `style_fidelity` compares the response's
stylometric rates with those of the user's own text for this request (the expected output) and
`topic_relevance` is the retriever cosine of the response and the request, floored at 0. Every term is
stored (`reward_terms`); the reward kind then names its weights (`kind_label`), so scores made under
other weights never pass for these.

Every reward sees a response only — callers strip the reasoning first — and an empty response gets
reward 0.0 under both kinds without a model call. `score` runs in process (checkpoint selection),
`add_rewards` is the same computation as a Spark column helper (judge, evaluate, validate_reward).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np
import pandas as pd

from restpg import models, prompts
from restpg.config import Settings

KINDS = ("llm", "embedding")
REWARD_FIELDS = "reward double, score int, criterion_logprobs map<string,double>, reward_terms map<string,double>"
TERMS = ("quality", "style", "topic")
_CRITERION = re.compile(r"^Score (\d+): (.+)$")
_PROMPT_MARK = "=== prompt ==="


class JudgeTemplateError(ValueError):
    """`judge.scores` and the judge template's criteria do not agree."""


@dataclass(frozen=True)
class JudgeTemplate:
    prompt: str          # with {criteria}, {input}, {target}, {response}
    criteria: dict       # score → description, as the template file lists them
    scores: tuple        # the configured scores: the criteria shown and the labels scored
    version: str

    @property
    def labels(self) -> list[str]:
        return [str(s) for s in self.scores]

    def render(self, input_text: str, target: str, response: str) -> str:
        lines = "\n".join(f"Score {s}: {self.criteria[s]}" for s in self.scores)
        return self.prompt.format(criteria=lines, input=input_text, target=target, response=response)


@dataclass(frozen=True)
class Judgement:
    reward: float
    score: int | None = None                     # llm only
    criterion_logprobs: dict | None = None       # llm only: label → whole-label log-probability
    terms: dict | None = None                    # quality (and style, topic when composite) of the reward


def parse_criteria(text: str) -> tuple[dict[int, str], str]:
    """(score → description, prompt) of a judge template file: `Score N: …` lines, then the prompt."""
    head, mark, prompt = text.partition(f"\n{_PROMPT_MARK}\n")
    if not mark:
        raise JudgeTemplateError(f"judge template has no '{_PROMPT_MARK}' line after its criteria")
    criteria = {}
    for line in filter(str.strip, head.splitlines()):
        m = _CRITERION.match(line.strip())
        if not m:
            raise JudgeTemplateError(f"judge template criterion line {line!r} is not 'Score N: description'")
        criteria[int(m.group(1))] = m.group(2).strip()
    if "{criteria}" not in prompt:
        raise JudgeTemplateError("judge template prompt has no {criteria} slot")
    return criteria, prompt


@lru_cache(maxsize=None)
def judge_template(scores: tuple) -> JudgeTemplate:
    """The judge template with the configured scores; every score needs a criterion in the file, so the
    prompt shows exactly the scores whose labels are compared."""
    t = prompts.template("judge")
    criteria, prompt = parse_criteria(t.text)
    if len(scores) < 2 or len(set(scores)) != len(scores) or not all(isinstance(s, int) and s > 0 for s in scores):
        raise JudgeTemplateError(f"judge.scores {list(scores)} must be at least two distinct positive integers")
    missing = [s for s in scores if s not in criteria]
    if missing:
        raise JudgeTemplateError(
            f"judge.scores {list(scores)} has no criterion for {missing} in {t.version} (it describes "
            f"{sorted(criteria)}): add 'Score N: description' lines to templates/judge.*.txt or change judge.scores")
    return JudgeTemplate(prompt, criteria, tuple(scores), t.version)


def pick_score(logprobs: dict[str, float], scores: list[int]) -> int:
    """The criterion whose label is most probable; ties go to the lower score."""
    return max(scores, key=lambda s: (logprobs[str(s)], -s))


def style_fidelity(response: str, reference: str) -> float:
    """How alike two texts are written, in [0, 1]: 1 minus the mean relative difference |a - b| / (|a| + |b|)
    of their stylometric rates (`user_profiles.style_features`: sentence and word length, punctuation,
    function words; no content words), a feature both texts lack counting as equal. 0 for an empty text."""
    from restpg.user_profiles import style_features

    if is_empty(response) or is_empty(reference):
        return 0.0
    a, b = style_features([response]), style_features([reference])
    total = np.abs(a) + np.abs(b)
    diff = np.divide(np.abs(a - b), total, out=np.zeros_like(total), where=total > 0)
    return float(1.0 - diff.mean())


def topic_relevance(response_vec, request_vec) -> float:
    """Cosine of the (unit) embeddings of the response and the request, floored at 0."""
    return max(0.0, float(np.dot(response_vec, request_vec)))


def weights(settings: Settings) -> dict:
    """{term: weight} of the reward; quality's weight is 1, the others relative to it."""
    return {"quality": 1.0, "style": float(settings.judge.style_weight), "topic": float(settings.judge.topic_weight)}


def composite(terms: dict, weights_: dict) -> float:
    """The weighted mean of the terms."""
    total = sum(weights_[k] for k in terms)
    return sum(weights_[k] * v for k, v in terms.items()) / total


def kind_label(settings: Settings) -> str:
    """The reward kind rows are stored under: 'llm' | 'embedding', or with a composite its weights
    ('llm+style=0.2+topic=0.3')."""
    w = weights(settings)
    if not (w["style"] or w["topic"]):
        return settings.judge.reward
    return f"{settings.judge.reward}+style={w['style']:g}+topic={w['topic']:g}"


def judge_model(settings: Settings) -> str:
    """The model behind the configured reward: the judge LLM or the embedding model."""
    return settings.models.judge if settings.judge.reward == "llm" else settings.models.retriever


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown reward {kind!r}: {' | '.join(KINDS)}")


def is_empty(response) -> bool:
    return not (response or "").strip()


def fit_judge_prompt(tokenizer, template: JudgeTemplate, input_text: str, target: str, response: str, budget: int) -> str:
    """The rendered judge prompt within `budget` tokens: target and response are cut together, from the end
    (the instruction is never cut, so an instruction longer than the budget alone still overflows)."""
    from restpg import generation

    text = generation.render_chat(tokenizer, template.render(input_text, target, response))
    while generation.count_tokens(tokenizer, text) > budget and (target or response):
        target, response = target[: int(len(target) * 0.8)], response[: int(len(response) * 0.8)]
        text = generation.render_chat(tokenizer, template.render(input_text, target, response))
    return text


def score_labels(model, tokenizer, prompts_: list[str], scores: tuple, max_rows: int = 64) -> list[dict[str, float]]:
    """{label: log-probability of the label as the judge's whole answer} per rendered judge prompt."""
    from restpg import scoring

    return scoring.score_candidates(model, tokenizer, prompts_, [str(s) for s in scores], max_rows)[0]


def judge_with(model, tokenizer, prompts_: list[str], scores: tuple, max_rows: int = 64) -> list[Judgement]:
    """Judgements of rendered judge prompts: the most probable criterion, reward = score / top score."""
    out = []
    for lp in score_labels(model, tokenizer, prompts_, scores, max_rows):
        s = pick_score(lp, list(scores))
        out.append(Judgement(s / max(scores), s, lp))
    return out


def _cosines(responses: list[str], targets: list[str], ref: str, model_settings: Settings, *others: list[str]):
    """Cosine of each response with its target under `ref`; with `others` (more lists of texts), one list of
    cosines per list, the responses embedded once."""
    from restpg.embedding import embed_with

    embedder = models.cached_embedder(ref, model_settings)
    a = embed_with(embedder, responses)
    sims = [[float(x) for x in np.sum(a * embed_with(embedder, b), axis=1)] for b in (targets, *others)]
    return sims if others else sims[0]


JUDGE_LABEL_TOKENS = 8  # a criterion label and what ends it, scored after the prompt


def _llm(ref: str, model_settings: Settings, scores: tuple, budget: int, inputs, targets, responses) -> list[Judgement]:
    model, tokenizer = models.cached_causal_lm(ref, model_settings)
    template = judge_template(scores)
    texts = [fit_judge_prompt(tokenizer, template, i or "", t or "", r, budget) for i, t, r in zip(inputs, targets, responses)]
    # the prompts of one request side by side, so their shared prefix is computed once (scoring.prefix_groups)
    order = sorted(range(len(texts)), key=lambda k: (inputs[k] or "", targets[k] or ""))
    rows = models.inference_rows(model, budget + JUDGE_LABEL_TOKENS, 64)  # a GPU's rows from its memory; 64 on CPUs
    judged = judge_with(model, tokenizer, [texts[k] for k in order], scores, rows)
    out: list = [None] * len(texts)
    for k, j in zip(order, judged):
        out[k] = j
    return out


def reward_rows(kind: str, ref: str, model_settings: Settings, scores: tuple, budget: int,
                inputs: list[str], targets: list[str], responses: list[str], weights_: dict | None = None,
                retriever: str | None = None) -> list[Judgement]:
    """One judgement per row; empty responses get 0.0 and no model is loaded for them. With `weights_`
    giving style or topic a weight, the reward is their `composite` with the quality reward (topic needs
    the `retriever`)."""
    _check_kind(kind)
    out = [Judgement(0.0, terms={"quality": 0.0})] * len(responses)
    todo = [i for i, r in enumerate(responses) if not is_empty(r)]
    on = bool(weights_) and bool(weights_.get("style") or weights_.get("topic"))
    if on:
        out = [Judgement(0.0, terms=dict.fromkeys(TERMS, 0.0))] * len(responses)
    if not todo:
        return out
    pick = lambda xs: [xs[i] for i in todo]  # noqa: E731
    responses_, targets_, inputs_ = pick(responses), [t or "" for t in pick(targets)], [t or "" for t in pick(inputs)]
    topic = None
    if kind == "embedding" and on and retriever == ref:  # one model: the responses are embedded once for both terms
        quality, topic = _cosines(responses_, targets_, ref, model_settings, inputs_)
        done = [Judgement(c) for c in quality]
    elif kind == "embedding":
        done = [Judgement(c) for c in _cosines(responses_, targets_, ref, model_settings)]
    else:
        done = _llm(ref, model_settings, scores, budget, pick(inputs), pick(targets), responses_)
    if on:
        topic = topic if topic is not None else _cosines(responses_, inputs_, retriever, model_settings)
        styles = [style_fidelity(r, t or "") for r, t in zip(pick(responses), pick(targets))]
        done = [Judgement(composite(terms, weights_), j.score, j.criterion_logprobs, terms)
                for j, s_, c in zip(done, styles, topic)
                for terms in [{"quality": j.reward, "style": s_, "topic": max(0.0, c)}]]
    else:
        done = [Judgement(j.reward, j.score, j.criterion_logprobs, {"quality": j.reward}) for j in done]
    for i, j in zip(todo, done):
        out[i] = j
    return out


def embedding_rewards(responses: list[str], targets: list[str], ref: str, env: dict) -> list[float]:
    """Embedding reward: cosine of response and expected output under `ref` (0.0 for an empty response)."""
    rows = reward_rows("embedding", ref, models.worker_settings(env), (), 0, [""] * len(responses), targets, responses)
    return [j.reward for j in rows]


def score(settings: Settings, inputs: list[str], targets: list[str], responses: list[str]) -> list[float]:
    """Rewards of responses (reasoning already stripped) in this process, under `settings.judge.reward`;
    models come through the per-process caches of `restpg.models`."""
    if not len(inputs) == len(targets) == len(responses):
        raise ValueError(f"inputs, targets and responses differ in length: {len(inputs)}, {len(targets)}, {len(responses)}")
    rewarder = Rewarder.from_settings(settings, convert=False)
    rows = reward_rows(rewarder.kind, rewarder.ref, settings, rewarder.scores, rewarder.budget,
                       list(inputs), list(targets), list(responses), dict(rewarder.weights), rewarder.retriever)
    return [j.reward for j in rows]


@dataclass(frozen=True)
class Rewarder:
    """The configured reward, small enough to ship to the executors (models load there, once per worker)."""
    kind: str
    ref: str                      # pinned model reference
    scores: tuple
    budget: int
    template_version: str | None  # llm only
    env: dict
    weights: tuple = ()           # ((term, weight), ...): the composite's, empty when off
    retriever: str | None = None  # pinned embedding model of the topic term
    label: str = ""               # the stored reward kind (`kind_label`)
    paths: tuple = ()             # ((pinned ref, `models.executor_path`), ...): what executors load

    @classmethod
    def from_settings(cls, settings: Settings, convert: bool = True) -> "Rewarder":
        """Checks the reward's configuration (judge.scores against the template) before any model loads."""
        kind, scores = settings.judge.reward, tuple(settings.judge.scores)
        _check_kind(kind)
        version = judge_template(scores).version if kind == "llm" else None
        ref = models.resolve_ref(judge_model(settings), settings)
        refs = [ref]
        w, retriever = weights(settings), None
        if w["style"] or w["topic"]:
            retriever = models.resolve_ref(settings.models.retriever, settings)
            refs.append(retriever)
        # resolved, converted or downloaded once, on the driver: executors load the paths, never the registry
        paths = tuple((r, models.executor_path(r, settings)) for r in dict.fromkeys(refs)) if convert else ()
        return cls(kind, ref, scores, settings.judge.max_input_tokens, version, models.worker_env(settings),
                   tuple(w.items()) if retriever else (), retriever, kind_label(settings), paths)

    def assign(self, pdf: pd.DataFrame) -> pd.DataFrame:
        """pdf with input, target, response + reward, score, criterion_logprobs, reward_terms (on an executor)."""
        path = dict(self.paths)
        rows = reward_rows(self.kind, path.get(self.ref, self.ref), models.worker_settings(self.env), self.scores,
                           self.budget, pdf["input"].tolist(), pdf["target"].tolist(), pdf["response"].tolist(),
                           dict(self.weights), path.get(self.retriever, self.retriever))
        return pdf.assign(reward=[j.reward for j in rows], score=pd.array([j.score for j in rows], dtype="Int32"),
                          criterion_logprobs=[j.criterion_logprobs for j in rows], reward_terms=[j.terms for j in rows])

    def with_lineage(self, df):
        """+ reward_kind, judge_model, template_version."""
        from pyspark.sql import functions as F

        return (df.withColumn("reward_kind", F.lit(self.label or self.kind)).withColumn("judge_model", F.lit(self.ref))
                .withColumn("template_version", F.lit(self.template_version).cast("string")))


def add_rewards(spark, settings: Settings, df):
    """df with input, target, response → + reward, score, criterion_logprobs, reward_terms, reward_kind,
    judge_model, template_version. Rows are rewarded by batch on the executors, the model loaded once per worker."""
    from pyspark.sql.types import StructType, _parse_datatype_string

    rewarder = Rewarder.from_settings(settings)

    def rewarded(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            yield rewarder.assign(pdf)

    schema = StructType(df.schema.fields + _parse_datatype_string(REWARD_FIELDS).fields)
    spark.sparkContext.setJobDescription(f"restpg rewards: {rewarder.kind} with {rewarder.ref}")
    return rewarder.with_lineage(df.mapInPandas(rewarded, schema))
