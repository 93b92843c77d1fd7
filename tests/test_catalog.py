"""Tables by name: reads without side effects, slices, one merge helper, lineage, concurrent writers.

Every table test runs twice: on local Delta directories (`catalog.kind: path`) and on the Unity Catalog
code path (`catalog.kind: uc`: three-part names, managed tables, `saveAsTable`, `DeltaTable.forName`)
against Spark's session catalog, `spark_catalog.<schema>.<table>`.
"""
from __future__ import annotations

import threading
import uuid

import pytest

from helpers import make_settings, rows_df, write_rows
from restpg import catalog
from restpg.config import load_settings


@pytest.fixture(params=["path", "uc"])
def cat_settings(request, spark, tmp_path):
    """Settings on a fresh home; for `uc` also a schema of its own in the session catalog."""
    if request.param == "path":
        yield make_settings(tmp_path / "home")
        return
    schema = f"uc_{uuid.uuid4().hex[:8]}"
    yield make_settings(tmp_path / "home", "catalog.kind=uc", "catalog.catalog=spark_catalog", f"catalog.schema={schema}")
    spark.sql(f"DROP SCHEMA IF EXISTS spark_catalog.{schema} CASCADE")


def _traj(variant: str, iteration: int, n: int, text: str = "x") -> list[dict]:
    return [{"variant": variant, "iteration": iteration, "example_id": f"e{i}", "task": "product_review", "sample_index": 0,
             "raw_text": text} for i in range(n)]


def test_reading_a_table_never_written_is_an_error_and_creates_nothing(spark, cat_settings):
    s = cat_settings
    with pytest.raises(catalog.TableNotFound, match="restpg sample"):
        catalog.read(spark, s, "trajectories")
    assert not catalog.exists(spark, s, "trajectories")
    assert not spark.catalog.tableExists(catalog.ref(s, "trajectories").fqn)
    assert not (s.home_dir / "warehouse" / "restpg" / "trajectories").exists()


def test_uc_tables_are_managed_three_part_names(spark, cat_settings):
    s = cat_settings
    v = write_rows(spark, s, "trajectories", _traj("rest_pg", 1, 2))
    r = catalog.ref(s, "trajectories")
    detail = spark.sql(f"DESCRIBE DETAIL {r.fqn}").first()
    if s.catalog.kind == "uc":
        assert r.fqn == f"spark_catalog.{s.catalog.schema}.trajectories" and r.path is None
        assert spark.sql(f"DESCRIBE TABLE EXTENDED {r.fqn}").where("col_name = 'Type'").first().data_type == "MANAGED"
    else:
        assert r.fqn == "restpg.trajectories" and detail.location.endswith(r.path)
    assert detail.format == "delta" and detail.partitionColumns == ["variant", "iteration"]
    assert spark.table(r.fqn).count() == 2 and catalog.version(spark, s, "trajectories") == v


@pytest.mark.parametrize("field, value", [
    ("catalog", "main; DROP TABLE x"), ("schema", "restpg`"), ("schema", "a.b"), ("catalog", "ca-t"), ("schema", "my schema"),
])
def test_catalog_and_schema_names_are_checked_before_any_sql(field, value, tmp_path):
    settings = load_settings("local", ["catalog.kind=uc", f"catalog.{field}={value}"], home=str(tmp_path))
    with pytest.raises(ValueError, match="plain identifier"):
        catalog.ref(settings, "examples")


def test_read_slice_and_replace_slice_touch_one_slice(spark, cat_settings):
    s = cat_settings
    write_rows(spark, s, "trajectories", _traj("rest_pg", 1, 3) + _traj("rest_em", 1, 2))
    write_rows(spark, s, "trajectories", _traj("rest_pg", 1, 1, "y"), {"variant": "rest_pg", "iteration": 1})
    assert catalog.read_slice(spark, s, "trajectories", {"variant": "rest_pg", "iteration": 1}).count() == 1
    assert catalog.read_slice(spark, s, "trajectories", {"variant": "rest_em", "iteration": 1}).count() == 2


def test_slice_values_are_escaped_and_column_names_checked():
    assert catalog.predicate({"variant": "it's", "iteration": 2}) == "`variant` = 'it\\'s' AND `iteration` = 2"
    with pytest.raises(ValueError):
        catalog.predicate({"variant = 'x' OR 1": 1})


def test_merge_inserts_new_keys_only_and_updates_on_request(spark, cat_settings):
    s = cat_settings
    catalog.merge(spark, s, rows_df(spark, "trajectories", _traj("rest_pg", 1, 2)), "trajectories", "r1")
    catalog.merge(spark, s, rows_df(spark, "trajectories", _traj("rest_pg", 1, 3, "new")), "trajectories", "r2",
                  slice_={"variant": "rest_pg", "iteration": 1})
    rows = {r.example_id: r.raw_text for r in catalog.read(spark, s, "trajectories").collect()}
    assert rows == {"e0": "x", "e1": "x", "e2": "new"}  # insert-only: existing keys keep their rows
    catalog.merge(spark, s, rows_df(spark, "trajectories", _traj("rest_pg", 1, 1, "upd")), "trajectories", "r3", update=True)
    assert {r.example_id: r.raw_text for r in catalog.read(spark, s, "trajectories").collect()}["e0"] == "upd"


def test_merging_nothing_new_returns_the_standing_version(spark, cat_settings):
    """An empty source or only existing keys (a re-run, an ingest without bad records) commits nothing."""
    s = cat_settings
    v = catalog.merge(spark, s, rows_df(spark, "trajectories", _traj("rest_pg", 1, 2)), "trajectories", "r1")
    assert catalog.merge(spark, s, rows_df(spark, "trajectories", []), "trajectories", "r2") == v
    assert catalog.merge(spark, s, rows_df(spark, "trajectories", _traj("rest_pg", 1, 2)), "trajectories", "r3") == v
    assert catalog.read(spark, s, "trajectories").count() == 2


def test_reads_and_writes_record_their_versions(spark, cat_settings):
    s = cat_settings
    catalog.lineage["read"].clear(), catalog.lineage["written"].clear()
    v = write_rows(spark, s, "trajectories", _traj("rest_pg", 1, 1))
    catalog.read(spark, s, "trajectories")
    assert catalog.lineage == {"read": {"trajectories": v}, "written": {"trajectories": v}}


def test_the_versions_a_write_returns_are_the_commits_deltas_history_shows(spark, cat_settings):
    """Write and read versions come from the table's log (path tables) or its history (catalog tables);
    either way each write returns the commit that carries its own run id, and a merge of nothing new the
    standing version."""
    s = cat_settings
    first = catalog.replace_slice(spark, s, rows_df(spark, "trajectories", _traj("rest_pg", 1, 2)), "trajectories",
                                  {"variant": "rest_pg", "iteration": 1}, "r1")
    second = catalog.merge(spark, s, rows_df(spark, "trajectories", _traj("rest_em", 1, 2)), "trajectories", "r2")
    nothing = catalog.merge(spark, s, rows_df(spark, "trajectories", _traj("rest_em", 1, 2)), "trajectories", "r3")
    history = {h.version: h.userMetadata for h in catalog._delta(spark, catalog.ref(s, "trajectories")).history().collect()}
    assert '"run_id": "r1"' in history[first] and '"run_id": "r2"' in history[second]
    assert nothing == second == max(history) == catalog.version(spark, s, "trajectories")


def test_two_writers_on_different_slices_at_once_lose_nothing(spark, cat_settings):
    """Two EM variants' stages at once (the bundle's for-each runs with concurrency): each merges chunks
    into its slice of a partitioned table and replaces its slice of an unpartitioned one, interleaved
    with the other; every row of both ends up there exactly once."""
    s = cat_settings
    write_rows(spark, s, "trajectories", _traj("seed", 0, 1))
    write_rows(spark, s, "eval_scores", [{"variant": "seed", "example_id": "s0"}])
    retried_before = catalog.retried["count"]
    errors = []

    def writer(variant):
        try:
            for chunk in range(3):
                rows = [{**r, "example_id": f"{variant}-{chunk}-{r['example_id']}"} for r in _traj(variant, 1, 4)]
                catalog.merge(spark, s, rows_df(spark, "trajectories", rows), "trajectories", variant,
                              slice_={"variant": variant, "iteration": 1})
                scores = [{"variant": variant, "split": "test", "example_id": f"{variant}-{c}-{i}", "judge_score": float(c)}
                          for c in range(chunk + 1) for i in range(2)]
                catalog.replace_slice(spark, s, rows_df(spark, "eval_scores", scores), "eval_scores",
                                      {"variant": variant}, run_id=variant)
        except Exception as e:  # noqa: BLE001 - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(v,)) for v in ("rest_em", "rest_pg")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    trajectories = [(r.variant, r.iteration, r.example_id) for r in catalog.read(spark, s, "trajectories").collect()]
    assert sorted(trajectories) == sorted([("seed", 0, "e0")] + [(v, 1, f"{v}-{c}-e{i}") for v in ("rest_em", "rest_pg")
                                                                 for c in range(3) for i in range(4)])
    scores = [(r.variant, r.example_id, r.judge_score) for r in catalog.read(spark, s, "eval_scores").collect()]
    assert sorted(scores) == sorted([("seed", "s0", 0.0)] + [(v, f"{v}-{c}-{i}", float(c)) for v in ("rest_em", "rest_pg")
                                                             for c in range(3) for i in range(2)])
    history = catalog._delta(spark, catalog.ref(s, "eval_scores")).history().collect()
    assert sum(1 for h in history if h.operation in ("WRITE", "CREATE OR REPLACE TABLE AS SELECT", "REPLACE TABLE AS SELECT")
               and '"slice": {"variant": "rest_' in (h.userMetadata or "")) == 6
    print(f"conflicts retried: {catalog.retried['count'] - retried_before}")


def test_a_table_written_before_a_new_nullable_column_takes_it_and_keeps_its_rows(spark, cat_settings):
    """judge_scores gained `reward_terms`: a table created by the older schema gets the column on the next
    write; its old rows read null, new rows carry the value, nothing is lost or duplicated."""
    import dataclasses

    s = cat_settings
    r, new = catalog.ref(s, "judge_scores"), catalog.spec("judge_scores")
    old = dataclasses.replace(new, columns=tuple(c for c in new.columns if c["name"] != "reward_terms"))
    catalog._create_schema(spark, s)
    spark.sql(catalog._create_table_sql(f"delta.`{r.path}`" if r.path else r.fqn, old))
    if r.path:
        catalog._register(spark, r)
    row = {"variant": "pat", "iteration": 1, "example_id": "e0", "task": "product_review", "sample_index": 0,
           "reward_kind": "embedding", "judge_model": "m", "reward": 0.5, "format_ok": True, "response_chars": 3,
           "reasoning_chars": 0, "run_id": "old"}
    legacy = rows_df(spark, "judge_scores", [row]).drop("reward_terms")
    writer = legacy.write.format("delta").mode("append")
    writer.save(r.path) if r.path else writer.saveAsTable(r.fqn)
    catalog.merge(spark, s, rows_df(spark, "judge_scores", [{**row, "sample_index": 1, "reward_terms": {"quality": 0.5}},
                                                            {**row}]), "judge_scores", "new")
    got = {x.sample_index: x for x in catalog.read(spark, s, "judge_scores").collect()}
    assert set(got) == {0, 1} and got[0].reward_terms is None and got[0].run_id == "old"
    assert dict(got[1].reward_terms) == {"quality": 0.5}


def test_a_missing_required_column_is_an_error_not_a_silent_change(spark, tmp_path):
    import dataclasses

    s = make_settings(tmp_path / "home")
    r, new = catalog.ref(s, "judge_scores"), catalog.spec("judge_scores")
    old = dataclasses.replace(new, columns=tuple(c for c in new.columns if c["name"] != "format_ok"))
    catalog._create_schema(spark, s)
    spark.sql(catalog._create_table_sql(f"delta.`{r.path}`", old))
    with pytest.raises(catalog.SchemaMismatch, match=r"lacks the required columns \['format_ok'\]"):
        catalog.ensure(spark, s, "judge_scores")


def test_local_spark_follows_the_profiles_adaptive_and_codegen_settings(spark, settings):
    """The local profile turns adaptive execution and generated code off (each re-plans or compiles every
    tiny query for no gain); the session the suite shares was built from that profile, and interprets."""
    assert settings.spark.adaptive is False and settings.spark.codegen is False
    assert spark.conf.get("spark.sql.adaptive.enabled") == "false"
    assert spark.conf.get("spark.sql.codegen.wholeStage") == "false"
    assert spark.conf.get("spark.sql.codegen.factoryMode") == "NO_CODEGEN"
    plan = spark.range(3).selectExpr("id * 2 AS x").where("x > 1")._jdf.queryExecution().executedPlan().toString()
    assert "*(" not in plan  # no whole-stage codegen stage marker
