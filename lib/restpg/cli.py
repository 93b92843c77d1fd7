"""`restpg` command line and the Databricks task entry point: one table of stages, one hop to each.

Every stage `restpg.<name>` has `run(spark, settings, *, run_id, **arguments)`. A sub-command, a job file
`jobs/<name>.py` and a bundle task key share that name; `entry(name)` is the whole path from a task's
argv to the stage: parse → settings → Spark → tracked MLflow run → `restpg.<name>.run`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from restpg.config import ConfigError, describe, load_settings


@dataclass(frozen=True)
class Arg:
    flags: tuple
    options: dict

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(*self.flags, **self.options)


def arg(*flags, **options) -> Arg:
    return Arg(flags, options)


VARIANT = arg("--variant", required=True, help="sft | sft_reasoning | rest_em | rest_pg")
ITERATION = arg("--iteration", type=int, required=True, help="EM iteration t (0 = the SFT slice)")
FORCE = arg("--force", action="store_true", help="redo the whole slice (default: resume, doing only what is missing)")


@dataclass(frozen=True)
class Stage:
    help: str
    args: tuple = ()
    aliases: tuple = ()
    # False: the stage never reads the output budgets, or sizes them itself (pipeline after its ingest,
    # estimate at the cap before one); every other stage gets `prompt.max_response_tokens: auto` resolved
    budgets: bool = True
    # False: the stage records no MLflow run and needs no tracking store (estimate, before any workspace exists)
    tracked: bool = True


# name → what it does and its arguments; the module restpg.<name> has run(spark, settings, *, run_id, ...).
STAGES = {
    "ingest": Stage("LongLaMP JSON lines / JSON / Parquet → examples (+ quarantine)", (
        arg("--source", required=True, help="file or Parquet directory"),
        arg("--task", default=None, help="product_review | abstract_generation | topic_writing | email_completion (else the record's 'task')"),
        arg("--split", default=None, help="train | val | test (else the record's 'split', else by user hash)")), budgets=False),
    "retrieve": Stage("top-k items of each example's own profile → retrievals", budgets=False),
    "user_profiles": Stage("style (stylometric) and topic (embedding) vector per user from training-split texts → user_profiles",
                           budgets=False),
    "peer_retrieve": Stage("PAT's style-cue and topic-context trajectories: items of k peers each → peer_retrievals", budgets=False),
    "pat_sft": Stage("PAT's SFT start: teacher dual reasoning (style, topic, merged) → reasoning_paths, pat iteration 0 → training_sets"),
    "sparse_eval": Stage("evaluate variants and the random_peers control with own profiles cut to each size → eval_* tables + plot", (
        arg("--profile-size", dest="sizes", default="0,1,2,all", help="own-profile sizes, e.g. 0,1,2,all"),
        arg("--variant", dest="variants", action="append", default=None, help="variant(s) (default sft, rest_pg, pat)"),
        arg("--split", default=None, help="split to evaluate (default evaluate.split)"))),
    "reason": Stage("teacher-written reasoning paths for the training inputs → reasoning_paths", (FORCE,),
                    aliases=("synthesize_reasoning",)),
    "sft_data": Stage("iteration-0 training sets of sft and sft_reasoning → training_sets", (
        arg("--variant", dest="variants", action="append", default=None, help="sft and/or sft_reasoning (default both)"),),
        aliases=("build-sft", "build_sft")),
    "train": Stage("train the policy on one training-set slice; registers a model version", (
        VARIANT, arg("--iteration", type=int, default=0, help="EM iteration t (0 = SFT)"),
        arg("--init", dest="init_ref", default=None, help="start checkpoint (default: chosen by train.restart_from)"))),
    "validate_reward": Stage("is the reward fit to train on? shuffled-profile and direct checks on the SFT model", (
        arg("--policy", default=None, help="policy whose outputs are checked (default: the SFT model)"),
        arg("--allow-unfit-reward", dest="allow_unfit", action="store_const", const=True, default=None,
            help="record the verdict and go on when the reward is unfit")), aliases=("validate-reward",)),
    "sample": Stage("E-step: m samples per training input → trajectories", (
        VARIANT, ITERATION, arg("--model", dest="policy", default=None, help="policy model URI (default: θᵗ of the variant)"))),
    "judge": Stage("reward every trajectory of a slice → judge_scores", (VARIANT, ITERATION, FORCE)),
    "filtering": Stage("keep reward ≥ τ, ≤ max per input → training set of iteration t", (VARIANT, ITERATION), aliases=("filter",)),
    "evaluate": Stage("generate on the evaluation split and score → eval_* tables; publishes candidate_version", (
        arg("--variant", dest="variants", action="append", default=None, help="variant(s) to evaluate (default all)"),
        arg("--split", default=None, help="split to evaluate (default evaluate.split)"), FORCE)),
    "promote": Stage("score candidate and champion on the promotion split and move aliases", (
        arg("--candidate", default=None, help="model version, or final:<variant> (default: the run's final REST-PG policy)"),
        arg("--dry-run", dest="dry_run", action="store_const", const=True, default=None, help="decide without moving aliases"))),
    "generate": Stage("the @champion policy answers requests (request_id, user_id, task, input) from each user's profile → generations", (
        arg("--requests", required=True, help="requests: a table name in the catalog, a Delta directory or a JSON-lines file"),)),
    "ablations": Stage("paper ablations as tagged runs: budget | iterations | restart", (
        arg("kind", choices=["budget", "iterations", "restart"]),
        arg("--m", dest="budgets", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8],
            help="exploration budgets for 'budget', e.g. 2,4,8")), aliases=("ablate",)),
    "estimate": Stage("generated tokens, judge passes, training tokens and hours of a run, per stage and EM iteration", (
        arg("--bench", default=None, help="bench result JSON with the measured rates (default: the newest bench/results/*.json)"),),
        budgets=False, tracked=False),
    "pipeline": Stage("the whole run: ingest → retrieve → reason → SFT → validate → EM → evaluate → promote", (
        arg("--variants", type=lambda s: s.split(","), default=None, help="comma-separated variants (default from the profile)"),
        arg("--force", action="append", default=[], metavar="STAGE", help="redo a stage even if complete")),
        aliases=("run",), budgets=False),
}
ALIASES = {alias: name for name, stage in STAGES.items() for alias in stage.aliases}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="local", help="profile name (local, local-gemma, paper-smoke, databricks) or YAML path")
    p.add_argument("--home", default=None, help="local state directory (default $RESTPG_HOME or ./.restpg)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one profile value, e.g. --set sample.m=8 (repeatable)")
    p.add_argument("--verbose", action="store_true",
                   help="show third-party logs, warnings and progress bars (transformers, Hugging Face Hub, MLflow, torch-xla)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="restpg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, aliases=list(stage.aliases))
        _common(p)
        for a in stage.args:
            a.add_to(p)

    p = sub.add_parser("demo-data", help="write deterministic synthetic LongLaMP users (all four tasks)")
    _common(p)
    p.add_argument("--out", default=None, help="output JSON-lines path (default $RESTPG_HOME/demo/demo.jsonl)")
    p.add_argument("--users", type=int, default=None, help="users per task (default from the profile)")

    p = sub.add_parser("sql", help="run Spark SQL with the tables' catalog and schema current (SELECT ... FROM examples)")
    _common(p)
    p.add_argument("query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--limit", type=int, default=100)

    p = sub.add_parser("notebook", help="run a SQL notebook against the local tables (CSV + PNG per cell)")
    _common(p)
    p.add_argument("action", choices=["run"])
    p.add_argument("file")
    p.add_argument("--out", default=None)
    p.add_argument("--catalog", default=None, help="the notebook's catalog parameter (default: the profile's; spark_catalog locally)")
    p.add_argument("--schema", default=None, help="the notebook's schema parameter (default: catalog.schema)")

    p = sub.add_parser("config", help="list every setting with its default and help")
    _common(p)
    return parser


def stage_arguments(name: str, args: argparse.Namespace) -> dict:
    """The keyword arguments of restpg.<name>.run taken from parsed arguments."""
    dests = [a.options.get("dest") or a.flags[0].lstrip("-").replace("-", "_") for a in STAGES[name].args]
    return {d: getattr(args, d) for d in dests}


def run_stage(name: str, spark, settings, **arguments) -> dict:
    """restpg.<name>.run inside a tracked MLflow run (a child run when one is active), with budgets sized
    from the data (`prompt.max_response_tokens: auto`) resolved first for a stage that reads them. An
    untracked stage runs with `run_id=None` and never touches the tracking store."""
    module = importlib.import_module(f"restpg.{name}")
    if not STAGES[name].tracked:
        return module.run(spark, settings, run_id=None, **arguments)
    import mlflow

    from restpg import budgets
    from restpg.tracking import stage_run

    with stage_run(settings, name, arguments) as log:
        if STAGES[name].budgets and budgets.is_auto(settings):
            settings = budgets.resolve(spark, settings)
            mlflow.log_param("prompt.max_response_tokens", settings.prompt.max_response_tokens)
        return module.run(spark, settings, run_id=log.run_id, **arguments)


def _print_df(pdf, fmt: str) -> None:
    if fmt == "csv":
        pdf.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        print(pdf.to_json(orient="records", date_format="iso"))
    else:
        import pandas as pd

        with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
            print(pdf.to_string(index=False) if len(pdf) else "(no rows)")


def _tool(command: str, args, settings) -> int:
    """Sub-commands that are not stages: demo data, SQL, notebooks."""
    if command == "demo-data":
        from restpg import demo_data

        d = settings.data
        out = args.out or str(settings.home_dir / "demo" / "demo.jsonl")
        print(demo_data.write(out, users_per_task=args.users or d.demo_users, profile_items=d.demo_profile_items,
                              examples_per_user=d.demo_examples_per_user, seed=d.demo_seed))
        return 0
    from restpg.runtime import get_spark

    spark = get_spark(settings)
    if command == "sql":
        return _sql(spark, settings, args)
    from pathlib import Path

    from restpg import notebooks

    defaults = notebooks.parameters(settings)
    params = {"catalog": args.catalog or defaults["catalog"], "schema": args.schema or defaults["schema"]}
    out = args.out or str(settings.home_dir / "reports" / "notebooks")
    print(json.dumps({"cells": notebooks.run_notebook(spark, Path(args.file), out, params), "out": out}, indent=1, default=str))
    return 0


def _sql(spark, settings, args) -> int:
    """One query with the tables' catalog and schema current, as in a Databricks SQL editor. A query
    error is one line on stderr (its error class and message), not a JVM stack trace."""
    from pyspark.errors import PySparkException
    from pyspark.logger import PySparkLogger

    from restpg import catalog

    catalog.use_namespace(spark, settings)
    for name in ("SQLQueryContextLogger", "DataFrameQueryContextLogger"):  # they print the stack trace
        PySparkLogger.getLogger(name).disabled = True
    try:
        pdf = spark.sql(args.query).limit(args.limit).toPandas()
    except PySparkException as e:
        message = (e.getMessage() or str(e)).strip().splitlines()[0]
        condition = e.getCondition()
        if condition and not message.startswith(f"[{condition}]"):
            message = f"[{condition}] {message}"
        print(f"restpg sql: {message}", file=sys.stderr)
        return 1
    _print_df(pdf, args.format)
    return 0


def write_result(settings, stage: str, result) -> Path:
    """The stage's result as JSON in `<home>/results/<stage>-<UTC time>.json`, never over an earlier one."""
    folder = settings.home_dir / "results"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(result, indent=1, default=str)
    for n in itertools.count(1):
        path = folder / f"{stage}-{stamp}{f'-{n}' if n > 1 else ''}.json"
        try:
            with path.open("x") as f:
                f.write(text)
            return path
        except FileExistsError:
            pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        from restpg.runtime import quiet_third_party

        quiet_third_party()
    try:
        settings = load_settings(args.profile, args.overrides, home=args.home)
    except ConfigError as e:
        print(f"restpg: configuration error: {e}", file=sys.stderr)
        return 2
    command = ALIASES.get(args.command, args.command)
    if command == "config":
        for key, default, help_ in describe():
            print(f"{key:36} {default:24} {help_}")
        return 0
    if command not in STAGES:
        return _tool(command, args, settings)
    from restpg.runtime import TrackingUnavailable, check_tracking, get_spark

    if STAGES[command].tracked:
        try:  # before Spark starts: a stage that cannot record its run does no work
            check_tracking(settings)
        except TrackingUnavailable as e:
            print(f"restpg: {e}", file=sys.stderr)
            return 2
    from restpg.budgets import Unresolved
    from restpg.filtering import NothingPassed
    from restpg.generate import NoChampion
    from restpg.validate_reward import RewardUnfit

    try:
        result = run_stage(command, get_spark(settings), settings, **stage_arguments(command, args))
    except (Unresolved, NothingPassed, NoChampion, RewardUnfit) as e:  # expected ends: one line on stderr, no traceback
        print(f"restpg: {e}", file=sys.stderr)
        return 3 if isinstance(e, NothingPassed) else 4 if isinstance(e, RewardUnfit) else 2
    print(f"result: {write_result(settings, command, result)}")
    return 0


def entry(name: str, argv: list[str] | None = None) -> None:
    """What `jobs/<name>.py` calls: the stage's sub-command with the task's parameters."""
    sys.exit(main([name, *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
