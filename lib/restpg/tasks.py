"""The four LongLaMP tasks: how a record names its user and what text a profile item carries."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    user_keys: tuple       # record fields that may hold the user id, first found wins
    item_fields: tuple     # profile item fields rendered into the item's text, in this order
    instruction: str       # what the policy is asked to do


TASKS = {
    "product_review": TaskSpec(
        "product_review", ("reviewerId", "user_id"), ("overall", "summary", "description", "reviewText"),
        "Write the product review this user would write."),
    "abstract_generation": TaskSpec(
        "abstract_generation", ("name", "user_id", "author"), ("title", "abstract"),
        "Write the abstract this author would write for the paper."),
    "topic_writing": TaskSpec(
        "topic_writing", ("author", "user_id"), ("summary", "content"),
        "Write the post this user would write on the topic."),
    "email_completion": TaskSpec(
        "email_completion", ("user_id", "sender", "name", "id"), ("subject", "body", "text"),
        "Complete the email the way this user writes emails."),
}

ALIASES = {"product_review_user": "product_review", "abstract_generation_user": "abstract_generation",
           "topic_writing_user": "topic_writing", "email_completion_user": "email_completion",
           "review": "product_review", "abstract": "abstract_generation", "topic": "topic_writing", "email": "email_completion"}


def resolve(task: str) -> TaskSpec | None:
    return TASKS.get(ALIASES.get(task, task))


def item_text(task: TaskSpec, item: dict) -> str:
    """One line per known field, `field: value`; unknown fields are kept in `fields` but not rendered."""
    parts = [f"{k}: {str(item[k]).strip()}" for k in task.item_fields if item.get(k) not in (None, "")]
    return "\n".join(parts)
