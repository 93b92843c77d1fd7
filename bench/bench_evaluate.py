"""Evaluation's Spark jobs: the systems of a split answered and scored one call each (a Spark job and a
Delta MERGE per system, as `evaluate` did before) vs all in one call (one job and one MERGE per chunk),
side by side in alternating rounds on a finished home, after one untimed call that loads every model.

    RESTPG_HOME=<a make run home> .venv/bin/python bench/bench_evaluate.py [--rounds 2] [--split test] [--set key=value ...]

The systems are the home's final policies of `loop.variants`, each under the label `<variant>:bench`,
written under throw-away ablations `bench-each-<r>` / `bench-fused-<r>` (forced, so nothing is reused).
Prints the seconds of each round, the ratio of the medians, and whether both ways wrote the same answers
(same seeds: they must).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--split", default="test")
    parser.add_argument("--profile", default="local")
    parser.add_argument("--set", action="append", default=[], help="a config override, as `restpg --set`")
    args = parser.parse_args()

    from restpg import budgets, catalog, config, evaluate, registry, runtime

    settings = config.load_settings(args.profile, args.set, home=os.environ.get("RESTPG_HOME"))
    spark = runtime.get_spark(settings)
    settings = budgets.resolve(spark, settings)  # a response budget sized from the data (`auto`), as the stages see it
    runtime.setup_mlflow(settings)
    policies = {f"{v}:bench": registry.final_policy(settings, v, settings.loop.iterations) for v in settings.loop.variants}

    def each(ablation: str) -> None:
        for label, uri in policies.items():
            evaluate.predict(spark, settings, {label: uri}, args.split, ablation, "bench", force=True)
            evaluate.score(spark, settings, [label], args.split, ablation, "bench", force=True)

    def fused(ablation: str) -> None:
        evaluate.predict(spark, settings, policies, args.split, ablation, "bench", force=True)
        evaluate.score(spark, settings, list(policies), args.split, ablation, "bench", force=True)

    fused("bench-warmup")  # untimed: every worker loads every model once, so neither way pays the first loads
    seconds: dict[str, list[float]] = {"each": [], "fused": []}
    for r in range(args.rounds):
        for name, fn in (("each", each), ("fused", fused)):
            started = time.perf_counter()
            fn(f"bench-{name}-{r}")
            seconds[name].append(time.perf_counter() - started)
            print(json.dumps({"round": r, "way": name, "systems": len(policies), "seconds": round(seconds[name][-1], 1)}), flush=True)

    answers = catalog.read(spark, settings, "eval_predictions").where("ablation LIKE 'bench-%'").select(
        "ablation", "variant", "example_id", "raw_text").toPandas()
    by_way = {a: g.set_index(["variant", "example_id"])["raw_text"].sort_index() for a, g in answers.groupby("ablation")}
    by_way.pop("bench-warmup", None)
    same = all(v.equals(by_way["bench-each-0"]) for v in by_way.values())
    each_s, fused_s = statistics.median(seconds["each"]), statistics.median(seconds["fused"])
    print(f"evaluate {len(policies)} systems on {args.split}: one call each {each_s:.1f} s, one call for all "
          f"{fused_s:.1f} s (median of {args.rounds}): {each_s / fused_s:.2f}x; same answers: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
