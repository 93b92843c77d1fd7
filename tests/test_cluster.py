"""A real Spark standalone cluster: a master and two workers on 127.0.0.1, each its own JVM started from
the pyspark installation (`spark-class`), each worker with its own executor and Python workers. A
short pipeline (demo data → ingest → retrieve → sample with the tiny model: the two kinds of pandas UDF, the
retriever's embedding and the policy's decoding, that every later stage reuses) runs against
``spark://127.0.0.1:<port>`` in a driver process of its own and must write the same rows as the same
run on the suite's own ``local[2]`` session. The fixture stops exactly the processes it started, by pid, also on failure.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKERS = 2
WORKER_MEMORY = "1536m"  # 2 cores / 24 GiB shared with the rest of the machine: 1 core and 1.5 GiB each
STAGES_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and re.search(pattern, log.read_text(errors="replace")):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[1]} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(1)
    raise TimeoutError(f"no {pattern!r} in {log} after {timeout:.0f}s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM the JVMs this fixture started (a worker takes its executors down with it), then SIGKILL
    whatever is still alive; nothing else is touched."""
    for p in reversed(procs):
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`spark://127.0.0.1:<port>` of a standalone master with two registered one-core workers."""
    import pyspark

    spark_home = Path(pyspark.__file__).parent
    spark_class = spark_home / "bin" / "spark-class"
    base = tmp_path_factory.mktemp("standalone")
    env = {**os.environ, "SPARK_HOME": str(spark_home), "SPARK_LOCAL_IP": "127.0.0.1",
           "SPARK_NO_DAEMONIZE": "1", "PYSPARK_PYTHON": sys.executable,
           "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false"}  # no fixed REST port to collide on
    port = _free_port()
    url = f"spark://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = base / f"{name}.log"
        # spark-class execs java, so the pid is the JVM's
        proc = subprocess.Popen([str(spark_class), *args], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc, log

    try:
        master, log = start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                            "--port", str(port), "--webui-port", str(_free_port()))
        _wait_for(log, r"I have been elected leader", master)
        for i in range(WORKERS):
            worker, log = start(f"worker{i}", "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1",
                                "--cores", "1", "--memory", WORKER_MEMORY, "--webui-port", str(_free_port()),
                                "--work-dir", str(base / f"work{i}"))
            _wait_for(log, r"Successfully registered with master", worker)
        yield {"url": url, "procs": procs, "logs": base}
    finally:
        _stop(procs)


def _run_stages(master: str, home: Path, tiny: str) -> dict:
    """The pipeline subset in a driver process of its own (one SparkContext per process); its rows."""
    out = home / "rows.json"
    done = subprocess.run([sys.executable, __file__, master, str(home), tiny, str(out)], capture_output=True, text=True,
                          timeout=STAGES_TIMEOUT_S, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert done.returncode == 0, f"stages on {master} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(out.read_text())


def test_pipeline_on_a_standalone_cluster_writes_the_same_rows_as_local(cluster, spark, tiny, tmp_path):
    on_cluster = _run_stages(cluster["url"], tmp_path / "cluster", tiny)
    local = _stages(spark, "local[2]", tmp_path / "local", tiny)  # the suite's own local[2] session, in this process
    assert on_cluster["master"] == cluster["url"] and spark.sparkContext.master == "local[2]"
    # the work ran in both workers' executors, each a JVM of its own (started by one of our workers)
    # with its own Python workers
    executors, pythons = on_cluster["executors"], on_cluster["python_pids_per_executor"]
    assert len(executors) == 2 and len({jvm for jvm, _ in executors.values()}) == 2
    assert [f"/work{i}/" in cwd for i, cwd in enumerate(sorted(executors))] == [True, True]
    assert {started_by for _, started_by in executors.values()} == {p.pid for p in cluster["procs"][1:]}
    a, b = sorted(pythons)
    assert pythons[a] and pythons[b] and not set(pythons[a]) & set(pythons[b])
    for table in ("examples", "retrievals", "trajectories"):
        assert on_cluster[table], table
        assert on_cluster[table] == local[table], table
    for p in cluster["procs"]:
        assert p.poll() is None, "a cluster JVM died during the run"


def _driver(master: str, home: str, tiny: str, out: str) -> None:
    """Child process: the stages against `master`; their rows and where the work ran, to `out`."""
    from restpg.config import load_settings
    from restpg.runtime import get_spark

    spark = get_spark(load_settings("local", [f"spark.master={master}"], home=home))
    report = _stages(spark, master, Path(home), tiny)
    Path(out).write_text(json.dumps(report))
    spark.stop()


def _stages(spark, master: str, home: Path, tiny: str) -> dict:
    """Demo data → ingest → retrieve → sample (rest_em, t=1, the tiny model as policy) on `spark`; the rows each
    stage wrote, and the executors that ran its tasks. (Judging runs the retriever's kind of UDF, filtering is
    plain Spark SQL: the judge and filter tests cover them, on the suite's session.)"""
    from helpers import tiny_overrides
    from restpg import catalog, cli, demo_data
    from restpg.config import load_settings

    # one chunk per stage: this test compares rows, the chunking has tests of its own
    s = load_settings("local", [*tiny_overrides(tiny, m=2), "sample.chunk_examples=64", f"spark.master={master}"], home=str(home))
    d = s.data
    source = demo_data.write(home / "demo.jsonl", users_per_task=d.demo_users, profile_items=d.demo_profile_items,
                             examples_per_user=d.demo_examples_per_user, seed=d.demo_seed)
    cli.run_stage("ingest", spark, s, source=str(source), task=None, split=None)
    cli.run_stage("retrieve", spark, s)
    cli.run_stage("sample", spark, s, variant="rest_em", iteration=1, policy=tiny)

    def rounded(v):  # a batch's float sums may differ in the last bits with the batch's composition
        if isinstance(v, float):
            return round(v, 5)
        if isinstance(v, list):
            return [rounded(x) for x in v]
        return {k: rounded(x) for k, x in v.items()} if isinstance(v, dict) else v

    def rows(name, order, drop=()):
        df = catalog.read(spark, s, name).drop("run_id", "created_at", *drop)
        return [rounded(json.loads(r)) for r in df.orderBy(*order).toJSON().collect()]

    def executor_of(_):
        """(executor work dir, executor JVM pid, the pid that started that JVM, Python worker pid): a
        standalone executor's Python workers run in its work dir, forked by a daemon whose parent is
        the executor's JVM, itself started by a worker JVM."""
        import os as os_

        def parent(pid):
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[1])

        jvm = parent(os_.getppid())
        yield os_.getcwd(), jvm, parent(jvm), os_.getpid()

    seen = spark.sparkContext.parallelize(range(8), 8).mapPartitions(executor_of).collect()
    executors = {cwd: [jvm, started_by] for cwd, jvm, started_by, _ in seen}
    pythons = {cwd: sorted({pid for c, _, _, pid in seen if c == cwd}) for cwd in executors}
    report = {"master": spark.sparkContext.master, "executors": executors, "python_pids_per_executor": pythons,
              "examples": rows("examples", ["example_id"], ("source_file",)),
              "retrievals": rows("retrievals", ["example_id"]),
              "trajectories": rows("trajectories", ["example_id", "sample_index"])}
    return report


if __name__ == "__main__":
    _driver(*sys.argv[1:5])
