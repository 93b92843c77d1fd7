"""Models reach the executors from the driver: registered versions are resolved to a directory once, on the
driver, and Spark's Python workers load that directory without ever calling the tracking server (on
Databricks they have no credentials of their own). Lineage still names the pinned `models:/name/N`."""
from __future__ import annotations

import pytest
from helpers import make_settings

from restpg import embedding, generation, models, rewards

# a worker as on Databricks: a workspace tracking URI and no credentials (a profile that does not exist
# fails at once, offline, and writes nothing)
NO_CREDENTIALS = {"tracking_uri": "databricks://restpg-no-such-profile", "registry_uri": "databricks-uc://restpg-no-such-profile"}


def _register(settings, name: str, checkpoint) -> None:
    import mlflow

    from restpg.runtime import setup_mlflow

    class Checkpoint(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str]) -> list[str]:
            return model_input

    setup_mlflow(settings)
    mlflow.set_experiment(settings.mlflow.experiment)
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="model", python_model=Checkpoint(), artifacts={"checkpoint": str(checkpoint)},
                                registered_model_name=name, pip_requirements=[])
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", "1")


@pytest.fixture
def registered(tmp_path, tiny_dir, monkeypatch):
    """Settings whose policy and retriever are registered versions, and workers with no tracking credentials."""
    # one registered version serves as policy and as retriever (sentence-transformers mean-pools any HF encoder)
    settings = make_settings(tmp_path / "home", "models.policy=models:/exec-tiny@champion",
                             "models.retriever=models:/exec-tiny@champion", "judge.reward=embedding")
    _register(settings, "exec-tiny", tiny_dir)
    built = models.worker_env

    def without_credentials(s):  # whatever reaches the workers names a tracking server they cannot call
        return {**built(s), **NO_CREDENTIALS}

    monkeypatch.setattr(models, "worker_env", without_credentials)
    return settings


def test_executors_sample_embed_and_reward_registered_models_without_the_tracking_server(spark, registered):
    settings = registered
    prompts = spark.createDataFrame([("a", "The quick brown fox"), ("b", "10 apples, 1 pear")], "example_id string, prompt string")
    samples = generation.generate_df(prompts, settings.models.policy, settings, m=2, temperature=0.7, top_p=0.95,
                                     max_new_tokens=3, iteration=1, seed=0).collect()
    assert sorted((r.example_id, r.sample_index) for r in samples) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]

    vecs = embedding.embed_column(prompts, "prompt", "vec", settings).collect()
    assert [len(r.vec) for r in vecs] == [32, 32]  # the tiny model's hidden size

    scored = rewards.add_rewards(spark, settings, spark.createDataFrame(
        [("q", "a review of apples", "10 apples, 1 pear")], "input string, target string, response string")).collect()
    assert -1.0 <= scored[0].reward <= 1.0
    assert scored[0].judge_model == "models:/exec-tiny/1"  # lineage names the pinned version, not the path


def test_settings_rebuilt_on_an_executor_refuse_a_registry_reference(tmp_path, tiny_dir):
    settings = make_settings(tmp_path / "home")
    env = models.worker_env(settings)
    assert not {"tracking_uri", "registry_uri"} & set(env)
    worker = models.worker_settings(env)
    with pytest.raises(RuntimeError, match="executor_path"):
        models.checkpoint_dir("models:/exec-tiny/1", worker)
    assert models.checkpoint_dir(str(tiny_dir), worker) == tiny_dir  # a path handed over by the driver loads
