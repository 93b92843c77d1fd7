"""Prompt templates are versioned files in `restpg/templates`; rows record `name@version#hash`."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from restpg import tasks, variants

SEPARATOR = "\n=== Response ===\n"
TEMPLATES = {"policy_reasoning": "v2", "policy_plain": "v1", "teacher_reasoning": "v2", "judge": "v2",
             "policy_pat": "v1", "policy_pat_refine": "v1", "teacher_pat": "v1"}
# The labelled one-line parts a reasoning path is made of, in order, by the teacher template that asks for them
# (its prompt ends with the first label, so its answer continues it). `sft_data` leaves out a path without them.
SLOTS = {"teacher_reasoning": ("Style:", "Topics:", "Plan:"), "teacher_pat": ("Style:", "Topic:", "Merged:")}


@dataclass(frozen=True)
class Template:
    name: str
    text: str
    version: str  # name@v1#content-hash: an edited file never passes for the old version

    def parts(self, **values) -> tuple[str, str]:
        """(head, tail) around the {profile} slot, so the profile side can be truncated alone."""
        head, tail = self.text.split("{profile}")
        return head.format(**values), tail.format(**values)

    def render(self, **values) -> str:
        return self.text.format(**values)


@lru_cache(maxsize=None)
def template(name: str) -> Template:
    version = TEMPLATES[name]
    text = (resources.files("restpg") / "templates" / f"{name}.{version}.txt").read_text()
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return Template(name, text, f"{name}@{version}#{digest}")


def uses_reasoning(variant: str) -> bool:
    return variants.uses_reasoning(variant)


def policy_template(variant: str) -> Template:
    return template("policy_reasoning" if uses_reasoning(variant) else "policy_plain")


def format_items(texts: list[str], max_chars: int) -> list[str]:
    """Numbered items, each ending in its own newline (the fitter drops whole items from the end)."""
    return [f"[{i + 1}] {t[:max_chars].strip()}\n" for i, t in enumerate(texts)]


def policy_parts(variant: str, task: str, input_text: str, item_texts: list[str], max_item_chars: int):
    """(head, items, tail) of the policy input; the caller fits it to the token budget."""
    spec = tasks.resolve(task)
    head, tail = policy_template(variant).parts(instruction=spec.instruction, input=input_text)
    return head, format_items(item_texts, max_item_chars), tail


def teacher_parts(input_text: str, target: str, item_texts: list[str], max_item_chars: int,
                  max_target_chars: int = 0, name: str = "teacher_reasoning"):
    """(head, items, tail) of a teacher prompt: items one line each, '|'-separated; the expected output cut
    to `max_target_chars` (0: whole), so a long one cannot push the profile out of the teacher's budget."""
    cut = target[:max_target_chars].rstrip() if max_target_chars and len(target) > max_target_chars else target
    head, tail = template(name).parts(input=input_text, target=cut)
    return head, [t[:max_item_chars].replace("\n", " ").strip() + " | " for t in item_texts], tail


def split_reasoning(raw: str) -> tuple[str | None, str, bool]:
    """(reasoning, response, separator_found); without the separator the whole text is the response."""
    marker = SEPARATOR.strip()
    if marker in raw:
        reasoning, response = raw.split(marker, 1)
        return reasoning.strip(), response.strip(), True
    return None, raw.strip(), False


def join_reasoning(reasoning: str, response: str) -> str:
    return f"{reasoning.strip()}{SEPARATOR}{response.strip()}"


# Why an output is unusable (format_ok = false: reward 0, never kept, an empty response at evaluation).
# The paper's judge sees the response only; an output whose reasoning and response cannot be told apart,
# that skipped the reasoning, or that has no response has nothing to judge. An output cut at the length
# cap (plain or reasoning variant alike) never ended: kept, it would teach the policy not to stop, and
# judged, it would let a variant gain by rambling past its budget. A reasoning whose separator the decoder
# wrote (it reached its budget or ended before one: `generation.Sample.forced`) is a cut or a failed
# format that budget forcing only made look whole, and a response holding the separator again does not
# end where the format says: kept, either would teach the policy exactly that.
NO_SEPARATOR, EMPTY_REASONING, EMPTY_RESPONSE, LENGTH_CAP = "no_separator", "empty_reasoning", "empty_response", "length_cap"
FORCED_SEPARATOR, DOUBLE_SEPARATOR = "forced_separator", "double_separator"
FORMAT_ISSUES = (NO_SEPARATOR, EMPTY_REASONING, EMPTY_RESPONSE, LENGTH_CAP, FORCED_SEPARATOR, DOUBLE_SEPARATOR)


@dataclass(frozen=True)
class Output:
    reasoning: str | None  # None for plain variants and outputs without the separator
    response: str          # what the judge compares with the expected output ("" when not format_ok)
    format_ok: bool
    format_issue: str | None  # one of FORMAT_ISSUES, None when format_ok


SEPARATOR_ALLOWANCE = 8  # tokens the separator line may take in any tokenizer


def output_budget(variant: str, max_reasoning_tokens: int, max_response_tokens: int) -> int:
    """Generated-token cap of a variant: the response budget for plain variants; reasoning budget +
    separator + response budget for reasoning variants, so the two never compete for one cap."""
    if not uses_reasoning(variant):
        return max_response_tokens
    return max_reasoning_tokens + SEPARATOR_ALLOWANCE + max_response_tokens


def parse_output(variant: str, raw: str, finished: bool = True, forced: bool = False) -> Output:
    """Split a policy output into reasoning and response and check its format.

    Every output must have stopped on its own (end-of-sequence) rather than at the length cap, the same
    rule for plain and reasoning variants so they compare like with like. Plain variants: the whole
    text is the response and must not be empty. Reasoning variants also need the separator, written by
    the policy itself (`forced`: the decoder wrote it) and only once, a non-empty reasoning before it and
    a non-empty response after it. The first issue found is reported: no separator, forced, double,
    empty reasoning, empty response, length cap."""
    raw = raw or ""
    if not uses_reasoning(variant):
        issue = EMPTY_RESPONSE if not raw.strip() else LENGTH_CAP if not finished else None
        return Output(None, "" if issue else raw.strip(), issue is None, issue)
    reasoning, response, found = split_reasoning(raw)
    issue = (NO_SEPARATOR if not found else FORCED_SEPARATOR if forced
             else DOUBLE_SEPARATOR if SEPARATOR.strip() in response else EMPTY_REASONING if not reasoning
             else EMPTY_RESPONSE if not response else LENGTH_CAP if not finished else None)
    if issue:
        return Output(reasoning, "", False, issue)
    return Output(reasoning, response, True, None)
