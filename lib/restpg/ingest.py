"""LongLaMP records (JSON lines, JSON arrays or Parquet) → `examples`, refused records → `quarantine`.

Parsing is a pure function of one record (`parse_record`), run on the executors over
``(line, line_number)`` pairs, so one bad line never fails the batch. Every record read is accounted
for: ``valid + quarantined + blank lines = records read``. Defined outcomes for awkward input:

- a UTF-8 byte order mark is removed; a NUL character anywhere in the record → quarantine;
- a text field longer than `data.max_field_chars` → quarantine (the example) or the item is dropped;
- numeric user ids are accepted as strings; input/output of another type → quarantine;
- one unusable profile item is dropped (a quarantine row of its own, the example keeps the rest);
- a file that starts like a JSON array but does not parse is one file-level quarantine row.
"""
from __future__ import annotations

import hashlib
import os
import json
from dataclasses import dataclass

from restpg import catalog, tasks
from restpg.config import Settings
from restpg.tracking import say

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"dev": "val", "validation": "val", "valid": "val"}


def _hash(*parts: str, n: int = 16) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:n]


def auto_split(user_id: str) -> str:
    """Deterministic 80/10/10 split by user (LongLaMP's user-based setting)."""
    bucket = int(_hash(user_id, n=8), 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


BOM = "\ufeff"


@dataclass
class Parsed:
    example: dict | None = None
    reason: str | None = None
    dropped_items: list | None = None  # (item index, raw item JSON, reason) of profile items left out


def _has_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _too_long(text: str, limit: int) -> bool:
    return limit > 0 and len(text) > limit


def parse_record(line: str, task_name: str | None, split: str | None, max_chars: int = 0) -> Parsed:
    """One raw record → an example dict, or the reason it is refused."""
    line = line.lstrip(BOM) if isinstance(line, str) else line
    if isinstance(line, str) and "\x00" in line:
        return Parsed(reason="contains NUL characters")
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, TypeError) as e:
        return Parsed(reason=f"not JSON: {e.msg if hasattr(e, 'msg') else e}")
    if not isinstance(rec, dict):
        return Parsed(reason=f"not a JSON object but {type(rec).__name__}")
    if _has_nul(rec):  # an escaped NUL (\u0000) decodes to one too
        return Parsed(reason="contains NUL characters")
    name = rec.get("task") or task_name
    if not name:
        return Parsed(reason="no task: the record has no 'task' field and none was given")
    spec = tasks.resolve(str(name))
    if spec is None:
        return Parsed(reason=f"unknown task {name!r}; known: {', '.join(tasks.TASKS)}")
    for key in ("input", "output"):
        if key not in rec or rec[key] is None:
            return Parsed(reason=f"missing {key}")
        if not isinstance(rec[key], str):
            return Parsed(reason=f"{key} is not a string")
    if not rec["input"].strip():
        return Parsed(reason="empty input")
    if not rec["output"].strip():
        return Parsed(reason="empty output")
    for key in ("input", "output"):
        if _too_long(rec[key], max_chars):
            return Parsed(reason=f"{key} too long: {len(rec[key])} characters (data.max_field_chars {max_chars})")
    user = next((rec[k] for k in spec.user_keys if rec.get(k) not in (None, "")), None)
    if user is None:
        return Parsed(reason=f"no user id (looked for {', '.join(spec.user_keys)})")
    if isinstance(user, bool) or not isinstance(user, (str, int)):
        return Parsed(reason=f"user id is a {type(user).__name__}, not a string or an integer")
    profile = rec.get("profile", [])
    if profile is None:
        profile = []
    if not isinstance(profile, list):
        return Parsed(reason=f"profile is not a list but {type(profile).__name__}")
    items, dropped = [], []
    for i, item in enumerate(profile):
        if not isinstance(item, dict):
            dropped.append((i, json.dumps(item, default=str), f"profile item {i} is not an object"))
            continue
        fields = {str(k): "" if v is None else str(v) for k, v in item.items()}
        text = tasks.item_text(spec, fields)
        if not text:
            dropped.append((i, json.dumps(item, default=str), f"profile item {i} has none of the fields {', '.join(spec.item_fields)}"))
            continue
        if _too_long(text, max_chars):
            dropped.append((i, json.dumps(item, default=str)[:1000], f"profile item {i} too long: {len(text)} characters"))
            continue
        items.append({"item_id": _hash(str(user), json.dumps(fields, sort_keys=True), n=12), "text": text, "fields": fields})
    rec_split = split or rec.get("split")
    rec_split = SPLIT_ALIASES.get(rec_split, rec_split) if rec_split else auto_split(str(user))
    if rec_split not in SPLITS:
        return Parsed(reason=f"unknown split {rec_split!r}; known: {', '.join(SPLITS)}")
    return Parsed(example={
        "example_id": _hash(spec.name, str(user), rec["input"], rec["output"]),
        "task": spec.name, "split": rec_split, "user_id": str(user),
        "input": rec["input"], "target": rec["output"], "profile": items,
    }, dropped_items=dropped)


FILE_LEVEL = "file: "  # prefix of the reason of a quarantine row that stands for a whole file


def _raw_lines(spark, source: str):
    """(RDD of (raw_text, record_number), blank lines skipped) for JSON lines, a JSON array, or Parquet
    rows. A JSON array that does not parse becomes one record whose reason starts with FILE_LEVEL."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"no such file or directory: {source}")
    if source.endswith(".parquet") or os.path.isdir(source):
        df = spark.read.parquet(source)
        from pyspark.sql import functions as F

        return df.select(F.to_json(F.struct(*df.columns))).rdd.map(lambda r: r[0]).zipWithIndex(), 0
    text = spark.sparkContext.textFile(source)
    head = text.take(1)
    if head and head[0].lstrip(BOM).lstrip().startswith("["):
        whole = "\n".join(text.collect()).lstrip(BOM)
        try:
            records = json.loads(whole)
            if not isinstance(records, list):
                raise ValueError(f"a JSON {type(records).__name__}, not an array")
        except ValueError as e:
            reason = f"{FILE_LEVEL}not a readable JSON array ({getattr(e, 'msg', e)})"
            return spark.sparkContext.parallelize([(FILE_LEVEL + reason[len(FILE_LEVEL):] + "\n" + whole[:10000], 0)]), 0
        return spark.sparkContext.parallelize([json.dumps(r) for r in records]).zipWithIndex(), 0
    numbered = text.zipWithIndex()
    blank = numbered.filter(lambda p: p[0].lstrip(BOM).strip() == "").count()
    return numbered.filter(lambda p: p[0].lstrip(BOM).strip() != ""), blank


def run(spark, settings: Settings, *, source: str, task: str | None = None, split: str | None = None,
        run_id: str) -> dict:
    """Ingest one file; returns counts. Re-ingesting the same file leaves the same rows."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, IntegerType, LongType, StringType, StructField, StructType

    if task and tasks.resolve(task) is None:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(tasks.TASKS)}")
    if split:
        split = SPLIT_ALIASES.get(split, split)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    ex_struct = catalog.spec("examples").struct()
    example_type = StructType([f for f in ex_struct.fields if f.name in ("example_id", "task", "split", "user_id", "input", "target", "profile")])
    dropped_type = ArrayType(StructType([StructField("index", IntegerType()), StructField("raw", StringType()),
                                         StructField("reason", StringType())]))
    parsed_schema = StructType([StructField("record_number", LongType(), False), StructField("raw_record", StringType(), False),
                                StructField("example", example_type, True), StructField("reason", StringType(), True),
                                StructField("dropped", dropped_type, True)])
    max_chars = settings.data.max_field_chars

    def parse(pair):
        line, number = pair
        if line.startswith(FILE_LEVEL):  # the whole file is one unreadable record
            reason, _, raw = line.partition("\n")
            return (number, raw, None, reason, [])
        p = parse_record(line, task, split, max_chars)
        return (number + 1, line, p.example, p.reason, [(i, raw, why) for i, raw, why in (p.dropped_items or [])])

    lines, blank = _raw_lines(spark, source)
    parsed = spark.createDataFrame(lines.map(parse), parsed_schema)
    first = Window.partitionBy("example.example_id").orderBy("record_number")
    parsed = (parsed.withColumn("first_number", F.when(F.col("example").isNotNull(), F.min("record_number").over(first)))
              .withColumn("reason", F.coalesce("reason", F.when(F.col("first_number") != F.col("record_number"),
                                                                 F.concat(F.lit("duplicate of record "), F.col("first_number").cast("string")))))
              .withColumn("source_file", F.lit(source)).withColumn("run_id", F.lit(run_id))
              .withColumn("created_at", F.current_timestamp()).cache())
    good = parsed.where("reason IS NULL").select("example.*", "source_file", "record_number", "run_id", "created_at")
    bad = parsed.where("reason IS NOT NULL").select(
        F.substring(F.sha1(F.concat_ws("\x1f", "source_file", F.col("record_number").cast("string"), "raw_record")), 1, 16).alias("quarantine_id"),
        "source_file", "record_number", F.lit(task).cast("string").alias("task"), "raw_record", "reason", "run_id", "created_at")
    items = (parsed.where("reason IS NULL").select("source_file", "record_number", "run_id", "created_at", F.explode("dropped").alias("d"))
             .select(F.substring(F.sha1(F.concat_ws("\x1f", "source_file", F.col("record_number").cast("string"), F.lit("item"),
                                                    F.col("d.index").cast("string"), "d.raw")), 1, 16).alias("quarantine_id"),
                     "source_file", "record_number", F.lit(task).cast("string").alias("task"), F.col("d.raw").alias("raw_record"),
                     F.col("d.reason").alias("reason"), "run_id", "created_at"))
    bad = bad.unionByName(items)
    before = catalog.read(spark, settings, "examples").count() if catalog.exists(spark, settings, "examples") else 0
    catalog.merge(spark, settings, good, "examples", run_id)
    catalog.merge(spark, settings, bad, "quarantine", run_id)
    after = catalog.read(spark, settings, "examples").count()
    valid = good.count()
    kind = F.regexp_replace(F.regexp_replace(F.regexp_replace("reason", ":.*$", ""), "duplicate of record .*", "duplicate"),
                            "profile item [0-9]+", "profile item")
    reasons = {r["kind"]: r["n"] for r in bad.select(kind.alias("kind")).groupBy("kind").agg(F.count("*").alias("n")).collect()}
    counts = lambda col: {r[col]: r["n"] for r in good.groupBy(col).agg(F.count("*").alias("n")).collect()}  # noqa: E731
    records, quarantined, dropped_items = parsed.count(), parsed.where("reason IS NOT NULL").count(), items.count()
    report = {"source": source, "records_read": records + blank, "records": records, "blank_lines": blank, "valid": valid,
              "inserted": after - before, "already_present": valid - (after - before), "quarantined": quarantined,
              "profile_items_dropped": dropped_items, "reasons": reasons, "splits": counts("split"), "tasks": counts("task")}
    say(f"ingest {source}: {records + blank} records read = {valid} valid + {quarantined} quarantined + {blank} blank "
        f"({dropped_items} profile items dropped)")
    parsed.unpersist()
    catalog.register_tables(spark, settings)
    return report
