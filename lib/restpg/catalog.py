"""Tables by logical name: schemas from `schemas/`, locations per profile, re-runnable writes.

Locally a table is a Delta directory under ``$RESTPG_HOME/warehouse/<schema>/<name>`` registered in the
session catalog as ``<schema>.<name>`` (so Spark SQL finds it by name); on Databricks it is the Unity
Catalog table ``<catalog>.<schema>.<name>`` (a managed table: ``saveAsTable`` / ``DeltaTable.forName``;
locally the same path runs against Spark's session catalog, ``spark_catalog.<schema>.<name>``). Catalog
and schema names are checked (``[A-Za-z0-9_]``) before any SQL is built from them. Writers go through
`replace_slice` or `merge` here, which check the DataFrame against the declared schema first and retry
on a concurrent writer's commit, so several stages may write one table at once. Reads never create
anything: a table no stage has written is an error. Every read and write records the table version in
`lineage`.
"""
from __future__ import annotations

import json
import os
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from restpg.config import Settings

WRITTEN_BY = {  # the sub-command that writes each table (named in "not written yet" errors)
    "examples": "ingest", "quarantine": "ingest", "retrievals": "retrieve", "reasoning_paths": "reason",
    "training_sets": "sft_data / filtering", "trajectories": "sample", "judge_scores": "judge",
    "eval_predictions": "evaluate", "eval_scores": "evaluate", "eval_summary": "evaluate", "eval_tests": "evaluate",
    "reward_validation": "validate_reward", "promotions": "promote", "stage_runs": "run",
    "user_profiles": "user_profiles", "peer_retrievals": "peer_retrieve", "generations": "generate",
}

TABLES = (
    "examples", "quarantine", "retrievals", "reasoning_paths", "training_sets", "trajectories",
    "judge_scores", "eval_predictions", "eval_scores", "eval_summary", "eval_tests",
    "reward_validation", "promotions", "stage_runs", "user_profiles", "peer_retrievals", "generations",
)


class SchemaMismatch(ValueError):
    pass


@dataclass(frozen=True)
class TableSpec:
    name: str
    description: str
    keys: tuple
    partition_by: tuple
    columns: tuple  # of dicts: name, type, nullable, comment

    @property
    def ddl(self) -> str:
        return ", ".join(f"`{c['name']}` {c['type']}" for c in self.columns)

    def struct(self):
        from pyspark.sql.types import StructField, StructType, _parse_datatype_string

        return StructType([
            StructField(c["name"], _parse_datatype_string(c["type"]), c["nullable"], {"comment": c["comment"]})
            for c in self.columns
        ])


@lru_cache(maxsize=None)
def spec(name: str) -> TableSpec:
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    doc = json.loads((resources.files("restpg.schemas") / f"{name}.json").read_text())
    return TableSpec(doc["table"], doc["description"], tuple(doc["keys"]), tuple(doc["partition_by"]), tuple(doc["columns"]))


@dataclass(frozen=True)
class TableRef:
    name: str
    fqn: str          # name in Spark SQL
    path: str | None  # Delta directory (local); None on Unity Catalog


_IDENTIFIER = re.compile(r"[A-Za-z0-9_]+")


def identifier(value: str, what: str = "identifier") -> str:
    """`value` if it is a plain SQL identifier (letters, digits, underscore), else an error: catalog,
    schema and column names are spliced into SQL text, where quoting alone is not a defence."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a plain identifier (only A-Z, a-z, 0-9 and _)")
    return value


def namespace(settings: Settings) -> tuple[str, str]:
    """(catalog, schema) the tables live in; local Delta directories are named in `spark_catalog`."""
    c = settings.catalog
    catalog = c.catalog if c.kind == "uc" else "spark_catalog"
    return identifier(catalog, "catalog.catalog"), identifier(c.schema, "catalog.schema")


def ref(settings: Settings, name: str) -> TableRef:
    spec(name)
    catalog_, schema = namespace(settings)
    if settings.catalog.kind == "uc":
        return TableRef(name, f"{catalog_}.{schema}.{name}", None)
    return TableRef(name, f"{schema}.{name}", str(settings.home_dir / "warehouse" / schema / name))


def use_namespace(spark, settings: Settings) -> None:
    """Make the tables' catalog and schema current, as a Databricks SQL editor does, so queries can
    name tables alone (`SELECT count(*) FROM examples`)."""
    catalog_, schema = namespace(settings)
    spark.catalog.setCurrentCatalog(catalog_)
    spark.catalog.setCurrentDatabase(schema)


_registered: dict[str, str] = {}


def _register(spark, r: TableRef) -> None:
    """Point the session's name at this home's directory (a session may serve several homes in tests)."""
    if _registered.get(r.fqn) == r.path:
        return
    spark.sql(f"DROP TABLE IF EXISTS {r.fqn}")  # external table: drops the name, never the data
    spark.sql(f"CREATE TABLE {r.fqn} USING DELTA LOCATION {_literal(r.path)}")
    _registered[r.fqn] = r.path


def register_tables(spark, settings: Settings) -> None:
    """Make every table that exists on disk queryable by name in this session (local profiles)."""
    from delta.tables import DeltaTable

    if settings.catalog.kind == "uc":
        return
    _create_schema(spark, settings)
    for name in TABLES:
        r = ref(settings, name)
        if DeltaTable.isDeltaTable(spark, r.path):
            _register(spark, r)
        elif r.fqn in _registered:
            spark.sql(f"DROP TABLE IF EXISTS {r.fqn}")
            del _registered[r.fqn]


def _create_schema(spark, settings: Settings) -> None:
    """The schema, when missing (checked first: on Unity Catalog creating one needs a privilege that
    writing into an existing one does not)."""
    name = ".".join(namespace(settings))
    if not spark.catalog.databaseExists(name):
        spark.sql(f"CREATE SCHEMA IF NOT EXISTS {name}")


# Creating and (re)registering a table name are catalog operations that two threads of one process
# must not interleave (DROP + CREATE of the same name); writers in other processes meet in Delta's log.
_catalog_lock = threading.Lock()


def ensure(spark, settings: Settings, name: str) -> TableRef:
    """Create the table from its declared schema when missing (idempotent)."""
    from delta.tables import DeltaTable

    r, s = ref(settings, name), spec(name)
    with _catalog_lock:
        _create_schema(spark, settings)
        if r.path:
            builder = (DeltaTable.createIfNotExists(spark).addColumns(s.struct()).comment(s.description)
                       .location(r.path).partitionedBy(*s.partition_by))
            _retrying(builder.property("delta.enableChangeDataFeed", "true").execute)
            _register(spark, r)
        else:  # DeltaTable's builder takes two-part names only; SQL takes the catalog's three
            _retrying(lambda: spark.sql(_create_table_sql(r.fqn, s)))
        _add_new_columns(spark, r, s)
    return r


_evolved: set[str] = set()


def _add_new_columns(spark, r: TableRef, s: TableSpec) -> None:
    """Columns the declared schema gained since the table was created (nullable ones only) are added to
    it, once per process: a table written by an older release takes the new rows, its old rows read null.
    A declared column that is not nullable and missing, or a column of another type, is an error."""
    key = f"{r.fqn}@{r.path}"
    if key in _evolved:
        return
    have = {f.name: f for f in _delta(spark, r).toDF().schema.fields}
    missing = [c for c in s.columns if c["name"] not in have]
    strict = [c["name"] for c in missing if not c["nullable"]]
    if strict:
        raise SchemaMismatch(f"table {r.fqn} lacks the required columns {strict}: it was written by another schema; "
                             f"migrate it or write to a new schema")
    if missing:
        added = ", ".join(f"`{c['name']}` {c['type']} COMMENT {_literal(c['comment'])}" for c in missing)
        target = f"delta.`{r.path}`" if r.path else r.fqn
        _retrying(lambda: spark.sql(f"ALTER TABLE {target} ADD COLUMNS ({added})"))
    _evolved.add(key)


def _create_table_sql(fqn: str, s: TableSpec) -> str:
    columns = ", ".join(f"`{c['name']}` {c['type']}{'' if c['nullable'] else ' NOT NULL'} COMMENT {_literal(c['comment'])}"
                        for c in s.columns)
    partitions = f" PARTITIONED BY ({', '.join(f'`{p}`' for p in s.partition_by)})" if s.partition_by else ""
    return (f"CREATE TABLE IF NOT EXISTS {fqn} ({columns}) USING DELTA{partitions} COMMENT {_literal(s.description)}"
            " TBLPROPERTIES ('delta.enableChangeDataFeed' = 'true')")


class TableNotFound(LookupError):
    pass


# Versions this process read and wrote, by table: `tracking.stage_run` resets it when a stage starts
# and logs it when the stage ends, so every entry path records its lineage without stage code.
lineage: dict[str, dict[str, int]] = {"read": {}, "written": {}}


def _delta(spark, r: TableRef):
    from delta.tables import DeltaTable

    return DeltaTable.forPath(spark, r.path) if r.path else DeltaTable.forName(spark, r.fqn)


def exists(spark, settings: Settings, name: str) -> bool:
    from delta.tables import DeltaTable

    r = ref(settings, name)
    return DeltaTable.isDeltaTable(spark, r.path) if r.path else spark.catalog.tableExists(r.fqn)


def read(spark, settings: Settings, name: str, version: int | None = None):
    """The table at `version` (default: its current version, pinned, so the stage reads one snapshot).
    No side effects: a table no stage has written yet is an error that names the stage to run."""
    r = ref(settings, name)
    if not exists(spark, settings, name):
        raise TableNotFound(f"table {r.fqn} has not been written yet: run `restpg {WRITTEN_BY.get(name, '...')}` first")
    version = _version(spark, r) if version is None else version
    lineage["read"][name] = version
    reader = spark.read.format("delta").option("versionAsOf", version)
    return reader.load(r.path) if r.path else reader.table(r.fqn)


def read_slice(spark, settings: Settings, name: str, slice_: dict, version: int | None = None):
    """Rows of `name` in one slice, e.g. ``{"variant": "rest_pg", "iteration": 2}``."""
    return read(spark, settings, name, version).where(predicate(slice_))


# A path table's commits are the files `_delta_log/<20-digit version>.json` (the Delta protocol's log, each
# created atomically by its writer); checkpoints and compacted logs have other names.
_COMMIT_FILE = re.compile(r"(\d{20})\.json")
HISTORY_DEPTH = 50  # commits searched for a write's own (concurrent writers commit between it and the search)


def _commit_versions(r: TableRef) -> list[int]:
    """Versions whose commit file is in a path table's log, newest first (empty for a catalog table)."""
    if not r.path:
        return []
    log_dir = Path(r.path) / "_delta_log"
    found = (_COMMIT_FILE.fullmatch(f) for f in os.listdir(log_dir)) if log_dir.is_dir() else ()
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def _commit_info(r: TableRef, version: int) -> dict:
    with open(Path(r.path) / "_delta_log" / f"{version:020d}.json", encoding="utf-8") as f:
        for line in f:
            action = json.loads(line)
            if "commitInfo" in action:
                return action["commitInfo"]
    return {}


def _version(spark, r: TableRef) -> int:
    """The table's current version: a path table's newest commit file, read from its log directly (a
    Spark job less per read and per write: this runs several times in every stage); a catalog table's
    from its history."""
    versions = _commit_versions(r)
    if versions:
        return versions[0]
    return int(_delta(spark, r).history(1).select("version").first()[0])


def version(spark, settings: Settings, name: str) -> int:
    """Current version of an existing table."""
    r = ref(settings, name)
    if not exists(spark, settings, name):
        raise TableNotFound(f"table {r.fqn} has not been written yet")
    return _version(spark, r)


def conform(df, name: str):
    """Columns in declared order with declared types; missing or extra columns are an error."""
    from pyspark.sql import functions as F

    s = spec(name)
    want = [c["name"] for c in s.columns]
    have = df.columns
    missing, extra = [c for c in want if c not in have], [c for c in have if c not in want]
    if missing or extra:
        raise SchemaMismatch(f"write to {name}: missing columns {missing}, unexpected columns {extra}")
    target = {f.name: f.dataType for f in s.struct().fields}
    actual = {f.name: f.dataType for f in df.schema.fields}
    wrong = [f"{c}: {actual[c].simpleString()} (declared {target[c].simpleString()})" for c in want
             if actual[c] != target[c] and not _safe_widen(actual[c], target[c])]
    if wrong:
        raise SchemaMismatch(f"write to {name}: wrong types: {'; '.join(wrong)}")
    return df.select(*[F.col(c).cast(target[c]).alias(c) for c in want])


def _safe_widen(actual, target) -> bool:
    from pyspark.sql.types import DoubleType, FloatType, IntegerType, LongType, NullType, ShortType

    ints = (ShortType, IntegerType, LongType)
    return (isinstance(actual, NullType) or (isinstance(actual, ints) and isinstance(target, ints + (DoubleType,)))
            or (isinstance(actual, FloatType) and isinstance(target, DoubleType)))


def _literal(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def predicate(slice_: dict, alias: str = "") -> str:
    """SQL predicate of a slice with literal values (column names checked, values escaped)."""
    for k in slice_:
        identifier(k, "column name")
    prefix = f"{alias}." if alias else ""
    return " AND ".join(f"{prefix}`{k}` = {_literal(v)}" for k, v in slice_.items()) or "true"


def _save(writer, r: TableRef):
    return writer.save(r.path) if r.path else writer.saveAsTable(r.fqn)


# Delta's optimistic-concurrency failures (another writer committed first; a retry re-reads the log), by
# error condition: delta-spark 4.0 (runtime 17.3) has no Python classes for them, later releases do.
_CONFLICTS = ("DELTA_CONCURRENT_", "DELTA_METADATA_CHANGED", "DELTA_PROTOCOL_CHANGED")
_CONFLICT_CLASSES = ("ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
                     "ConcurrentTransactionException", "ConcurrentWriteException", "MetadataChangedException",
                     "ProtocolChangedException")


def _names_a_conflict(class_name: str, condition: str | None) -> bool:
    return class_name in _CONFLICT_CLASSES or (condition or "").startswith(_CONFLICTS)


def _is_conflict(e) -> bool:
    """A Delta write conflict, however PySpark surfaced it: a converted exception with its error
    condition (Spark 4.1+), or a raw Py4JJavaError whose Java exception (or a cause of it) is one of
    Delta's concurrency exceptions (pyspark 4.0 / delta-spark 4.0, runtime 17.3)."""
    from py4j.protocol import Py4JError, Py4JJavaError

    if not isinstance(e, Py4JJavaError):
        return _names_a_conflict(type(e).__name__, e.getCondition())
    java, depth = e.java_exception, 0
    while java is not None and depth < 5:
        try:
            condition = java.getErrorClass()
        except Py4JError:  # not a SparkThrowable: no error class
            condition = None
        if _names_a_conflict(java.getClass().getSimpleName(), condition):
            return True
        java, depth = java.getCause(), depth + 1
    return False


RETRIES = 8
retried = {"count": 0}  # conflicts retried by this process (the concurrency test reads it)


def _retrying(commit):
    """Run `commit` until no concurrent writer beats it. Every write here is idempotent (a slice
    overwrite or a keyed merge), so running it again after a conflict cannot duplicate rows."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    for attempt in range(RETRIES):
        try:
            return commit()
        except (PySparkException, Py4JJavaError) as e:
            if not _is_conflict(e) or attempt == RETRIES - 1:
                raise
            retried["count"] += 1
            time.sleep(random.uniform(0.05, 0.2) * 2 ** attempt)


def _metadata(run_id: str, slice_: dict) -> str:
    """userMetadata of one commit; `commit` finds this write's version among concurrent ones."""
    return json.dumps({"run_id": run_id, "slice": slice_, "commit": uuid.uuid4().hex})


def _written(spark, settings: Settings, name: str, metadata: str) -> int:
    """The version this write committed (tagged with `metadata`), else the current one: a merge of nothing
    new commits nothing, and the table stands as it was."""
    from pyspark.sql import functions as F

    r = ref(settings, name)
    versions = _commit_versions(r)[:HISTORY_DEPTH]
    if versions:
        mine = next((v for v in versions if _commit_info(r, v).get("userMetadata") == metadata), None)
        latest = versions[0]
    else:
        history = _delta(spark, r).history(HISTORY_DEPTH)
        mine, latest = history.select(F.max(F.when(F.col("userMetadata") == metadata, F.col("version"))),
                                      F.max("version")).first()
    v = int(latest if mine is None else mine)
    lineage["written"][name] = v
    return v


def replace_slice(spark, settings: Settings, df, name: str, slice_: dict, run_id: str) -> int:
    """Atomically replace exactly `slice_` (e.g. variant + iteration) with `df`; returns the new version.
    On a partitioned table a slice of partition columns never conflicts with writers of other slices."""
    r = ensure(spark, settings, name)
    df = conform(df, name)
    metadata = _metadata(run_id, slice_)
    writer = (df.write.format("delta").mode("overwrite").option("replaceWhere", predicate(slice_))
              .option("userMetadata", metadata))
    _retrying(lambda: _save(writer, r))
    return _written(spark, settings, name, metadata)


# A merge can only tag its commit through the session conf, which every thread of the session shares:
# one merge at a time per process carries its own tag.
_merge_lock = threading.Lock()


def merge(spark, settings: Settings, df, name: str, run_id: str, *, slice_: dict | None = None,
          keys: tuple | None = None, update: bool = False) -> int:
    """MERGE on the table's keys: insert rows whose keys are new (re-runs never duplicate); with
    `update`, replace rows whose keys exist. `slice_` (literal values) confines the merge to one slice:
    on partition columns Delta then sees no conflict with writers of other slices; anything that still
    conflicts is retried."""
    r = ensure(spark, settings, name)
    df = conform(df, name)
    keys = keys or spec(name).keys
    cond = " AND ".join(f"t.`{identifier(k, 'key')}` = s.`{k}`" for k in keys)
    if slice_:
        cond = f"{predicate(slice_, 't')} AND {cond}"
    metadata = _metadata(run_id, slice_ or {})

    def commit():
        builder = _delta(spark, r).alias("t").merge(df.alias("s"), cond)
        if update:
            builder = builder.whenMatchedUpdateAll()
        with _merge_lock:
            spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", metadata)
            try:
                builder.whenNotMatchedInsertAll().execute()
            finally:
                spark.conf.unset("spark.databricks.delta.commitInfo.userMetadata")

    _retrying(commit)
    return _written(spark, settings, name, metadata)
