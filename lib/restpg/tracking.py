"""MLflow runs around stages: one child run per stage under the pipeline's parent run."""
from __future__ import annotations

import contextlib
import json
import sys
import time

from restpg.config import Settings


@contextlib.contextmanager
def stage_run(settings: Settings, stage: str, params: dict | None = None):
    """Open an MLflow run for `stage` (nested when a parent is active); yields a `StageLog`."""
    import mlflow

    from restpg.runtime import setup_mlflow

    from restpg import catalog

    setup_mlflow(settings)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=stage, nested=nested, tags={"restpg.stage": stage, "restpg.profile": settings.profile}) as run:
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        log = StageLog(stage, run.info.run_id)
        outer = {k: dict(v) for k, v in catalog.lineage.items()}
        for v in catalog.lineage.values():
            v.clear()
        try:
            yield log
        finally:
            log.read.update(catalog.lineage["read"])
            log.versions.update(catalog.lineage["written"])
            for k, v in catalog.lineage.items():  # an enclosing stage (the pipeline) keeps what this one did
                v.update({**outer[k], **v})
        mlflow.log_metric("seconds", time.time() - log.started)
        if log.versions or log.read:
            mlflow.log_dict({"read": log.read, "written": log.versions}, "lineage.json")
            mlflow.set_tags({f"table.{k}.version": v for k, v in log.versions.items()})
            mlflow.set_tags({f"table.{k}.read_version": v for k, v in log.read.items()})


class StageLog:
    def __init__(self, stage: str, run_id: str):
        self.stage, self.run_id, self.started = stage, run_id, time.time()
        self.versions: dict[str, int] = {}
        self.read: dict[str, int] = {}

    def wrote(self, table: str, version: int) -> None:
        self.versions[table] = version

    def used(self, table: str, version: int) -> None:
        self.read[table] = version


def say(message: str) -> None:
    """Progress lines go to stderr so `--format csv|json` output stays clean."""
    print(f"[restpg {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def progress(stage: str, done: int, total: int, started: float) -> None:
    elapsed = time.time() - started
    eta = f"{elapsed / done * (total - done):.0f}s" if done else "unknown"
    say(f"{stage}: {done}/{total} ({100 * done / max(total, 1):.0f}%) elapsed {elapsed:.0f}s eta {eta}")


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, default=str)


# Task values this process published (every environment), for the local caller and the tests.
published: dict[str, object] = {}


def publish_task_value(key: str, value) -> None:
    """Hand a small pointer to later tasks of a Databricks job (`{{tasks.<task>.values.<key>}}`).

    On Databricks it is `dbutils.jobs.taskValues.set`, which the docs support in notebooks only: from a
    Python script task it may be missing or fail, so it is best effort and never fails the stage (the
    bundle's tasks read no task value; promote finds the candidate in the registry). Elsewhere there is no
    job to read it, so the value is recorded in `published` and printed (stderr) for whoever runs the
    stage by hand."""
    import os

    published[key] = value
    if "DATABRICKS_RUNTIME_VERSION" in os.environ:
        try:
            _dbutils().jobs.taskValues.set(key=key, value=value)
        except Exception as e:  # noqa: BLE001 - a script task has no notebook context to publish from
            say(f"task value {key}={value} not published ({type(e).__name__}: {e})")
        else:
            say(f"task value {key}={value} published")
    else:
        print(f"task value {key}={value}", file=sys.stderr, flush=True)


def _dbutils():
    """dbutils of the running Databricks task: pyspark.dbutils on a cluster, the notebook's otherwise."""
    try:
        from pyspark.dbutils import DBUtils  # only on Databricks runtimes
        from pyspark.sql import SparkSession

        return DBUtils(SparkSession.builder.getOrCreate())
    except ImportError:
        import IPython

        return IPython.get_ipython().user_ns["dbutils"]
