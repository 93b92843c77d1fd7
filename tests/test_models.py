"""Model references resolve offline: a tiny local checkpoint, the packaged GGUF (converted once), MiniLM, MLflow URIs."""
from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from restpg import generation, models  # noqa: E402

from helpers import CORPUS, SMOLLM2, make_tiny_lm  # noqa: E402,F401


def test_local_directory_loads_for_batched_generation(tiny_dir, settings):
    model, tokenizer = models.load_causal_lm(str(tiny_dir), settings)
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert models.checkpoint_dir(str(tiny_dir), settings) == tiny_dir


def test_per_process_cache_loads_once(tiny_dir, settings):
    ref = str(tiny_dir)  # a directory of this module's own: nothing else loaded it
    first = models.cached_causal_lm(ref, settings)
    second = models.cached_causal_lm(ref, settings)
    assert first is second and models.load_count(ref) == 1


def test_packaged_conversion_is_shared_by_every_home(settings, fresh_settings):
    """One converted checkpoint per machine: a second home reuses the first home's conversion."""
    assert models.checkpoint_dir(SMOLLM2, settings) == models.checkpoint_dir(SMOLLM2, fresh_settings)
    assert not models.checkpoint_dir(SMOLLM2, settings).is_relative_to(settings.home_dir)


def test_packaged_smollm2_converts_once_and_generates(settings):
    cache = models.cache_dir(settings) / "smollm2-135m-instruct"
    was_cached = (cache / "config.json").exists()
    before = models.conversion_count()
    model, tokenizer = models.load_causal_lm(SMOLLM2, settings)
    assert models.conversion_count() == before + (0 if was_cached else 1)
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # no half-written cache left
    models.load_causal_lm(SMOLLM2, settings)
    assert models.conversion_count() == before + (0 if was_cached else 1)  # the second load reads the cache

    prompt = generation.render_chat(tokenizer, "What is the capital of France?")
    assert prompt.rstrip().endswith("assistant") and "capital of France" in prompt
    [[answer]], stats = generation.sample(model, tokenizer, [prompt], [[0]], temperature=0.0, top_p=1.0,
                                         max_new_tokens=8)
    assert "Paris" in answer.text and 0 < answer.n_tokens <= 8 and stats.prefill_passes == 1


def test_render_chat_leaves_plain_tokenizers_alone(tiny_dir, settings):
    tokenizer = models.load_tokenizer(str(tiny_dir), settings)
    assert generation.render_chat(tokenizer, "plain text") == "plain text"


def test_minilm_embeds_offline(settings):
    embedder = models.load_embedder("packaged:all-minilm-l6-v2", settings)
    vectors = embedder.encode(["A cat sits on the mat.", "A kitten rests on a rug.", "Quarterly tax filing deadlines."],
                              normalize_embeddings=True)
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_mlflow_model_uri_resolves_to_the_checkpoint_inside(tiny_dir, fresh_settings):
    import mlflow

    from restpg.runtime import setup_mlflow

    class Checkpoint(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str]) -> list[str]:
            return model_input

    setup_mlflow(fresh_settings)
    # the run's experiment, as a pipeline stage has it: its artifact location is a file:// URI under the home
    mlflow.set_experiment(fresh_settings.mlflow.experiment)
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="policy", python_model=Checkpoint(), artifacts={"checkpoint": str(tiny_dir)},
                                registered_model_name="tiny-policy", pip_requirements=[])
    mlflow.MlflowClient().set_registered_model_alias("tiny-policy", "champion", "1")

    assert models.resolve_ref("models:/tiny-policy@champion", fresh_settings) == "models:/tiny-policy/1"
    local = models.checkpoint_dir("models:/tiny-policy@champion", fresh_settings)
    # a local file store is read in place: the version's own artifacts, no downloaded copy
    location = mlflow.MlflowClient().get_model_version_download_uri("tiny-policy", "1")
    assert location.startswith("file:")
    artifacts = Path(url2pathname(urlparse(location).path))
    assert (local / "config.json").exists() and local.is_relative_to(artifacts)
    assert artifacts.is_relative_to(fresh_settings.home_dir / "mlruns")
    assert not (fresh_settings.home_dir / "models" / "mlflow").exists()
    with mlflow.start_run() as run:  # any other URI is downloaded, once, under the home
        mlflow.log_artifacts(str(tiny_dir), "weights")
    copied = models.checkpoint_dir(f"runs:/{run.info.run_id}/weights", fresh_settings)
    assert (copied / "config.json").exists() and copied.is_relative_to(fresh_settings.home_dir / "models" / "mlflow")
    model, _ = models.load_causal_lm("models:/tiny-policy/1", fresh_settings)
    reference, _ = models.load_causal_lm(str(tiny_dir), fresh_settings)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


@pytest.mark.slow  # converts 1.1 GB of Gemma weights once (~1 min), cached machine-wide
def test_packaged_gemma_converts(settings):
    model, tokenizer = models.load_causal_lm("packaged:gemma3-270m", settings)
    [[out]], _ = generation.sample(model, tokenizer, ["The capital of France is"], [[0]], temperature=0.0,
                                   top_p=1.0, max_new_tokens=4)
    assert out.n_tokens > 0
    # the paper's Gemma family: digits are split and the chat template itself starts with BOS
    assert len(tokenizer("10", add_special_tokens=False).input_ids) == 2
    rendered = generation.render_chat(tokenizer, "hello")
    ids = generation.encode(tokenizer, rendered)
    assert rendered.startswith(tokenizer.bos_token) and ids.count(tokenizer.bos_token_id) == 1
