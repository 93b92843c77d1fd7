"""A teacher without a model (`models.teacher: extractive`): the reasoning slots written from measured facts.

The packaged 135M model cannot follow a slotted teacher prompt (it copies the worked example, then
loops), and a path that loops or runs to its cap teaches the policy exactly that. This teacher writes
the slots of the teacher template (`prompts.SLOTS`) deterministically from the retrieved items:

- Style: the typical length in words of what the user wrote in the items, then the style facts the
  items mostly show *and* the expected output shows too (the teacher may use y to decide which
  features matter): words per sentence, first person, exclamation and question marks, all-lowercase
  writing, capitals for emphasis, an opening or an ending several items share.
- Topics: the items' content words that y shares (same word or plural), words the request does not
  already name first, then those most items use; without any, the items' commonest content words.
- Plan: y's length, rounded to a bucket, its number of sentences and the first topics to cover.

Style is measured on the item's body, the text the expected output corresponds to (an Amazon item's
`reviewText`, not its summary or the product description); topics come from every field. Every word
it names is a word of the items and it never quotes y. A path takes at most `FILL` of
`prompt.max_reasoning_tokens` in the policy's tokens: the least important facts are dropped first, so
every path ends well before the cap the policy samples its reasoning under. For PAT (slots Style,
Topic, Merged) style comes from the user's own items and the style cues, topics from own items and
topic cues.
"""
from __future__ import annotations

import re
from collections import Counter
from statistics import median
from typing import Callable, Iterator

import pandas as pd

from restpg import tasks
from restpg.policy_inputs import PAT_LABELS
from restpg.user_profiles import AUTHORED

NAME = "extractive"
VERSION = "extractive@v1"  # the `teacher` of its paths: bump it when what it writes changes
FILL = 0.75  # share of prompt.max_reasoning_tokens a path may take (sft_data keeps up to REASONING_FILL)
MAX_TOPICS = 6
EDGE_WORDS = 6  # an opening clause or closing sentence of up to this many words is named whole
NO_TOPICS = "none in the earlier writing"
SAMPLES = "example_id string, text string, n_tokens int, finished boolean, prompt_truncated boolean"

_WORD = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_FIRST_PERSON = re.compile(r"\b(?:I|I'm|I've|I'd|I'll|me|my|mine|myself)\b")
_CAPS = re.compile(r"\b[A-Z]{3,}\b")
_LABEL = re.compile(r"^\((" + "|".join(re.escape(v) for v in PAT_LABELS.values()) + r")\)\s*")
STOPWORDS = frozenset("""
a about above after again against all almost also although always am among an and another any anyone anything are
around as at away back be because been before being below between both but by came can cannot could did do does
doing done down during each either else enough even ever every few for from further get gets getting give go goes
going gone got had has have having he her here hers herself him himself his how however i if in into is it its itself
just keep kept know last least less let like likely made make makes many may maybe me might mine more most much must
my myself near need needs never new next no nor not nothing now of off often on once one only onto or other others
our ours ourselves out over own per perhaps put quite rather really said same say says see seem seems several she
should since so some something still such sure take than that the their theirs them themselves then there these they
thing things this those though through thus to too took toward under until up upon us use used using very want was
way we well went were what whatever when where whether which while who whom whose why will with within without would
yet you your yours yourself able actually bit come comes first lot lots good great nice okay ok thank thanks two three
four five six seven eight nine ten
""".split())
# common verbs and adjectives that say nothing about what a text is about (compared by stem, see _stem)
GENERIC = frozenset("""
bad best better big buy bought call called come coming compare compared end feel felt find found give gave happen
help item leave left look looked looking love loved matter mean meant order ordered pick picked pretty product
receive received review seem seemed show showed small stand stood star start started stay tell told think thought
tried try trying turn turned want wanted whole
""".split())


def is_extractive(ref: str) -> bool:
    """Whether a `models.teacher` value names this teacher (so no model is loaded for it)."""
    return ref.split("@", 1)[0] == NAME


def words(text: str) -> list[str]:
    return _WORD.findall(text or "")


def fields_of(task: str, text: str) -> dict[str, str]:
    """An item's `field: value` lines (`tasks.item_text`) back as fields; a value may span lines; {} when
    the text is not in that form."""
    spec = tasks.resolve(task)
    names = set(spec.item_fields) if spec else set()
    out: dict[str, str] = {}
    current = None
    for line in (text or "").split("\n"):
        name, sep, value = line.partition(": ")
        if sep and name in names and name not in out:
            current, out[name] = name, value
        elif current:
            out[current] += "\n" + line
    return out


def unlabel(text: str) -> tuple[str | None, str]:
    """(PAT label or None, text without it): PAT's items start "(own) ", "(style cue) " or "(topic cue) "."""
    m = _LABEL.match(text or "")
    return (m.group(1), text[m.end():]) if m else (None, text or "")


def body(task: str, text: str) -> str:
    """What the user wrote in an item, in the field the expected output corresponds to (the last authored
    field present: `reviewText` before `summary`); the whole text when it has no fields."""
    fields = fields_of(task, text)
    if not fields:
        return text
    authored = [fields[f] for f in reversed(AUTHORED.get(task, ())) if fields.get(f, "").strip()]
    return authored[0] if authored else "\n".join(fields.values())


def content(task: str, text: str) -> str:
    """An item's field values without their labels (every field: the description names topics too)."""
    fields = fields_of(task, text)
    return "\n".join(fields.values()) if fields else text


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text or "") if words(s)]


def about(n: float) -> int:
    """A word count rounded to a bucket: 5s below 15, 10s below 100, 50s below 300, then 100s."""
    step = 5 if n < 15 else 10 if n < 100 else 50 if n < 300 else 100
    return max(step, int(round(n / step)) * step)


def _stem(word: str) -> str:
    w = word.lower()
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith("s") and not w.endswith("ss") and len(w) > 3:
        return w[:-1]
    return w


def _content_words(text: str) -> list[str]:
    """Lowercase words of three letters or more that can say what a text is about: not function words, not
    generic verbs or adjectives, not adverbs in -ly (those are style), no contractions."""
    out = [w.lower() for w in words(text) if len(w) >= 3 and "'" not in w and "’" not in w]
    return [w for w in out if w not in STOPWORDS and _stem(w) not in GENERIC and w not in GENERIC
            and not (w.endswith("ly") and len(w) > 4)]


def _edges(text: str, last: bool) -> dict[str, bool]:
    """Candidate openings (endings) of a text → whether the candidate is a whole clause (sentence): its first
    clause (last sentence) when short, then its first (last) three, two and one words."""
    ws = text.split()
    part = (sentences(text) or [""])[-1] if last else re.split(r"(?<=[,:;.!?])\s", text.strip(), maxsplit=1)[0]
    out = {" ".join(ws[-n:] if last else ws[:n]): False for n in (3, 2, 1) if len(ws) > n}
    if 0 < len(part.split()) <= EDGE_WORDS:
        out[part.strip()] = True
    return out


def shared_edge(texts: list[str], last: bool) -> str | None:
    """The opening (or ending) that at least two and half of `texts` share: a whole clause (sentence) first,
    then the longest, then the most shared."""
    need = max(2, (len(texts) + 1) // 2)
    counts, whole = Counter(), {}
    for t in texts:
        for edge, is_whole in _edges(t, last).items():
            if words(edge):
                counts[edge] += 1
                whole[edge] = whole.get(edge, False) or is_whole
    best = [e for e, n in counts.items() if n >= need]
    return max(best, key=lambda e: (whole[e], len(e.split()), counts[e])) if best else None


def style_facts(bodies: list[str], target: str) -> list[str]:
    """The typical length of `bodies`, then the style facts most of them show and the target shows too."""
    bodies = [b for b in bodies if words(b)]
    if not bodies:
        return ["no earlier writing to go by"]
    facts = [f"about {about(median(len(words(b)) for b in bodies))} words"]
    most = lambda test: sum(bool(test(b)) for b in bodies) * 2 >= len(bodies)  # noqa: E731
    per_sentence = median(len(words(s)) for b in bodies for s in sentences(b) or [b])
    target_sentences = [len(words(s)) for s in sentences(target)] or [len(words(target))]
    opener, closer = shared_edge(bodies, False), shared_edge(bodies, True)
    shown = [
        (opener and f'opens "{opener}"', opener and target.strip().startswith(opener)),
        (closer and f'ends "{closer}"', closer and target.strip().endswith(closer)),
        ("first person", most(_FIRST_PERSON.search) and _FIRST_PERSON.search(target)),
        ("exclamation marks", most(lambda b: "!" in b) and "!" in target),
        ("asks questions", most(lambda b: "?" in b) and "?" in target),
        ("all lowercase", most(lambda b: not any(c.isupper() for c in b)) and not any(c.isupper() for c in target)),
        ("CAPS for emphasis", most(_CAPS.search) and _CAPS.search(target)),
        (f"{about(per_sentence)}-word sentences", abs(median(target_sentences) - per_sentence) <= max(3, 0.4 * per_sentence)),
    ]
    return facts + [fact for fact, confirmed in shown if fact and confirmed]


def topic_words(items: list[str], target: str, request: str = "", exclude: set[str] = frozenset()) -> list[str]:
    """Content words of `items` that the target shares (as the items spell them; not `exclude`): words the
    request does not name first, then those more items use, longer (rarer) words, first seen; the items'
    commonest words when the target shares none."""
    per_item = [[w for w in _content_words(t) if w not in exclude] for t in items]
    seen: dict[str, int] = {}
    for ws in per_item:
        for w in ws:
            seen.setdefault(w, len(seen))
    spread = Counter(w for ws in per_item for w in set(ws))
    total = Counter(w for ws in per_item for w in ws)
    wanted = {_stem(w) for w in _content_words(target)}
    asked = {_stem(w) for w in _content_words(request)}
    shared = [w for w in seen if _stem(w) in wanted]
    if shared:
        return sorted(shared, key=lambda w: (_stem(w) in asked, -spread[w], -len(w), seen[w]))
    return sorted(seen, key=lambda w: (-spread[w], -total[w], -len(w), seen[w]))


def _unique_stems(ws: list[str]) -> list[str]:
    out, stems = [], set()
    for w in ws:
        if _stem(w) not in stems:
            out.append(w)
            stems.add(_stem(w))
    return out


def reasoning(task: str, request: str, target: str, item_texts: list[str], slots: tuple[str, str, str],
              count: Callable[[str], int], limit: int) -> str:
    """The three slots for one example within `limit` tokens (`count`); the least important facts go first."""
    style_items, topic_items = [], []
    for text in item_texts:
        label, text = unlabel(text)
        if label != PAT_LABELS["topic"]:
            style_items.append(body(task, text))
        if label != PAT_LABELS["style"]:
            topic_items.append(content(task, text))
    style = style_facts(style_items, target)
    edges = {w for e in (shared_edge(style_items, False), shared_edge(style_items, True)) for w in _content_words(e or "")}
    # an opening or ending the items share is style, not topic, unless it is all they say
    topics = (_unique_stems(topic_words(topic_items, target, request, edges) or topic_words(topic_items, target, request))
              [:MAX_TOPICS] or [NO_TOPICS])
    n_sentences = len(sentences(target))
    # facts in order of importance: a path keeps the longest head of this list that fits (the first three always)
    ranked = ([("style", style[0]), ("topics", topics[0]), ("plan", f"about {about(len(words(target)))} words")]
              + [("style", f) for f in style[1:2]] + [("topics", t) for t in topics[1:3]] + [("style", f) for f in style[2:3]]
              + [("plan", f"{n_sentences} sentence{'s' * (n_sentences != 1)}"), ("cover", 1)])
    for i in range(3, max(len(style), len(topics))):
        ranked += [("style", f) for f in style[i:i + 1]] + [("topics", t) for t in topics[i:i + 1]]
    ranked.append(("cover", 2))

    def compose(facts) -> str:
        got = {"style": [], "topics": [], "plan": [], "cover": 0}
        for slot, fact in facts:
            if slot == "cover":
                got["cover"] = fact
            else:
                got[slot].append(fact)
        cover = [t for t in got["topics"] if t != NO_TOPICS][:got["cover"]]
        plan = ", ".join(got["plan"]) + (f", on {' and '.join(cover)}" if cover else "")
        lines = (", ".join(got["style"]), ", ".join(got["topics"]), plan)
        return "\n".join(f"{label} {text}." for label, text in zip(slots, lines))

    for n in range(len(ranked), 3, -1):
        text = compose(ranked[:n])
        if count(text) <= limit:
            return text
    return compose(ranked[:3])


def write_df(settings, inputs, slots: tuple[str, str, str]):
    """(example_id, text, n_tokens, finished, prompt_truncated) for `inputs` (example_id, task, input, target,
    item_texts), shaped like `generation.generate_df`'s samples; n_tokens counted in the policy's tokenizer."""
    from restpg import models
    from restpg.sft_data import n_tokens, policy_tokenizer

    policy = models.executor_path(settings.models.policy, settings)  # resolved and converted once, on the driver
    env, limit = models.worker_env(settings), int(FILL * settings.prompt.max_reasoning_tokens)

    def write(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        tokenizer = policy_tokenizer(policy, tuple(sorted(env.items())))
        count = lambda text: n_tokens(tokenizer, text)  # noqa: E731
        for pdf in batches:
            texts = [reasoning(r.task, r.input, r.target, list(r.item_texts), slots, count, limit) for r in pdf.itertuples()]
            yield pd.DataFrame({"example_id": pdf["example_id"], "text": texts, "n_tokens": [count(t) for t in texts],
                                "finished": True, "prompt_truncated": False})
    return inputs.select("example_id", "task", "input", "target", "item_texts").mapInPandas(write, SAMPLES)
