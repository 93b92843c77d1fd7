"""Single-stage sub-commands of `restpg`, each one library call inside an MLflow stage run."""
from __future__ import annotations

from restpg.config import Settings
from restpg.tracking import stage_run


def run_command(spark, settings: Settings, args) -> dict:
    cmd = args.command
    with stage_run(settings, cmd, {k: v for k, v in vars(args).items() if k not in ("overrides",)}) as log:
        rid = log.run_id
        if cmd == "retrieve":
            from restpg import retrieve
            return retrieve.run(spark, settings, run_id=rid)
        if cmd == "reason":
            from restpg import reason
            return reason.run(spark, settings, run_id=rid)
        if cmd == "build-sft":
            from restpg import sft_data
            return {v: sft_data.run(spark, settings, v, run_id=rid) for v in ("sft", "sft_reasoning")}
        if cmd == "train":
            from restpg import train
            return train.run(spark, settings, args.variant, args.iteration, init_ref=args.init)
        if cmd == "sample":
            from restpg import sample
            return sample.run(spark, settings, args.variant, args.iteration, policy=args.model, run_id=rid)
        if cmd == "judge":
            from restpg import judge
            return judge.run(spark, settings, args.variant, args.iteration, run_id=rid)
        if cmd == "filter":
            from restpg import filtering
            return filtering.run(spark, settings, args.variant, args.iteration, run_id=rid)
        if cmd == "evaluate":
            from restpg import evaluate, registry
            variants = args.variant or settings.loop.variants
            policies = {v: registry.final_policy(settings, v, settings.loop.iterations) for v in variants}
            result = evaluate.run(spark, settings, policies, run_id=rid)
            print(result["table1"])
            return result
        if cmd == "validate-reward":
            from restpg import validate_reward
            return validate_reward.run(spark, settings, run_id=rid)
        if cmd == "promote":
            from restpg import promote, registry
            candidate = args.candidate.strip()
            if not candidate:
                raise ValueError("--candidate is empty: give a model version number or final:<variant>")
            if candidate.startswith("final:"):
                candidate = registry.final_policy(settings, candidate.split(":", 1)[1], settings.loop.iterations).rsplit("/", 1)[1]
            return promote.run(spark, settings, candidate, run_id=rid, dry_run=args.dry_run or None)
        if cmd == "notebook":
            from pathlib import Path

            from restpg import notebooks
            out = args.out or str(settings.home_dir / "reports" / "notebooks")
            return {"cells": notebooks.run_notebook(spark, Path(args.file), out), "out": out}
        if cmd == "ablate":
            from restpg import ablations
            return ablations.run(spark, settings, args.kind, budgets=[int(x) for x in args.m.split(",")], run_id=rid)
    raise ValueError(f"unknown command {cmd}")
