"""Tables by name: reads without side effects, slices, one merge helper, lineage, concurrent writers."""
from __future__ import annotations

import threading

import pytest

from helpers import rows_df, write_rows
from restpg import catalog


def _traj(variant: str, iteration: int, n: int, text: str = "x") -> list[dict]:
    return [{"variant": variant, "iteration": iteration, "example_id": f"e{i}", "task": "product_review", "sample_index": 0,
             "raw_text": text} for i in range(n)]


def test_reading_a_table_never_written_is_an_error_and_creates_nothing(spark, fresh_settings):
    with pytest.raises(catalog.TableNotFound, match="restpg sample"):
        catalog.read(spark, fresh_settings, "trajectories")
    assert not catalog.exists(spark, fresh_settings, "trajectories")
    assert not (fresh_settings.home_dir / "warehouse" / "restpg" / "trajectories").exists()


def test_read_slice_and_replace_slice_touch_one_slice(spark, fresh_settings):
    s = fresh_settings
    write_rows(spark, s, "trajectories", _traj("rest_pg", 1, 3) + _traj("rest_em", 1, 2))
    write_rows(spark, s, "trajectories", _traj("rest_pg", 1, 1, "y"), {"variant": "rest_pg", "iteration": 1})
    assert catalog.read_slice(spark, s, "trajectories", {"variant": "rest_pg", "iteration": 1}).count() == 1
    assert catalog.read_slice(spark, s, "trajectories", {"variant": "rest_em", "iteration": 1}).count() == 2


def test_slice_values_are_escaped_and_column_names_checked():
    assert catalog.predicate({"variant": "it's", "iteration": 2}) == "`variant` = 'it\\'s' AND `iteration` = 2"
    with pytest.raises(ValueError):
        catalog.predicate({"variant = 'x' OR 1": 1})


def test_merge_inserts_new_keys_only_and_updates_on_request(spark, fresh_settings):
    s = fresh_settings
    catalog.merge(spark, s, rows_df(spark, "trajectories", _traj("rest_pg", 1, 2)), "trajectories", "r1")
    catalog.merge(spark, s, rows_df(spark, "trajectories", _traj("rest_pg", 1, 3, "new")), "trajectories", "r2",
                  slice_={"variant": "rest_pg", "iteration": 1})
    rows = {r.example_id: r.raw_text for r in catalog.read(spark, s, "trajectories").collect()}
    assert rows == {"e0": "x", "e1": "x", "e2": "new"}  # insert-only: existing keys keep their rows
    catalog.merge(spark, s, rows_df(spark, "trajectories", _traj("rest_pg", 1, 1, "upd")), "trajectories", "r3", update=True)
    assert {r.example_id: r.raw_text for r in catalog.read(spark, s, "trajectories").collect()}["e0"] == "upd"


def test_reads_and_writes_record_their_versions(spark, fresh_settings):
    s = fresh_settings
    catalog.lineage["read"].clear(), catalog.lineage["written"].clear()
    v = write_rows(spark, s, "trajectories", _traj("rest_pg", 1, 1))
    catalog.read(spark, s, "trajectories")
    assert catalog.lineage == {"read": {"trajectories": v}, "written": {"trajectories": v}}


def test_two_writers_on_different_slices_at_once_lose_nothing(spark, fresh_settings):
    s = fresh_settings
    write_rows(spark, s, "trajectories", _traj("seed", 0, 1))
    errors = []

    def writer(variant):
        try:
            for chunk in range(3):
                rows = [{**r, "example_id": f"{variant}-{chunk}-{r['example_id']}"} for r in _traj(variant, 1, 4)]
                catalog.merge(spark, s, rows_df(spark, "trajectories", rows), "trajectories", variant,
                              slice_={"variant": variant, "iteration": 1})
        except Exception as e:  # noqa: BLE001 - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(v,)) for v in ("rest_em", "rest_pg")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for v in ("rest_em", "rest_pg"):
        keys = {r.example_id for r in catalog.read_slice(spark, s, "trajectories", {"variant": v, "iteration": 1}).collect()}
        assert keys == {f"{v}-{c}-e{i}" for c in range(3) for i in range(4)}
