"""`restpg run`: ingest → retrieve → reason → SFT → EM (sample → judge → filter → train) × T →
evaluate → promote → notebooks, skipping every stage whose slice is complete for the same inputs
and config (so a crashed run restarts where it stopped); `--force STAGE` redoes one."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from restpg import catalog, prompts, registry
from restpg.config import Settings
from restpg.tracking import say, stage_run

EM_VARIANTS = ("rest_em", "rest_pg")
STAGES = ("ingest", "retrieve", "reason", "build-sft", "train", "sample", "judge", "filter", "evaluate", "promote", "notebooks")


def _cfg(*sections) -> dict:
    return {type(s).__name__: dataclasses.asdict(s) for s in sections}


class Pipeline:
    """Runs stages with fingerprints: hash(stage, slice, config, upstream fingerprints)."""

    def __init__(self, spark, settings: Settings, force: set[str] = frozenset()):
        unknown = set(force) - set(STAGES)
        if unknown:
            raise ValueError(f"--force takes stage names ({', '.join(STAGES)}), not {', '.join(sorted(unknown))}")
        self.spark, self.settings, self.force = spark, settings, set(force)
        self.results: dict[str, dict] = {}
        self.fingerprints: list[str] = []

    def _done(self, stage: str, slice_: str):
        from pyspark.sql import functions as F

        rows = (catalog.read(self.spark, self.settings, "stage_runs")
                .where((F.col("stage") == stage) & (F.col("slice") == slice_)).collect())
        return rows[0] if rows else None

    def step(self, stage: str, slice_: str, config: dict, deps: list[str], fn) -> tuple[str, dict]:
        """`fn(run_id, fresh)` runs the stage; `fresh` says the slice holds rows of other inputs."""
        fp = hashlib.sha1(json.dumps([stage, slice_, config, deps], sort_keys=True, default=str).encode()).hexdigest()[:16]
        done = self._done(stage, slice_)
        label = f"{stage} [{slice_}]" if slice_ else stage
        if done is not None and done.fingerprint == fp and stage not in self.force:
            say(f"skip {label}: complete for the same inputs and config")
            result = json.loads(done.result)
        else:
            say(f"run {label}")
            with stage_run(self.settings, label, {"slice": slice_, "fingerprint": fp}) as log:
                result = fn(log.run_id, done is not None)
                versions = {t: catalog.version(self.spark, self.settings, t) for t in result.pop("_tables", [])}
                for t, v in versions.items():
                    log.wrote(t, v)
                import mlflow

                mlflow.log_dict(result, "result.json")
            row = [(stage, slice_, fp, versions, json.dumps(result, default=str), int(result.get("rows") or 0), log.run_id)]
            df = self.spark.createDataFrame(row, "stage string, slice string, fingerprint string, output_versions map<string,bigint>, result string, rows bigint, run_id string")
            from pyspark.sql import functions as F

            catalog.upsert(self.spark, self.settings, df.withColumn("created_at", F.current_timestamp()), "stage_runs", log.run_id)
        self.results[label] = result
        self.fingerprints.append(fp)
        return fp, result


def _source(settings: Settings) -> tuple[str, str | None]:
    if settings.data.source == "demo":
        from restpg import demo_data

        d = settings.data
        path = demo_data.write(settings.home_dir / "demo" / "demo.jsonl", users_per_task=d.demo_users,
                               profile_items=d.demo_profile_items, examples_per_user=d.demo_examples_per_user, seed=d.demo_seed)
        return str(path), None
    return settings.data.source, settings.data.task or None


def _source_identity(settings: Settings, source: str, task: str | None) -> dict:
    """What makes ingest's input the same: the generator's config for demo data, else path, size and mtime."""
    if settings.data.source == "demo":
        return {"demo": _cfg(settings.data)}
    stat = os.stat(source) if os.path.exists(source) else None
    return {"source": source, "task": task, "size": stat and stat.st_size, "mtime": stat and stat.st_mtime}


def run(spark, settings: Settings, variants: list[str] | None = None, force: set[str] = frozenset()) -> dict:
    import mlflow

    from restpg import evaluate, filtering, ingest, judge, reason, retrieve, sample, sft_data, train
    from restpg.runtime import setup_mlflow

    variants = list(variants or settings.loop.variants)
    bad = [v for v in variants if v not in ("sft", "sft_reasoning", *EM_VARIANTS)]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}: sft | sft_reasoning | rest_em | rest_pg")
    s, p = settings, Pipeline(spark, settings, force)
    setup_mlflow(s)
    with mlflow.start_run(run_name=f"pipeline {s.profile}", tags={"restpg.stage": "pipeline"}):
        mlflow.log_dict(dataclasses.asdict(s), "settings.json")
        source, task = _source(s)
        fp_ingest, _ = p.step("ingest", "", _source_identity(s, source, task),
                              [], lambda rid, _: {**ingest.run(spark, s, source, task=task, run_id=rid), "_tables": ["examples", "quarantine"]})
        fp_ret, _ = p.step("retrieve", "", _cfg(s.retrieve) | {"retriever": s.models.retriever}, [fp_ingest],
                           lambda rid, _: {**retrieve.run(spark, s, run_id=rid), "_tables": ["retrievals"]})
        bases = {registry.base_variant(v) for v in variants}
        fp_model: dict[tuple[str, int], str] = {}
        prompt_cfg = _cfg(s.prompt) | {"policy": s.models.policy, "templates": [prompts.template(t).version for t in prompts.TEMPLATES]}
        for base in sorted(bases):
            deps = [fp_ret]
            if base == "sft_reasoning":
                fp_reason, _ = p.step("reason", "", _cfg(s.reason, s.prompt) | {"teacher": s.models.teacher}, [fp_ret],
                                      lambda rid, _: {**reason.run(spark, s, run_id=rid), "_tables": ["reasoning_paths"]})
                deps.append(fp_reason)
            fp_data, _ = p.step("build-sft", f"variant={base}", prompt_cfg | _cfg(s.data), deps,
                                lambda rid, _, b=base: {**sft_data.run(spark, s, b, run_id=rid), "_tables": ["training_sets"]})
            fp_model[(base, 0)], _ = p.step(
                "train", f"variant={base}/iteration=0", _cfg(s.train), [fp_data],
                lambda rid, _, b=base: train.run(spark, s, b, 0, init_ref=s.models.policy))
        mean_reward: dict[str, list] = {}
        for variant in [v for v in variants if v in EM_VARIANTS]:
            for t in range(1, s.loop.iterations + 1):
                sl = f"variant={variant}/iteration={t}"
                policy_fp = fp_model[(registry.base_variant(variant), 0) if t == 1 else (variant, t - 1)]
                fp_s, _ = p.step("sample", sl, _cfg(s.sample, s.prompt) | prompt_cfg, [policy_fp],
                                 lambda rid, fresh, v=variant, t=t: {**sample.run(spark, s, v, t, run_id=rid, force=fresh),
                                                                     "_tables": ["trajectories"]})
                fp_j, judged = p.step("judge", sl, _cfg(s.judge) | {"judge": judge.judge_model(s)}, [fp_s],
                                      lambda rid, _, v=variant, t=t: {**judge.run(spark, s, v, t, run_id=rid), "_tables": ["judge_scores"]})
                mean_reward.setdefault(variant, []).append(judged["mean_reward"])
                fp_f, _ = p.step("filter", sl, _cfg(s.filter), [fp_j],
                                 lambda rid, _, v=variant, t=t: {**filtering.run(spark, s, v, t, run_id=rid), "_tables": ["training_sets"]})
                init = s.models.policy if s.train.restart_from == "base" else registry.sampling_policy(s, variant, t)
                fp_model[(variant, t)], _ = p.step(
                    "train", sl, _cfg(s.train), [fp_f, policy_fp if s.train.restart_from == "previous" else ""],
                    lambda rid, _, v=variant, t=t, init=init: train.run(spark, s, v, t, init_ref=init))
        finals = {v: registry.final_policy(s, v, s.loop.iterations) for v in variants}
        eval_deps = [fp_model[(v, 0 if v not in EM_VARIANTS else s.loop.iterations)] for v in variants]
        _, evaluated = p.step("evaluate", f"split={s.evaluate.split}", _cfg(s.evaluate, s.judge), eval_deps,
                              lambda rid, _: {**evaluate.run(spark, s, finals, run_id=rid),
                                              "_tables": ["eval_predictions", "eval_scores", "eval_summary", "eval_tests"]})
        promotion = _promote(spark, s, p, finals, variants, eval_deps)
        notebooks_out = _notebooks(spark, s, p, [evaluated.get("plot", "")])
    _report(p, variants, mean_reward, evaluated, promotion, notebooks_out, s)
    return {"results": p.results}


def _promote(spark, s: Settings, p: Pipeline, finals: dict, variants: list, deps: list) -> dict:
    """The last variant of the run is the candidate; it and the current champion are scored on val."""
    from mlflow import MlflowClient

    from restpg import evaluate, promote

    candidate_variant = "rest_pg" if "rest_pg" in finals else variants[-1]
    candidate = finals[candidate_variant]
    name = s.mlflow.policy_model_name
    aliases = MlflowClient().get_registered_model(name).aliases
    policies = {candidate_variant: candidate}
    if "champion" in aliases:
        champ = f"models:/{name}/{aliases['champion']}"
        if champ != candidate:
            champ_variant = MlflowClient().get_model_version(name, aliases["champion"]).tags.get("variant", "champion")
            policies[champ_variant if champ_variant != candidate_variant else "champion"] = champ

    def go(rid, _):
        evaluate.run(spark, s, policies, split=s.promote.split, ablation="promotion", run_id=rid)
        return {**promote.run(spark, s, candidate.rsplit("/", 1)[1], run_id=rid,
                              scores_fn=promote.eval_scores_fn(spark, s, ablation="promotion")), "_tables": ["promotions", "eval_scores"]}

    return p.step("promote", f"candidate={candidate}", _cfg(s.promote, s.evaluate, s.judge), deps + [str(sorted(policies.items()))], go)[1]


def _notebooks(spark, s: Settings, p: Pipeline, extra: list[str]) -> str:
    from restpg import notebooks

    src = Path(__file__).resolve().parents[2] / "notebooks"
    out = s.home_dir / "reports" / "notebooks"
    if not src.is_dir():
        say(f"notebooks: {src} not found (installed without the repository), skipped")
        return ""
    for table in catalog.TABLES:  # a cell over a table no stage of this run wrote reads it empty
        catalog.ensure(spark, s, table)
    catalog.register_tables(spark, s)
    p.step("notebooks", "", {"files": sorted(f.name for f in src.glob("*.sql"))}, list(p.fingerprints),
           lambda rid, _: {"cells": len(notebooks.run_notebooks(spark, src, out)), "out": str(out)})
    return str(out)


def _report(p: Pipeline, variants, mean_reward, evaluated, promotion, notebooks_out, s: Settings) -> None:
    lines = ["", "=" * 100, "restpg run — summary", ""]
    lines.append("Training jobs (training loss first → last step; validation loss of the start checkpoint → best):")
    for label, r in p.results.items():
        if label.startswith("train"):
            before, after = r.get("initial_val_loss", float("nan")), r["best_val_loss"]
            ok = "falls" if after < before or r["final_loss"] < r["first_loss"] else "DOES NOT FALL"
            lines.append(f"  {label:42} train {r['first_loss']:.4f} → {r['final_loss']:.4f}; val {before:.4f} → {after:.4f} "
                         f"({ok}); {r['tokens_per_s']:.0f} tok/s on {r['device']}; {r['model_uri']}")
    for v, rewards in mean_reward.items():
        trend = " → ".join(f"{x:.4f}" for x in rewards)
        verdict = ("" if len(rewards) < 2 else " (rises)" if rewards[-1] > rewards[0] else " (does not rise)")
        lines.append(f"Mean {s.judge.reward} reward of {v} samples on the training inputs by iteration: {trend}{verdict}")
    for label, r in p.results.items():
        if label.startswith("filter"):
            lines.append(f"  {label:42} pass rate {r['pass_rate']:.2%} at tau={r['tau']} ({r['kept']} kept)")
    lines += ["", evaluated.get("table1", ""), ""]
    lines.append(f"Promotion: candidate version {promotion.get('candidate_version')} → {promotion.get('decision')} "
                 f"({promotion.get('reason')}; champion before: {promotion.get('champion_version')})")
    lines.append(f"Tables: {s.home_dir / 'warehouse'} (query: restpg sql \"SELECT * FROM restpg.eval_summary\")")
    lines.append(f"MLflow: {s.mlflow.tracking_uri or 'sqlite:///' + str(s.home_dir / 'mlflow.db')}")
    lines.append(f"Plots: {evaluated.get('plot')}; notebook outputs: {notebooks_out}")
    print("\n".join(lines), flush=True)
