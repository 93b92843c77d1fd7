"""The registry lookups on a Unity Catalog registry (`databricks-uc`), whose search results carry no tags.

The Databricks service cannot run here: its answers are UC protobuf messages built in the test, turned
into MLflow entities by MLflow's own conversion code (`model_version_search_from_uc_proto` for a search,
`model_version_from_uc_proto` for one version), as MLflow does with the service's replies."""
from __future__ import annotations

import json

import pytest
from mlflow.protos import databricks_uc_registry_messages_pb2 as uc
from mlflow.store.entities.paged_list import PagedList
from mlflow.utils._unity_catalog_utils import model_version_from_uc_proto, model_version_search_from_uc_proto

from restpg import registry
from restpg.config import load_settings

NAME = "main.restpg.policy"
# version → its lineage tags, as train registers them; version 4 is the newest of rest_pg iteration 1
TAGS = {1: {"variant": "sft_reasoning", "iteration": 0}, 2: {"variant": "rest_pg", "iteration": 1},
        3: {"variant": "rest_em", "iteration": 1}, 4: {"variant": "rest_pg", "iteration": 1},
        5: {"variant": "rest_pg", "iteration": 2}}


def uc_version(version: int) -> uc.ModelVersion:
    tags = [uc.ModelVersionTag(key=k, value=str(v)) for k, v in TAGS[version].items()]
    aliases = [uc.RegisteredModelAlias(alias="champion", version="2")] if version == 2 else []
    return uc.ModelVersion(name=NAME, version=str(version), status=uc.READY, source=f"dbfs:/models/{version}",
                           run_id=f"run{version}", tags=tags, aliases=aliases)


class UnityCatalogClient:
    """MlflowClient's registry calls as they answer on Unity Catalog: search in pages of two, without tags."""

    def __init__(self):
        self.got: list[str] = []

    def search_model_versions(self, filter_string, page_token=None):
        assert filter_string == f"name = '{NAME}'"  # UC filters on the name (or a run id) alone
        start = int(page_token or 0)
        page = [model_version_search_from_uc_proto(uc_version(v)) for v in sorted(TAGS)[start:start + 2]]
        return PagedList(page, str(start + 2) if start + 2 < len(TAGS) else "")

    def get_model_version(self, name, version):
        self.got.append(version)
        return model_version_from_uc_proto(uc_version(int(version)))


@pytest.fixture
def settings(tmp_path, monkeypatch):
    monkeypatch.setattr("restpg.runtime.setup_mlflow", lambda settings: None)
    return load_settings("databricks", home=str(tmp_path))


def test_uc_search_results_have_no_tags():
    """What the lookup must not rely on: MLflow's UC search entity refuses tags and aliases."""
    found = model_version_search_from_uc_proto(uc_version(2))
    with pytest.raises(Exception):
        found.tags.get("variant")
    with pytest.raises(Exception):
        found.aliases()


def test_trained_version_reads_tags_version_by_version_on_unity_catalog(settings, monkeypatch):
    client = UnityCatalogClient()
    monkeypatch.setattr("mlflow.MlflowClient", lambda: client)
    assert registry.trained_version(settings, "rest_pg", 1) == f"models:/{NAME}/4"
    assert client.got == ["5", "4"]  # newest first, stopping at the first match
    assert registry.trained_version(settings, "sft_reasoning", 0) == f"models:/{NAME}/1"
    assert registry.trained_version(settings, "rest_em", 3) is None
    assert registry.sampling_policy(settings, "rest_pg", 2) == f"models:/{NAME}/4"


def test_trained_version_through_mlflows_own_unity_catalog_store(settings, monkeypatch):
    """MlflowClient on `databricks-uc` with only the HTTP call to the service answered here."""
    from mlflow import MlflowClient
    from mlflow.store._unity_catalog.registry.rest_store import UcModelRegistryStore

    def endpoint(self, api, json_body, *args, **kwargs):
        body = json.loads(json_body)
        if api is uc.SearchModelVersionsRequest:
            return uc.SearchModelVersionsResponse(model_versions=[uc_version(v) for v in sorted(TAGS)])
        if api is uc.GetModelVersionRequest:
            assert body["name"] == NAME
            return uc.GetModelVersionResponse(model_version=uc_version(int(body["version"])))
        raise AssertionError(f"unexpected registry call {api.__name__}")

    monkeypatch.setattr(UcModelRegistryStore, "_call_endpoint", endpoint)
    client = MlflowClient(tracking_uri="databricks", registry_uri="databricks-uc")
    monkeypatch.setattr("mlflow.MlflowClient", lambda: client)
    assert registry.trained_version(settings, "rest_pg", 2) == f"models:/{NAME}/5"
    assert registry.final_policy(settings, "rest_em", 1) == f"models:/{NAME}/3"
