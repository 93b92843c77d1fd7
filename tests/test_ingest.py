import json

import pytest

from restpg import catalog, demo_data, ingest


def _count(spark, settings, name, where="true"):
    return catalog.read(spark, settings, name).where(where).count()


def test_amazon_sample_ingests_with_stable_ids(spark, fresh_settings, amazon_path):
    s = fresh_settings
    first = ingest.run(spark, s, source=str(amazon_path), task="product_review", split="train", run_id="r1")
    assert first["records"] == 598 and first["valid"] == 598 and first["quarantined"] == 0
    v1 = catalog.version(spark, s, "examples")
    ids1 = {r.example_id for r in catalog.read(spark, s, "examples").select("example_id").collect()}
    second = ingest.run(spark, s, source=str(amazon_path), task="product_review", split="train", run_id="r2")
    assert second["inserted"] == 0 and second["already_present"] == 598
    ids2 = {r.example_id for r in catalog.read(spark, s, "examples").select("example_id").collect()}
    assert ids1 == ids2 and len(ids1) == 598

    raw = json.loads(amazon_path.read_text().splitlines()[0])
    row = spark.sql(f"SELECT * FROM restpg.examples WHERE user_id = '{raw['reviewerId']}'").collect()[0]
    assert row.target == raw["output"] and row.input == raw["input"] and row.task == "product_review"
    assert len(row.profile) == len(raw["profile"])
    assert [p.fields["reviewText"] for p in row.profile] == [p["reviewText"] for p in raw["profile"]]
    assert len({p.item_id for p in row.profile}) == len(row.profile)
    # time travel: the version of the first ingest still reads back as it was
    old = spark.sql(f"SELECT count(*) AS n FROM delta.`{catalog.ref(s, 'examples').path}` VERSION AS OF {v1}").first().n
    assert old == 598


def test_bad_records_land_in_quarantine_with_reason(spark, fresh_settings, tmp_path):
    good = {"reviewerId": "u1", "input": "Write a review of a lamp.", "output": "Bright and solid.",
            "profile": [{"overall": "5.0", "summary": "ok", "reviewText": "Fine lamp.", "description": "lamp"}]}
    good2 = {**good, "reviewerId": "u2", "output": "Too dim for me."}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({k: v for k, v in good.items() if k != "output"}),            # missing output
        json.dumps({**good, "output": "   "}),                                  # empty output
        json.dumps({**good, "reviewerId": "u3", "profile": "not a list"}),      # profile not a list
        json.dumps({**good, "task": "poetry_writing"}),                         # unknown task
        json.dumps(good),                                                       # duplicate of record 1
        json.dumps(good2),
        json.dumps([1, 2]),                                                     # not an object
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = ingest.run(spark, fresh_settings, source=str(path), task="product_review", split="train", run_id="r")
    assert report["valid"] == 2 and report["quarantined"] == 7 and report["records"] == 9
    q = {r.record_number: r.reason for r in catalog.read(spark, fresh_settings, "quarantine").collect()}
    assert q[2].startswith("not JSON")
    assert q[3] == "missing output"
    assert q[4] == "empty output"
    assert q[5].startswith("profile is not a list")
    assert q[6].startswith("unknown task 'poetry_writing'")
    assert q[7] == "duplicate of record 1"
    assert q[9].startswith("not a JSON object")
    again = ingest.run(spark, fresh_settings, source=str(path), task="product_review", split="train", run_id="r2")
    assert again["inserted"] == 0
    assert _count(spark, fresh_settings, "quarantine") == 7 and _count(spark, fresh_settings, "examples") == 2


def test_demo_data_covers_all_tasks_and_is_deterministic(spark, fresh_settings, tmp_path):
    a, b = demo_data.generate(users_per_task=3, seed=1), demo_data.generate(users_per_task=3, seed=1)
    assert a == b
    path = demo_data.write(tmp_path / "demo.jsonl", users_per_task=3, seed=1)
    report = ingest.run(spark, fresh_settings, source=str(path), run_id="demo")
    assert report["quarantined"] == 0
    assert set(report["tasks"]) == {"product_review", "abstract_generation", "topic_writing", "email_completion"}
    assert set(report["splits"]) == {"train", "val", "test"}
    # style is visible in the profile and in the output: the user's signature opener is in both
    for rec in a[:6]:
        opener = rec["output"].split(",")[0].split(":")[0]
        assert all(opener in " ".join(map(str, item.values())) for item in rec["profile"])


def test_parquet_and_json_array_sources(spark, fresh_settings, tmp_path):
    recs = [{"task": "topic_writing", "author": f"a{i}", "input": f"Write about {i}", "output": f"text {i}",
             "profile": [{"summary": "s", "content": "c"}]} for i in range(3)]
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps(recs))
    assert ingest.run(spark, fresh_settings, source=str(arr), split="test", run_id="r")["valid"] == 3
    pq = str(tmp_path / "pq")
    rows = [(r["task"], r["author"] + "p", r["input"], r["output"]) for r in recs]
    spark.createDataFrame(rows, "task string, author string, input string, output string").write.parquet(pq)
    report = ingest.run(spark, fresh_settings, source=pq, run_id="r", split="test")
    assert report["valid"] == 3  # an absent profile is the cold-start case, not an error
    assert _count(spark, fresh_settings, "examples", "size(profile) = 0") == 3


def test_write_with_wrong_schema_fails_loudly(spark, fresh_settings):
    df = spark.createDataFrame([("x", 1)], "example_id string, surprise int")
    with pytest.raises(catalog.SchemaMismatch, match="missing columns"):
        catalog.merge(spark, fresh_settings, df, "examples", "r")


def test_unknown_task_or_split_argument_is_an_error(spark, fresh_settings, tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        ingest.run(spark, fresh_settings, source=str(tmp_path / "x.jsonl"), run_id="r", task="poems")
    with pytest.raises(ValueError, match="unknown split"):
        ingest.run(spark, fresh_settings, source=str(tmp_path / "x.jsonl"), run_id="r", split="holdout")


GOOD = {"reviewerId": "u1", "input": "Write a review of a lamp.", "output": "Bright and solid.",
        "profile": [{"overall": "5.0", "summary": "ok", "reviewText": "Fine lamp.", "description": "lamp"}]}


@pytest.mark.parametrize("record, outcome", [
    ("\ufeff" + json.dumps(GOOD), "valid"),                                        # byte order mark: removed
    (json.dumps({**GOOD, "output": "Bright\u0000 and solid."}), "contains NUL"),    # NUL: quarantined
    (json.dumps({**GOOD, "output": "x" * 120}), "output too long"),                 # over data.max_field_chars
    (json.dumps({**GOOD, "reviewerId": 12345}), "valid"),                          # numeric id: a string id
    (json.dumps({**GOOD, "reviewerId": {"id": 1}}), "user id is a dict"),           # id of another type
    (json.dumps({**GOOD, "input": ["a", "list"]}), "input is not a string"),       # wrong field type
])
def test_awkward_records_have_a_defined_outcome(record, outcome):
    parsed = ingest.parse_record(record, "product_review", "train", max_chars=100)
    if outcome == "valid":
        assert parsed.reason is None and parsed.example["user_id"] in ("u1", "12345")
    else:
        assert parsed.example is None and parsed.reason.startswith(outcome)


def test_one_bad_profile_item_drops_the_item_not_the_example():
    rec = {**GOOD, "profile": [GOOD["profile"][0], "just a string", {"unrelated": "x"}, {"reviewText": "y" * 150}]}
    parsed = ingest.parse_record(json.dumps(rec), "product_review", "train", max_chars=100)
    assert parsed.reason is None and len(parsed.example["profile"]) == 1
    assert [(i, why.split(":")[0].split(" has")[0]) for i, _, why in parsed.dropped_items] == [
        (1, "profile item 1 is not an object"), (2, "profile item 2"), (3, "profile item 3 too long")]


def test_every_record_read_is_accounted_for(spark, fresh_settings, tmp_path):
    lines = [json.dumps(GOOD), "", "{broken", "   ", json.dumps({**GOOD, "reviewerId": "u2", "profile": [GOOD["profile"][0], 7]}),
             "\ufeff" + json.dumps({**GOOD, "reviewerId": "u3"}), json.dumps({**GOOD, "reviewerId": "u4", "output": "a\u0000b"})]
    path = tmp_path / "awkward.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = ingest.run(spark, fresh_settings, source=str(path), task="product_review", split="train", run_id="r")
    assert report["records_read"] == len(lines)
    assert (report["valid"], report["quarantined"], report["blank_lines"]) == (3, 2, 2)
    assert report["valid"] + report["quarantined"] + report["blank_lines"] == report["records_read"]
    assert report["profile_items_dropped"] == 1
    q = catalog.read(spark, fresh_settings, "quarantine").toPandas()
    assert sorted(q["reason"].str.split(":").str[0].str.split(" is").str[0]) == [
        "contains NUL characters", "not JSON", "profile item 1"]


def test_a_malformed_json_array_file_is_one_quarantine_row(spark, fresh_settings, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"reviewerId": "u1", "input": "a", "output": "b"},\n {"reviewerId": ')
    report = ingest.run(spark, fresh_settings, source=str(path), task="product_review", split="train", run_id="r")
    assert (report["valid"], report["quarantined"]) == (0, 1)
    [row] = catalog.read(spark, fresh_settings, "quarantine").collect()
    assert row.reason.startswith("file: not a readable JSON array") and row.record_number == 0
    assert '"reviewerId": "u1"' in row.raw_record


def test_a_run_whose_records_all_land_in_quarantine_stops_after_ingest_with_the_reason(spark, tmp_path, amazon_path):
    """The shared Amazon file has no 'task' field: without --set data.task every record is quarantined, and the
    pipeline stops right after ingest, naming the reason (instead of failing stages later on nothing)."""
    from helpers import make_settings
    from restpg import cli, pipeline

    first = json.loads(amazon_path.read_text().splitlines()[0])
    source = tmp_path / "no_task.jsonl"
    source.write_text(json.dumps(first) + "\n" + json.dumps({**first, "reviewerId": "someone-else"}) + "\n")
    s = make_settings(tmp_path / "home", f"data.source={source}")
    with pytest.raises(pipeline.NoTrainingInputs, match=r"2 × no task: .*--set data.task"):
        cli.run_stage("pipeline", spark, s, variants=["sft"], force=[])
    assert not catalog.exists(spark, s, "retrievals")  # nothing ran after ingest
