"""Deterministic synthetic LongLaMP users whose style is learnable from their profile.

Each user has a signature: an opening phrase, a closing phrase, favourite words, a tone (punctuation
and intensifiers), a typical length and two pet topics. The same signature shapes the user's profile
items and their expected outputs, so a model that reads the retrieved profile can write closer to y
than one that does not.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OPENERS = ["Honestly,", "Long story short:", "Okay so", "To be fair,", "Let me say this:", "Right off the bat,",
           "In my experience,", "Quick note:", "Well well,", "First things first,", "No kidding,", "Here is the deal:"]
CLOSERS = ["Cheers!", "That's my two cents.", "Would do it again.", "Make of that what you will.", "Peace out.",
           "End of story.", "Take care, folks.", "Enough said.", "Your mileage may vary.", "Thumbs up from me.",
           "Over and out.", "Just saying."]
WORDS = [["sturdy", "solid", "reliable"], ["gorgeous", "lovely", "charming"], ["clunky", "awkward", "fiddly"],
         ["snappy", "quick", "zippy"], ["cozy", "warm", "soft"], ["pricey", "steep", "costly"],
         ["nifty", "handy", "clever"], ["robust", "rigorous", "thorough"], ["elegant", "neat", "tidy"],
         ["bold", "vivid", "striking"], ["gentle", "calm", "quiet"], ["rugged", "tough", "hardy"]]
TOPICS = ["price", "shipping", "durability", "family", "design", "comfort", "speed", "noise", "colour", "size",
          "battery", "packaging"]
THINGS = {
    "product_review": ["desk lamp", "water bottle", "phone case", "yoga mat", "coffee grinder", "backpack", "blender",
                       "hair dryer", "rain jacket", "board game", "keyboard", "throw pillow", "tea kettle", "headphones"],
    "abstract_generation": ["graph neural networks", "protein folding", "sparse attention", "federated learning",
                            "causal inference", "speech recognition", "robot grasping", "climate models",
                            "query rewriting", "code generation", "image segmentation", "active learning"],
    "topic_writing": ["morning routines", "city cycling", "home cooking", "learning guitar", "remote work", "gardening",
                      "budget travel", "reading habits", "old cameras", "night shifts", "rainy weekends", "chess"],
    "email_completion": ["the quarterly report", "the team offsite", "the budget review", "a vendor contract",
                         "the hiring plan", "a customer complaint", "the release date", "the office move",
                         "a training session", "the audit findings", "a partner meeting", "the roadmap"],
}
SUBJECT_KEYS = {"product_review": "summary", "abstract_generation": "title", "topic_writing": "summary",
                "email_completion": "subject"}


def _style(rng: random.Random, index: int) -> dict:
    return {
        "opener": OPENERS[index % len(OPENERS)], "closer": CLOSERS[(index * 5 + 3) % len(CLOSERS)],
        "words": WORDS[(index * 7 + 1) % len(WORDS)], "topics": rng.sample(TOPICS, 2),
        "excited": index % 2 == 0, "sentences": 3 + index % 3,
    }


def _text(rng: random.Random, style: dict, thing: str) -> str:
    mark = "!" if style["excited"] else "."
    really = "really " if style["excited"] else "fairly "
    w = style["words"]
    pool = [
        f"The {thing} is {really}{rng.choice(w)}{mark}",
        f"What matters most to me is {style['topics'][0]}, and here it is {rng.choice(w)}{mark}",
        f"On {style['topics'][1]} it feels {rng.choice(w)} as well{mark}",
        f"I keep coming back to how {rng.choice(w)} the {thing} turned out{mark}",
        f"Compared with others, {style['topics'][0]} is where it stands out{mark}",
        f"If I had to pick one word, {rng.choice(w)}{mark}",
    ]
    body = rng.sample(pool, min(style["sentences"], len(pool)))
    return " ".join([style["opener"], *body, style["closer"]])


def _record(task: str, user: str, style: dict, rng: random.Random, thing: str, profile: list) -> dict:
    text = _text(rng, style, thing)
    subject = f"{thing} and {style['topics'][0]}"
    if task == "product_review":
        rating = "5.0" if style["excited"] else "3.0"
        return {"reviewerId": user, "input": f"Generate the review text written by a reviewer who has given an overall rating of {rating} for a product with description \"{thing}\". The summary of the review text is \"{subject}\".", "output": text, "profile": profile}
    if task == "abstract_generation":
        return {"name": user, "input": f"Generate an abstract for the title \"A study of {thing}\".", "output": text, "profile": profile}
    if task == "topic_writing":
        return {"author": user, "input": f"Generate the content for a reddit post \"{subject}\".", "output": text, "profile": profile}
    return {"user_id": user, "input": f"Complete the email about {thing} that begins: \"Hi all, about {thing}\".", "output": text, "profile": profile}


def _item(task: str, style: dict, rng: random.Random, thing: str) -> dict:
    text = _text(rng, style, thing)
    subject = f"{thing} and {style['topics'][0]}"
    return {
        "product_review": {"overall": "5.0" if style["excited"] else "3.0", "summary": subject, "reviewText": text, "description": thing},
        "abstract_generation": {"title": f"On {thing}", "abstract": text},
        "topic_writing": {"summary": subject, "content": text},
        "email_completion": {"subject": subject, "body": text},
    }[task]


def generate(users_per_task: int = 8, profile_items: int = 6, examples_per_user: int = 3, seed: int = 7) -> list[dict]:
    """LongLaMP-layout records for all four tasks; each carries `task` and `split` fields."""
    rng = random.Random(seed)
    records = []
    for t, task in enumerate(THINGS):
        for u in range(users_per_task):
            user = f"{task[:3]}-user-{u:03d}"
            style = _style(rng, t * users_per_task + u)
            things = rng.sample(THINGS[task], min(len(THINGS[task]), profile_items + examples_per_user))
            profile = [_item(task, style, rng, th) for th in things[:profile_items]]
            targets = things[profile_items:]
            for e, thing in enumerate(targets):
                split = "test" if e == len(targets) - 1 else "val" if e == len(targets) - 2 and len(targets) > 2 else "train"
                records.append({"task": task, "split": split, **_record(task, user, style, rng, thing, profile)})
    return records


def write(path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for rec in generate(**kwargs):
            f.write(json.dumps(rec) + "\n")
    return path
