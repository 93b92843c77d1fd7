"""`restpg` command line: one sub-command per stage, each a thin call into the library."""
from __future__ import annotations

import argparse
import sys

from restpg.config import ConfigError, describe, load_settings


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="local", help="profile name (local, local-gemma, databricks) or YAML path")
    p.add_argument("--home", default=None, help="local state directory (default $RESTPG_HOME or ./.restpg)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one profile value, e.g. --set sample.m=8 (repeatable)")


def _variant_iter(p: argparse.ArgumentParser, iteration_default: int | None = None) -> None:
    p.add_argument("--variant", required=True, help="sft | sft_reasoning | rest_em | rest_pg")
    p.add_argument("--iteration", type=int, default=iteration_default, required=iteration_default is None, help="EM iteration t")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="restpg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write deterministic synthetic LongLaMP users (all four tasks)")
    _common(p)
    p.add_argument("--out", default=None, help="output JSON-lines path (default $RESTPG_HOME/demo/demo.jsonl)")
    p.add_argument("--users", type=int, default=None, help="users per task (default from the profile)")

    p = sub.add_parser("ingest", help="LongLaMP JSON lines / JSON / Parquet → examples (+ quarantine)")
    _common(p)
    p.add_argument("--source", required=True, help="file or Parquet directory")
    p.add_argument("--task", default=None, help="product_review | abstract_generation | topic_writing | email_completion (else the record's 'task')")
    p.add_argument("--split", default=None, help="train | val | test (else the record's 'split', else by user hash)")

    p = sub.add_parser("sql", help="run Spark SQL against the tables by name (restpg.<table>)")
    _common(p)
    p.add_argument("query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--limit", type=int, default=100)

    p = sub.add_parser("retrieve", help="top-k profile items per example → retrievals")
    _common(p)

    p = sub.add_parser("reason", help="teacher-written reasoning paths → reasoning_paths")
    _common(p)

    p = sub.add_parser("build-sft", help="iteration-0 training sets for sft and sft_reasoning")
    _common(p)

    p = sub.add_parser("train", help="train the policy on one training-set slice; registers a model version")
    _common(p)
    _variant_iter(p, 0)
    p.add_argument("--init", default=None, help="start checkpoint (default: the base policy)")

    p = sub.add_parser("sample", help="E-step: m samples per training input → trajectories")
    _common(p)
    _variant_iter(p)
    p.add_argument("--model", default=None, help="policy model URI (default: latest version for the variant)")

    p = sub.add_parser("judge", help="reward every trajectory → judge_scores")
    _common(p)
    _variant_iter(p)

    p = sub.add_parser("filter", help="keep reward ≥ τ, ≤ max per input → training set of iteration t")
    _common(p)
    _variant_iter(p)

    p = sub.add_parser("evaluate", help="generate on the test split and score → eval_* tables")
    _common(p)
    p.add_argument("--variant", action="append", default=None, help="variant(s) to evaluate (default all)")

    p = sub.add_parser("validate-reward", help="is the reward fit to train on? (shuffle + direct checks)")
    _common(p)

    p = sub.add_parser("promote", help="move champion/challenger aliases for a candidate policy version")
    _common(p)
    p.add_argument("--candidate", required=True, help="model version number, or final:<variant> (its last trained version)")
    p.add_argument("--dry-run", action="store_true")

    p = sub.add_parser("notebook", help="run a SQL notebook against the local tables (CSV + PNG per cell)")
    _common(p)
    p.add_argument("action", choices=["run"])
    p.add_argument("file")
    p.add_argument("--out", default=None)

    p = sub.add_parser("run", help="the whole pipeline: ingest → retrieve → reason → SFT → EM → evaluate → promote")
    _common(p)
    p.add_argument("--variants", default=None, help="comma-separated variants (default from the profile)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="redo a stage even if complete")

    p = sub.add_parser("ablate", help="paper ablations as tagged runs: budget | iterations | restart")
    _common(p)
    p.add_argument("kind", choices=["budget", "iterations", "restart"])
    p.add_argument("--m", default="2,4,8", help="exploration budgets for 'budget'")

    p = sub.add_parser("config", help="list every setting with its default and help")
    _common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.profile, args.overrides, home=args.home)
    except ConfigError as e:
        print(f"restpg: configuration error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        for key, default, help_ in describe():
            print(f"{key:32} {default:24} {help_}")
        return 0
    if args.command == "demo-data":
        from restpg import demo_data

        d = settings.data
        out = args.out or str(settings.home_dir / "demo" / "demo.jsonl")
        path = demo_data.write(out, users_per_task=args.users or d.demo_users, profile_items=d.demo_profile_items,
                               examples_per_user=d.demo_examples_per_user, seed=d.demo_seed)
        print(path)
        return 0

    from restpg import commands

    return commands.dispatch(args, settings)


if __name__ == "__main__":
    sys.exit(main())
