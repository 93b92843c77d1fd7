"""Sparse-profile evaluation (issue 11): how each variant fares when the target user's own profile is
cut to 0, 1, 2, … items, and PAT's falsification control `random_peers`.

For each profile size the evaluation split's examples keep only their first `size` profile items
(ordered by item id, then text: deterministic and blind to the target); their own items are then
retrieved from what is left (top `retrieve.k` by cosine with the input, never an item equal to the
expected output) and, for `pat`, their peers are retrieved anew from the cut profile
(`peer_retrieve.peer_rows`). `random_peers` is the `pat` policy with peers drawn at random from the
same pool (`peer_retrieve.RANDOM`), through the same code; PAT's claim holds only where `pat` beats
both `random_peers` and `rest_pg` at sizes 0–1. Predictions, scores, summaries and paired t-tests
go through `evaluate`'s own functions, under ablation `profile_size=<n>` (or `profile_size=all`), so
`eval_summary` / `eval_tests` rows carry the size; the plot is mean judge score vs profile size per variant.
"""
from __future__ import annotations

from typing import Iterator

import pandas as pd

from restpg import peer_retrieve, registry, retrieve
from restpg import variants as V
from restpg.config import Settings
from restpg.tracking import say

RANDOM_PEERS = "pat:random_peers"  # an ablation-tagged name: the pat policy, parsed as pat
EXAMPLE_SCHEMA = ("example_id string, task string, split string, user_id string, input string, target string, "
                  "profile array<struct<item_id:string,text:string,fields:map<string,string>>>, item_texts array<string>")


def parse_sizes(text: str) -> list[int | None]:
    """'0,1,2,all' → [0, 1, 2, None] (None: the whole profile)."""
    sizes = []
    for part in str(text).split(","):
        part = part.strip()
        if part == "all":
            sizes.append(None)
        elif part.isdigit():
            sizes.append(int(part))
        else:
            raise ValueError(f"profile sizes are integers ≥ 0 or 'all', comma-separated: not {part!r}")
    return sizes


def label(size: int | None) -> str:
    return f"profile_size={'all' if size is None else size}"


def truncate(profile: list, size: int | None) -> list:
    """The first `size` items by (item_id, text); all of them for None."""
    ordered = sorted(profile, key=lambda it: (it["item_id"], it["text"]))
    return ordered if size is None else ordered[:size]


def _cutter(size: int | None, k: int, ref: str, env: dict, batch_size: int):
    def cut(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from restpg.embedding import embed_texts

        for pdf in batches:
            inputs = embed_texts(pdf["input"].fillna("").tolist(), ref, env, batch_size)
            profiles, own = [], []
            for n, r in enumerate(pdf.itertuples()):
                kept = truncate([dict(it) for it in r.profile], size)
                for it in kept:
                    it["fields"] = dict(it["fields"]) if it["fields"] is not None else {}
                usable = [it for it in kept if not retrieve.leaks_target(it["text"], list(it["fields"].values()), r.target)]
                vecs = embed_texts([it["text"] for it in usable], ref, env, batch_size)
                top = retrieve.top_k(inputs[n], vecs, [it["item_id"] for it in usable], [it["text"] for it in usable], k)
                profiles.append([{"item_id": it["item_id"], "text": it["text"], "fields": it["fields"]} for it in kept])
                own.append([t["text"] for t in top])
            yield pdf.assign(profile=profiles, item_texts=own)
    return cut


def cut_examples(spark, settings: Settings, split: str, size: int | None):
    """The split's examples with profiles cut to `size` and own `item_texts` retrieved from the cut."""
    from restpg import models

    from restpg.evaluate import evaluation_examples

    examples = evaluation_examples(spark, settings, split).select(*[c.split()[0] for c in EXAMPLE_SCHEMA.split(", ")][:-1])
    retriever = models.executor_path(settings.models.retriever, settings)  # resolved on the driver: executors load the path
    cut = _cutter(size, settings.retrieve.k, retriever, models.worker_env(settings), settings.retrieve.batch_size)
    return examples.mapInPandas(cut, EXAMPLE_SCHEMA).localCheckpoint()


def inputs_for(spark, settings: Settings, cut, variant: str, items=None):
    """What `variant` reads at this size: own items only, or own items + peers (similar or random), computed
    once (the evaluation reads its inputs several times). `items`: the peer pool, embedded once per sweep."""
    from restpg.policy_inputs import with_peer_items

    if not V.uses_peers(variant):
        return cut
    mode = peer_retrieve.RANDOM if variant == RANDOM_PEERS else peer_retrieve.SIMILAR
    peers = peer_retrieve.peer_rows(spark, settings, cut, mode, items=items)
    return with_peer_items(spark, settings, cut, peers).localCheckpoint()


def plot(summary: pd.DataFrame, path, metric: str = "judge_score") -> str:
    """Macro mean of `metric` vs profile size, one line per variant."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    rows = summary[(summary["task"] == "macro") & (summary["metric"] == metric)]
    order = sorted(rows["ablation"].unique(), key=lambda a: (a.endswith("=all"), int(a.split("=")[1]) if not a.endswith("=all") else 0))
    for variant, g in rows.groupby("variant", sort=True):
        means = g.set_index("ablation")["mean"]
        xs = [i for i, a in enumerate(order) if a in means]
        ax.plot(xs, [means[order[i]] for i in xs], marker="o", label=variant)
    ax.set_xticks(range(len(order)), [a.split("=")[1] for a in order])
    ax.set_xlabel("own profile items")
    ax.set_ylabel(f"mean {metric} (macro)")
    ax.legend(fontsize=8)
    fig.savefig(path)
    return str(path)


def run(spark, settings: Settings, *, run_id: str, sizes: str = "0,1,2,all", variants: list[str] | None = None,
        policies: dict[str, str] | None = None, split: str | None = None) -> dict:
    """Evaluate `variants` (default sft, rest_pg, pat) and `random_peers` at every profile size; `policies`
    maps a variant to a model URI (default: its final policy)."""
    from restpg import evaluate

    split = split or settings.evaluate.split
    names = V.check(variants or ["sft", "rest_pg", "pat"])
    policies = {v: (policies or {}).get(v) or registry.final_policy(settings, v, settings.loop.iterations) for v in names}
    if "pat" in policies:
        policies[RANDOM_PEERS] = policies["pat"]
    summaries = []
    items = peer_retrieve.peer_items(spark, settings).localCheckpoint() if any(V.uses_peers(v) for v in policies) else None
    for size in parse_sizes(sizes):
        ablation, cut = label(size), cut_examples(spark, settings, split, size)
        for variant, policy in policies.items():
            say(f"sparse_eval {ablation}: {variant} ({policy})")
        own = {v: p for v, p in policies.items() if not V.uses_peers(v)}  # they read the same inputs: one job
        if own:
            evaluate.predict(spark, settings, own, split, ablation, run_id, examples=cut)
        for variant in [v for v in policies if v not in own]:  # in the caller's order, not a set's
            evaluate.predict(spark, settings, {variant: policies[variant]}, split, ablation, run_id,
                             examples=inputs_for(spark, settings, cut, variant, items))
        evaluate.score(spark, settings, list(policies), split, ablation, run_id)
        summary, _ = evaluate.summarize(spark, settings, split, ablation, run_id)
        summaries.append(summary)
    table = pd.concat(summaries, ignore_index=True)
    out = settings.home_dir / "reports" / f"sparse_eval_{split}_profile_size.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    macro = table[(table["task"] == "macro") & (table["metric"] == "judge_score")]
    return {"split": split, "sizes": [label(s) for s in parse_sizes(sizes)], "policies": policies, "plot": plot(table, out),
            "judge_score": {f"{r.ablation}/{r.variant}": float(r.mean) for r in macro.itertuples()},
            "rows": int(len(table))}
