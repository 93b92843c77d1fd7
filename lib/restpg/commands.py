"""Sub-commands that need a SparkSession: parse → session → one library call → print."""
from __future__ import annotations

import json
import sys

from restpg.config import Settings
from restpg.runtime import get_spark
from restpg.tracking import dumps, stage_run


def _print_df(pdf, fmt: str) -> None:
    if fmt == "csv":
        pdf.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        print(pdf.to_json(orient="records", date_format="iso"))
    else:
        import pandas as pd

        with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
            print(pdf.to_string(index=False) if len(pdf) else "(no rows)")


def dispatch(args, settings: Settings) -> int:
    spark = get_spark(settings)
    cmd = args.command
    if cmd == "sql":
        _print_df(spark.sql(args.query).limit(args.limit).toPandas(), args.format)
        return 0
    if cmd == "ingest":
        from restpg import ingest

        with stage_run(settings, "ingest", {"source": args.source, "task": args.task, "split": args.split}) as log:
            report = ingest.run(spark, settings, args.source, task=args.task, split=args.split, run_id=log.run_id)
        print(dumps(report))
        return 0
    if cmd == "run":
        from restpg import pipeline

        variants = args.variants.split(",") if args.variants else None
        pipeline.run(spark, settings, variants=variants, force=set(args.force))
        return 0
    from restpg import stages

    result = stages.run_command(spark, settings, args)
    print(json.dumps(result, indent=1, default=str))
    return 0
