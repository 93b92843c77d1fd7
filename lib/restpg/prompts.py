"""Prompt templates are versioned files in `restpg/templates`; rows record `name@version#hash`."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from restpg import tasks

SEPARATOR = "\n=== Response ===\n"
REASONING_VARIANTS = ("sft_reasoning", "rest_pg")
TEMPLATES = {"policy_reasoning": "v1", "policy_plain": "v1", "teacher_reasoning": "v1", "judge": "v1"}


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
    return variant.split(":")[0] in REASONING_VARIANTS


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


def teacher_parts(input_text: str, target: str, item_texts: list[str], max_item_chars: int):
    head, tail = template("teacher_reasoning").parts(input=input_text, target=target)
    return head, [t[:max_item_chars].replace("\n", " ").strip() + " | " for t in item_texts], tail


def judge_prompt(input_text: str, target: str, response: str) -> str:
    return template("judge").render(input=input_text, target=target, response=response)


def split_reasoning(raw: str) -> tuple[str | None, str, bool]:
    """(reasoning, response, separator_found); without the separator the whole text is the response."""
    marker = SEPARATOR.strip()
    if marker in raw:
        reasoning, response = raw.split(marker, 1)
        return reasoning.strip(), response.strip(), True
    return None, raw.strip(), False


def join_reasoning(reasoning: str, response: str) -> str:
    return f"{reasoning.strip()}{SEPARATOR}{response.strip()}"
