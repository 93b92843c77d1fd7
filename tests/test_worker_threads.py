"""Torch threads per Spark task: a local master's cores are shared among its task slots."""
from __future__ import annotations

import pytest

from restpg import models


@pytest.mark.parametrize("master, cores, threads", [
    ("local[2]", 2, 1), ("local[1]", 2, 2), ("local[*]", 8, 1), ("local[3]", 8, 2), ("local[16]", 2, 1),
    ("spark://host:7077", 8, 0), ("yarn", 8, 0),
])
def test_worker_threads(master, cores, threads):
    assert models.worker_threads(master, cores) == threads


def test_a_spark_task_gets_its_share_and_the_driver_keeps_its_threads(spark, settings):
    import pandas as pd
    import torch

    env = models.worker_env(settings)
    assert env["torch_threads"] == models.worker_threads(settings.spark.master)
    driver_threads = torch.get_num_threads()

    def threads(batches):
        import torch

        for pdf in batches:
            models.worker_settings(env)
            yield pd.DataFrame({"threads": [torch.get_num_threads()] * len(pdf)})

    seen = {r.threads for r in spark.range(4).repartition(2).mapInPandas(threads, "threads int").collect()}
    assert seen == {env["torch_threads"]}
    models.worker_settings(env)  # outside a task: nothing changes
    assert torch.get_num_threads() == driver_threads


@pytest.mark.parametrize("master, setting, threads", [("local[1]", 0, 2), ("local[1]", 1, 1), ("local[2]", 0, 1),
                                                      ("spark://host:7077", 4, 4)])
def test_the_torch_threads_setting_overrides_the_cores_share(master, setting, threads, monkeypatch):
    """`spark.torch_threads` (0: the share of the cores) is what each task gets, e.g. for the bench's
    one-core reference or a cluster whose executors should not use torch's default."""
    from restpg.config import load_settings

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    settings = load_settings("local", [f"spark.master={master}", f"spark.torch_threads={setting}"])
    assert models.worker_env(settings)["torch_threads"] == threads
