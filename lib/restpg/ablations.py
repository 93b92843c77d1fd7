"""The paper's ablations as tagged runs; results land in `eval_summary` under `ablation` so
Figures 2-4 can be drawn in SQL.

- budget: one EM iteration of REST-PG per exploration budget m (variant `rest_pg:m=<m>`);
- iterations: each EM iteration's REST-PG and ReST-EM policy evaluated (variant `<v>:t=<t>`);
- restart: REST-PG for T iterations with the other M-step start than the profile's `train.restart_from`
  (`rest_pg:previous` against the main run's `rest_pg:base`, or the other way round).
"""
from __future__ import annotations

import dataclasses

from restpg import evaluate, filtering, judge, registry, sample, train
from restpg import variants as V
from restpg.config import Settings
from restpg.tracking import say


def em_iteration(spark, settings: Settings, variant: str, t: int, run_id: str) -> str:
    """sample → judge → filtering → train for one (variant, t); returns the trained model URI."""
    for stage in (sample, judge, filtering):
        stage.run(spark, settings, variant=variant, iteration=t, run_id=run_id)
    return train.run(spark, settings, variant=variant, iteration=t, run_id=run_id)["model_uri"]


def budget(spark, settings: Settings, budgets: list[int], run_id: str) -> dict:
    policies = {}
    for m in budgets:
        s = dataclasses.replace(settings, sample=dataclasses.replace(settings.sample, m=m))
        variant = f"rest_pg:m={m}"
        say(f"ablate budget: m={m}")
        policies[variant] = registry.trained_version(s, variant, 1) or em_iteration(spark, s, variant, 1, run_id)
    return evaluate.run(spark, settings, policies=policies, ablation="budget", run_id=run_id)


def iterations(spark, settings: Settings, run_id: str) -> dict:
    policies = {}
    for variant in V.EM_NAMES:
        base = registry.trained_version(settings, registry.base_variant(variant), 0)
        if base:
            policies[f"{variant}:t=0"] = base
        for t in range(1, settings.loop.iterations + 1):
            uri = registry.trained_version(settings, variant, t)
            if uri:
                policies[f"{variant}:t={t}"] = uri
    if not policies:
        raise LookupError("no trained policies yet: run `restpg run` first")
    return evaluate.run(spark, settings, policies=policies, ablation="iterations", run_id=run_id)


def other_start(restart_from: str) -> str:
    """The M-step start the restart ablation compares with the profile's own."""
    return {"base": "previous", "previous": "base"}[restart_from]


def restart(spark, settings: Settings, run_id: str) -> dict:
    main = settings.train.restart_from
    other = other_start(main)
    s = dataclasses.replace(settings, train=dataclasses.replace(settings.train, restart_from=other))
    variant = f"rest_pg:{other}"
    for t in range(1, settings.loop.iterations + 1):
        if registry.trained_version(s, variant, t) is None:
            em_iteration(spark, s, variant, t, run_id)
    policies = {f"rest_pg:{main}": registry.final_policy(settings, "rest_pg", settings.loop.iterations),
                variant: registry.trained_version(s, variant, settings.loop.iterations)}
    return evaluate.run(spark, settings, policies=policies, ablation="restart", run_id=run_id)


def run(spark, settings: Settings, *, kind: str, budgets: list[int] | None = None, run_id: str) -> dict:
    if kind == "budget":
        return budget(spark, settings, budgets or [2, 4, 8], run_id)
    if kind == "iterations":
        return iterations(spark, settings, run_id)
    if kind == "restart":
        return restart(spark, settings, run_id)
    raise ValueError(f"unknown ablation {kind!r}: budget | iterations | restart")
