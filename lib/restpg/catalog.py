"""Tables by logical name: schemas from `schemas/`, locations per profile, re-runnable writes.

Locally a table is a Delta directory under ``$RESTPG_HOME/warehouse/<schema>/<name>`` registered in the
session catalog as ``<schema>.<name>`` (so Spark SQL finds it by name); on Databricks it is the Unity
Catalog table ``<catalog>.<schema>.<name>``. Writers go through `replace_slice` or `merge` here, which
check the DataFrame against the declared schema first. Reads never create anything: a table no stage
has written is an error. Every read and write records the table version in `lineage`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from restpg.config import Settings

WRITTEN_BY = {  # the sub-command that writes each table (named in "not written yet" errors)
    "examples": "ingest", "quarantine": "ingest", "retrievals": "retrieve", "reasoning_paths": "reason",
    "training_sets": "sft_data / filtering", "trajectories": "sample", "judge_scores": "judge",
    "eval_predictions": "evaluate", "eval_scores": "evaluate", "eval_summary": "evaluate", "eval_tests": "evaluate",
    "reward_validation": "validate_reward", "promotions": "promote", "stage_runs": "run",
    "user_profiles": "user_profiles", "peer_retrievals": "peer_retrieve",
}

TABLES = (
    "examples", "quarantine", "retrievals", "reasoning_paths", "training_sets", "trajectories",
    "judge_scores", "eval_predictions", "eval_scores", "eval_summary", "eval_tests",
    "reward_validation", "promotions", "stage_runs", "user_profiles", "peer_retrievals",
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


def ref(settings: Settings, name: str) -> TableRef:
    spec(name)
    c = settings.catalog
    if c.kind == "uc":
        return TableRef(name, f"{c.catalog}.{c.schema}.{name}", None)
    return TableRef(name, f"{c.schema}.{name}", str(settings.home_dir / "warehouse" / c.schema / name))


_registered: dict[str, str] = {}


def _register(spark, r: TableRef) -> None:
    """Point the session's name at this home's directory (a session may serve several homes in tests)."""
    if _registered.get(r.fqn) == r.path:
        return
    spark.sql(f"DROP TABLE IF EXISTS {r.fqn}")  # external table: drops the name, never the data
    spark.sql(f"CREATE TABLE {r.fqn} USING DELTA LOCATION '{r.path}'")
    _registered[r.fqn] = r.path


def register_tables(spark, settings: Settings) -> None:
    """Make every table that exists on disk queryable by name in this session (local profiles)."""
    from delta.tables import DeltaTable

    if settings.catalog.kind == "uc":
        return
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {settings.catalog.schema}")
    for name in TABLES:
        r = ref(settings, name)
        if DeltaTable.isDeltaTable(spark, r.path):
            _register(spark, r)
        elif r.fqn in _registered:
            spark.sql(f"DROP TABLE IF EXISTS {r.fqn}")
            del _registered[r.fqn]


def ensure(spark, settings: Settings, name: str) -> TableRef:
    """Create the table from its declared schema when missing (idempotent)."""
    from delta.tables import DeltaTable

    r, s = ref(settings, name), spec(name)
    builder = DeltaTable.createIfNotExists(spark).addColumns(s.struct()).comment(s.description)
    builder = builder.location(r.path) if r.path else builder.tableName(r.fqn)
    if s.partition_by:
        builder = builder.partitionedBy(*s.partition_by)
    builder.property("delta.enableChangeDataFeed", "true").execute()
    if r.path:
        spark.sql(f"CREATE DATABASE IF NOT EXISTS {settings.catalog.schema}")
        _register(spark, r)
    return r


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


def _version(spark, r: TableRef) -> int:
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
        if not k.replace("_", "").isalnum():
            raise ValueError(f"not a column name: {k!r}")
    prefix = f"{alias}." if alias else ""
    return " AND ".join(f"{prefix}`{k}` = {_literal(v)}" for k, v in slice_.items()) or "true"


def _save(writer, r: TableRef):
    return writer.save(r.path) if r.path else writer.saveAsTable(r.fqn)


def _written(spark, settings: Settings, name: str) -> int:
    v = _version(spark, ref(settings, name))
    lineage["written"][name] = v
    return v


def replace_slice(spark, settings: Settings, df, name: str, slice_: dict, run_id: str) -> int:
    """Atomically replace exactly `slice_` (e.g. variant + iteration) with `df`; returns the new version."""
    r = ensure(spark, settings, name)
    df = conform(df, name)
    writer = (df.write.format("delta").mode("overwrite").option("replaceWhere", predicate(slice_))
              .option("userMetadata", json.dumps({"run_id": run_id, "slice": slice_})))
    _save(writer, r)
    return _written(spark, settings, name)


def merge(spark, settings: Settings, df, name: str, run_id: str, *, slice_: dict | None = None,
          keys: tuple | None = None, update: bool = False) -> int:
    """MERGE on the table's keys: insert rows whose keys are new (re-runs never duplicate); with
    `update`, replace rows whose keys exist. `slice_` (literal values) confines the merge to one slice,
    so two writers on different slices of one table never conflict."""
    r = ensure(spark, settings, name)
    df = conform(df, name)
    keys = keys or spec(name).keys
    cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
    if slice_:
        cond = f"{predicate(slice_, 't')} AND {cond}"
    builder = _delta(spark, r).alias("t").merge(df.alias("s"), cond)
    if update:
        builder = builder.whenMatchedUpdateAll()
    spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", json.dumps({"run_id": run_id, "slice": slice_ or {}}))
    try:
        builder.whenNotMatchedInsertAll().execute()
    finally:
        spark.conf.unset("spark.databricks.delta.commitInfo.userMetadata")
    return _written(spark, settings, name)
