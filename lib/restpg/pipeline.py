"""`restpg pipeline` (alias `run`): the stages in order, nothing else.

ingest → retrieve → reason → sft_data (→ user_profiles → peer_retrieve → pat_sft for PAT) → train (SFT)
→ validate_reward → per EM iteration t
(sample → judge → filtering → train) → evaluate → promote → notebooks. Every decision (which checkpoint
a training job starts from, which model is the candidate) belongs to the stage; this module only orders
them and skips a stage whose slice is complete for the same inputs and config (a fingerprint of the
stage, its slice, its config and its upstream fingerprints), so a crashed run restarts where it
stopped; `--force STAGE` redoes one. A response budget sized from the data (`prompt.max_response_tokens:
auto`, `restpg.budgets`) is resolved right after ingest, so every later stage and fingerprint sees the number.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import time
from pathlib import Path

from restpg import budgets, catalog, prompts
from restpg import variants as V
from restpg.config import Settings
from restpg.tracking import say, stage_run

STAGES = ("ingest", "retrieve", "reason", "sft_data", "user_profiles", "peer_retrieve", "pat_sft", "train",
          "validate_reward", "sample", "judge", "filtering", "evaluate", "promote", "notebooks")


def _cfg(*sections) -> dict:
    return {type(s).__name__: dataclasses.asdict(s) for s in sections}


class Steps:
    """Runs stages with fingerprints and records each completed one in `stage_runs`."""

    def __init__(self, spark, settings: Settings, force=frozenset()):
        unknown = set(force) - set(STAGES)
        if unknown:
            raise ValueError(f"--force takes stage names ({', '.join(STAGES)}), not {', '.join(sorted(unknown))}")
        self.spark, self.settings, self.force = spark, settings, set(force)
        self.results: dict[str, dict] = {}
        self.seconds: dict[str, float | None] = {}  # label → wall seconds of its run; None: skipped as complete
        self.rss_after_train: dict[str, int] = {}  # train label → the driver's resident bytes after the job
        self.fingerprints: list[str] = []
        self._runs: dict[tuple[str, str], tuple[str, str]] | None = None  # (stage, slice) → (fingerprint, result)

    def _done(self, stage: str, slice_: str) -> tuple[str, str] | None:
        """(fingerprint, result) of the stage's last completed run, from `stage_runs` read once per pipeline."""
        if self._runs is None:
            self._runs = {}
            if catalog.exists(self.spark, self.settings, "stage_runs"):
                rows = catalog.read(self.spark, self.settings, "stage_runs").select("stage", "slice", "fingerprint", "result")
                self._runs = {(r.stage, r.slice): (r.fingerprint, r.result) for r in rows.collect()}
        return self._runs.get((stage, slice_))

    def run(self, stage: str, slice_: str, config: dict, deps: list[str], fn=None, **arguments) -> tuple[str, dict]:
        """restpg.<stage>.run(spark, settings, run_id=…, **arguments) unless complete; `fn(run_id, redo)`
        replaces it for steps that are not one stage call (`redo`: the slice holds rows of other inputs)."""
        fp = hashlib.sha1(json.dumps([stage, slice_, config, deps], sort_keys=True, default=str).encode()).hexdigest()[:16]
        done = self._done(stage, slice_)
        label = f"{stage} [{slice_}]" if slice_ else stage
        started = time.time()
        if done is not None and done[0] == fp and stage not in self.force:
            say(f"skip {label}: complete for the same inputs and config")
            result = json.loads(done[1])
            self.seconds[label] = None
        else:
            say(f"run {label}")
            with stage_run(self.settings, label, {"slice": slice_, "fingerprint": fp, **arguments}) as log:
                if fn is None:
                    result = importlib.import_module(f"restpg.{stage}").run(self.spark, self.settings, run_id=log.run_id, **arguments)
                else:
                    result = fn(log.run_id, done is not None)
                import mlflow

                mlflow.log_dict(result, "result.json")
            self._record(stage, slice_, fp, log, result)
            self.seconds[label] = time.time() - started
            if stage == "train":
                from restpg.runtime import release_memory, rss_bytes

                release_memory()
                self.rss_after_train[label] = rss_bytes()
        self.results[label] = result
        self.fingerprints.append(fp)
        return fp, result

    def _record(self, stage, slice_, fp, log, result) -> None:
        from pyspark.sql import functions as F

        text = json.dumps(result, default=str)
        row = [(stage, slice_, fp, dict(log.versions), text, int(result.get("rows") or 0), log.run_id)]
        df = self.spark.createDataFrame(row, "stage string, slice string, fingerprint string, output_versions map<string,bigint>, "
                                             "result string, rows bigint, run_id string")
        catalog.merge(self.spark, self.settings, df.withColumn("created_at", F.current_timestamp()), "stage_runs", log.run_id, update=True)
        self._runs[(stage, slice_)] = (fp, text)


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


class NoTrainingInputs(RuntimeError):
    pass


def _require_training_inputs(spark, settings: Settings, source: str) -> None:
    """Stop after ingest when the run has nothing to train on, naming the commonest quarantine reasons
    (every later stage would otherwise run on nothing and fail far from the cause)."""
    from pyspark.sql import functions as F

    from restpg.policy_inputs import training_inputs

    if training_inputs(spark, settings).limit(1).count():
        return
    reasons = []
    if catalog.exists(spark, settings, "quarantine"):
        reasons = (catalog.read(spark, settings, "quarantine").groupBy("reason").agg(F.count("*").alias("n"))
                   .orderBy(F.desc("n"), "reason").limit(3).collect())
    why = "; ".join(f"{r.n} × {r.reason}" for r in reasons) or "no quarantined records either"
    raise NoTrainingInputs(f"ingest of {source} left no training-split examples. Commonest quarantine reasons: {why}. "
                           f"(A LongLaMP file without a 'task' field needs --set data.task=<task>.)")


def run(spark, settings: Settings, *, run_id: str, variants: list[str] | None = None, force=()) -> dict:
    """The whole run for `variants` (default loop.variants); returns every stage's result."""
    import mlflow

    from restpg.rewards import judge_model

    wanted = V.check(variants or settings.loop.variants)
    mlflow.log_dict(dataclasses.asdict(settings), "settings.json")
    s, steps = settings, Steps(spark, settings, force)
    T = s.loop.iterations
    source, task = _source(s)
    fp_ingest, _ = steps.run("ingest", "", _source_identity(s, source, task), [], source=source, task=task)
    _require_training_inputs(spark, s, source)
    # from here on every stage, and every fingerprint that holds s.prompt, sees the budgets sized from this ingest
    s = steps.settings = budgets.resolve(spark, s)
    mlflow.log_param("prompt.max_response_tokens", s.prompt.max_response_tokens)
    fp_ret, _ = steps.run("retrieve", "", _cfg(s.retrieve) | {"retriever": s.models.retriever}, [fp_ingest])
    prompt_cfg = _cfg(s.prompt, s.data) | {"policy": s.models.policy,
                                           "templates": [prompts.template(t).version for t in prompts.TEMPLATES]}
    bases = sorted({V.base_of(v) for v in wanted})
    sft_bases = [b for b in bases if not V.is_em(b)]  # iteration 0 from sft_data; PAT writes its own (pat_sft)
    fp_data0: dict[str, str] = {}
    if sft_bases:
        data_deps = [fp_ret]
        if any(V.uses_reasoning(b) for b in sft_bases):
            fp_reason, _ = steps.run("reason", "", _cfg(s.reason, s.prompt, s.data) | {"teacher": s.models.teacher,
                                     "paths": importlib.import_module("restpg.reason").path_slice(s)}, [fp_ret],
                                     fn=lambda rid, redo: importlib.import_module("restpg.reason").run(spark, s, run_id=rid, force=redo))
            data_deps.append(fp_reason)
        fp_data, _ = steps.run("sft_data", "", prompt_cfg | {"teacher": s.models.teacher}, data_deps, variants=sft_bases)
        fp_data0.update({b: fp_data for b in sft_bases})
    if any(V.uses_peers(b) for b in bases):  # PAT: user profiles → peers' style and topic cues → dual-reasoning SFT
        fp_prof, _ = steps.run("user_profiles", "", _cfg(s.retrieve) | {"retriever": s.models.retriever}, [fp_ingest])
        fp_peer, _ = steps.run("peer_retrieve", "", _cfg(s.retrieve) | {"retriever": s.models.retriever}, [fp_prof, fp_ret])
        fp_pat, _ = steps.run("pat_sft", "", _cfg(s.reason) | prompt_cfg | {"teacher": s.models.teacher,
                                     "paths": importlib.import_module("restpg.pat_sft").path_slice(s)}, [fp_peer])
        fp_data0.update({b: fp_pat for b in bases if V.uses_peers(b)})
    train_cfg = _cfg(s.train, s.evaluate, s.judge) | {"models": _cfg(s.models)}
    fp_model: dict[tuple[str, int], str] = {}
    for base in bases:
        fp_model[(base, 0)], _ = steps.run("train", f"variant={base}/iteration=0", train_cfg, [fp_data0[base]], variant=base, iteration=0)
    em = [v for v in wanted if V.is_em(v)]
    mean_reward: dict[str, list] = {}
    if em:
        sft_fps = [fp_model[(b, 0)] for b in bases]
        fp_valid, _ = steps.run("validate_reward", "", _cfg(s.validate, s.judge, s.evaluate) | {"judge": judge_model(s)}, sft_fps)
        for variant in em:
            for t in range(1, T + 1):
                sl = f"variant={variant}/iteration={t}"
                policy_fp = fp_model[(V.base_of(variant), 0) if t == 1 else (variant, t - 1)]
                fp_s, _ = steps.run("sample", sl, _cfg(s.sample) | prompt_cfg, [policy_fp, fp_valid],
                                    fn=lambda rid, redo, v=variant, t=t: importlib.import_module("restpg.sample").run(
                                        spark, s, variant=v, iteration=t, run_id=rid, force=redo))
                fp_j, judged = steps.run("judge", sl, _cfg(s.judge) | {"judge": judge_model(s), "template": prompts.template("judge").version}, [fp_s],
                                         fn=lambda rid, redo, v=variant, t=t: importlib.import_module("restpg.judge").run(
                                             spark, s, variant=v, iteration=t, run_id=rid, force=redo))
                mean_reward.setdefault(variant, []).append(judged.get("mean_reward"))
                fp_f, _ = steps.run("filtering", sl, _cfg(s.filter), [fp_j], variant=variant, iteration=t)
                fp_model[(variant, t)], _ = steps.run("train", sl, train_cfg, [fp_f, policy_fp if s.train.restart_from == "previous" else ""],
                                                      variant=variant, iteration=t)
    finals = [fp_model[V.final_slice(v, T)] for v in wanted]
    _, evaluated = steps.run("evaluate", f"split={s.evaluate.split}", _cfg(s.evaluate, s.judge, s.prompt), finals,
                             fn=lambda rid, redo: importlib.import_module("restpg.evaluate").run(
                                 spark, s, run_id=rid, variants=wanted, force=redo))
    promotion = {}
    if em:
        _, promotion = steps.run("promote", "", _cfg(s.promote, s.evaluate, s.judge), finals,
                                 candidate=str(evaluated.get("candidate_version") or "") or None)
    notebooks_out = _notebooks(spark, s, steps)
    _report(steps, mean_reward, evaluated, promotion, notebooks_out, s, budgets.describe(spark, settings))
    return {"results": steps.results, "seconds": steps.seconds, "memory": memory(steps.rss_after_train),
            "data": {"source": s.data.source, "task": s.data.task, "max_examples": s.data.max_examples},
            "variants": wanted, "iterations": T}


def memory(rss_after_train: dict[str, int]) -> dict:
    """The driver's peak resident bytes and its resident bytes after each training job (the figures the
    summary's memory line prints; bench/bench_memory.py reads them from the run's result file)."""
    from restpg.runtime import peak_rss_bytes

    return {"peak_bytes": peak_rss_bytes(), "after_train_bytes": dict(rss_after_train)}


def _notebooks(spark, s: Settings, steps: Steps) -> str:
    from restpg import notebooks

    src = Path(__file__).resolve().parents[2] / "notebooks"
    out = s.home_dir / "reports" / "notebooks"
    if not src.is_dir():
        say(f"notebooks: {src} not found (installed without the repository), skipped")
        return ""
    for table in catalog.TABLES:  # a cell over a table no stage of this run wrote reads it empty
        catalog.ensure(spark, s, table)
    catalog.register_tables(spark, s)
    steps.run("notebooks", "", {"files": sorted(f.name for f in src.glob("*.sql"))}, list(steps.fingerprints),
              fn=lambda rid, _: {"cells": len(notebooks.run_notebooks(spark, src, out, notebooks.parameters(s))), "out": str(out)})
    return str(out)


def _fmt(x, spec=".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def teacher_line(r: dict) -> str:
    """The teacher's share of truncated prompts and of finished paths, from the `reason` stage's result."""
    rows = r.get("rows") or 0
    truncated, finished = r.get("truncated_share"), r.get("finished_share")
    if truncated is None and rows:
        truncated = (r.get("prompts_truncated") or 0) / rows
    if finished is None and rows:
        finished = 1 - (r.get("at_length_cap") or 0) / rows
    return (f"Teacher reasoning paths: {rows}; prompts truncated {_fmt(truncated, '.0%')}, "
            f"finished before the cap {_fmt(finished, '.0%')}")


def short_label(label: str) -> str:
    """A stage label for the summary: "train [variant=sft/iteration=0]" → "train [sft/0]"."""
    return label.replace("variant=", "").replace("iteration=", "")


def times_lines(seconds: dict, width: int = 100) -> list[str]:
    """"Stage times (s)": each stage label with its wall seconds (or "skipped"), packed into lines."""
    cells = [f"{short_label(label)} {'skipped' if t is None else f'{t:.0f}'}"
             for label, t in seconds.items()]
    total = sum(t for t in seconds.values() if t is not None)
    lines, line = [], f"Stage times (s), {total:.0f} in all:"
    for cell in cells:
        if len(line) + 3 + len(cell) > width:
            lines.append(line)
            line = " "
        line += f" {cell};"
    return lines + [line.rstrip(";")]


def _report(steps: Steps, mean_reward, evaluated, promotion, notebooks_out, s: Settings, budget_line: str = "") -> None:
    from restpg.rewards import kind_label
    from restpg.runtime import mlflow_uris

    lines = ["", "=" * 100, "restpg run — summary", ""]
    if budget_line:
        lines.append(budget_line)
    if "reason" in steps.results:
        lines.append(teacher_line(steps.results["reason"]))
    lines.append("Training jobs (best step: the checkpoint kept; selection reward at step 0 → at the best step; loss first → last step):")
    for label, r in steps.results.items():
        if label.startswith("train"):
            lines.append(f"  {label:36} best step {r.get('best_step')} of {r.get('steps')} (reward {_fmt(r.get('initial_reward'))} → "
                         f"{_fmt(r.get('best_reward'))}); loss {_fmt(r.get('first_loss'))} → {_fmt(r.get('final_loss'))}; "
                         f"{_fmt(r.get('epochs'), '.1f')} epochs, {r.get('train_rows')} rows, {r.get('dropped_too_long', 0)} too long; "
                         f"{_fmt(r.get('tokens_per_s'), '.0f')} tok/s; {r.get('model_uri')}")
    for label, r in steps.results.items():
        if label.startswith("validate_reward"):
            lines.append(f"Reward validation: {r.get('verdict')}")
    for v, rewards in mean_reward.items():
        trend = " → ".join(_fmt(x) for x in rewards)
        verdict = "" if len(rewards) < 2 or None in rewards else " (rises)" if rewards[-1] > rewards[0] else " (does not rise)"
        lines.append(f"Mean {kind_label(s)} reward of {v} samples on the training inputs by iteration: {trend}{verdict}")
    for label, r in steps.results.items():
        if label.startswith(("judge", "filtering")):
            issues = r.get("format_issues") or {}
            extra = f"pass rate {_fmt(r.get('pass_rate'), '.2%')} at tau={r.get('tau')} ({r.get('kept')} kept); " if label.startswith("filtering") else ""
            lines.append(f"  {label:36} {extra}format ok {_fmt(r.get('format_ok_rate'), '.2%')} {json.dumps(issues) if issues else ''}")
    lines.append("")
    lines.append("Evaluation outputs per variant:")
    lines.append(evaluated.get("output_table", ""))
    lines += ["", evaluated.get("table1", ""), ""]
    if promotion:
        lines.append(f"Promotion: candidate version {promotion.get('candidate_version')} → {promotion.get('decision')} "
                     f"({promotion.get('reason')}; champion before: {promotion.get('champion_version')})")
    lines.append(f"Tables: {s.home_dir / 'warehouse'} (query: restpg sql \"SELECT * FROM restpg.eval_summary\")")
    lines.append(f"MLflow: {mlflow_uris(s)[0]}")
    lines.append(f"Plots: {evaluated.get('plot')}; notebook outputs: {notebooks_out}")
    lines += times_lines(steps.seconds)
    lines.append(memory_line(steps.rss_after_train))
    print("\n".join(lines), flush=True)


def memory_line(rss_after_train: dict[str, int]) -> str:
    """The driver's peak resident memory, and its resident memory after each training job it ran."""
    from restpg.runtime import peak_rss_bytes

    after = "; ".join(f"{short_label(label).replace('train [', '').rstrip(']')} "
                      f"{n / 2**30:.2f}" for label, n in rss_after_train.items())
    return f"Driver memory (GB): peak {peak_rss_bytes() / 2**30:.2f}" + (f"; after each training job: {after}" if after else "")
