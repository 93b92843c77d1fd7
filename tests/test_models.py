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


# --------------------------------------------------------------------------- executors: paths, GPUs, batch rows

def test_executor_path_pins_and_hands_over_a_directory_hub_models_under_the_home(tmp_path, tiny_dir, monkeypatch):
    """A hub model is downloaded once, by the driver, into the home (a Volume on Databricks) as plain files."""
    import huggingface_hub

    from helpers import make_settings

    settings = make_settings(tmp_path / "home")
    calls = []

    def snapshot(repo_id, local_dir, **kwargs):
        calls.append(repo_id)
        for f in tiny_dir.iterdir():
            (Path(local_dir) / f.name).write_bytes(f.read_bytes())
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    path = models.executor_path("someone/tiny", settings)
    assert Path(path) == settings.home_dir / "models" / "hub" / "someone--tiny" and (Path(path) / "config.json").exists()
    assert models.executor_path("someone/tiny", settings) == path and calls == ["someone/tiny"]
    assert models.executor_path(str(tiny_dir), settings) == str(tiny_dir)
    volume = make_settings(tmp_path / "driver-disk", f"models.shared_dir={tmp_path / 'volume'}")  # Databricks
    assert Path(models.executor_path("someone/tiny", volume)) == tmp_path / "volume" / "hub" / "someone--tiny"


class _Gpu:
    def __init__(self, *addresses):
        self.addresses = list(addresses)


@pytest.mark.parametrize("resources, visible, expected", [
    ({}, None, None),                               # no GPU assigned (CPU cluster, or the driver)
    ({"gpu": _Gpu("0")}, None, 0),
    ({"gpu": _Gpu("3")}, None, 3),                  # the task's own GPU, not cuda:0
    ({"gpu": _Gpu("3")}, "2,3", 1),                 # torch numbers the visible devices from 0
    ({"gpu": _Gpu("1")}, "0,1,2,3", 1),
    ({"gpu": _Gpu()}, None, None),
])
def test_a_task_uses_the_gpu_spark_assigned_it(resources, visible, expected):
    assert models.task_gpu(resources, visible) == expected


def test_device_is_the_tasks_gpu(settings, monkeypatch):
    import dataclasses

    cuda = dataclasses.replace(settings, models=dataclasses.replace(settings.models, device="cuda"))
    monkeypatch.setattr(models, "_task_resources", lambda: {"gpu": _Gpu("2")})
    assert models.device_and_dtype(cuda)[0] == torch.device("cuda", 2)
    monkeypatch.setattr(models, "_task_resources", dict)
    assert models.device_and_dtype(cuda)[0] == torch.device("cuda")
    if not torch.cuda.is_available():
        assert models.device_and_dtype(settings)[0].type == "cpu"  # auto without CUDA


GEMMA3_1B = {"num_hidden_layers": 26, "hidden_size": 1152, "num_attention_heads": 4, "num_key_value_heads": 1,
             "head_dim": 256, "intermediate_size": 6912, "vocab_size": 262144}
GEMMA3_4B = {"text_config": {"num_hidden_layers": 34, "hidden_size": 2560, "num_attention_heads": 8, "num_key_value_heads": 4,
                             "head_dim": 256, "intermediate_size": 10240, "vocab_size": 262208}}


@pytest.mark.parametrize("model, kv_per_token, rows_24g, rows_80g", [
    # 2 x layers x kv heads x head dim x 2 bytes (bf16); rows at 7,169 tokens (5,120 prompt + 2,049 output)
    (SMOLLM2, 2 * 30 * 3 * 64 * 2, 138, 465),
    ("packaged:gemma3-270m", 2 * 18 * 1 * 256 * 2, 170, 576),
    (GEMMA3_1B, 2 * 26 * 1 * 256 * 2, 110, 392),
    (GEMMA3_4B, 2 * 34 * 4 * 256 * 2, 15, 69),
])
def test_batch_rows_from_kv_bytes_per_token_and_gpu_memory(settings, model, kv_per_token, rows_24g, rows_80g):
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3TextConfig

    from restpg import sizing

    config = (AutoConfig.from_pretrained(models.checkpoint_dir(model, settings)) if isinstance(model, str)
              else Gemma3TextConfig(**model.get("text_config", model)))
    assert sizing.kv_bytes_per_token(config, 2) == kv_per_token
    with torch.device("meta"):  # the real model's parameters, counted without memory
        real = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert sizing.weight_count(config) == pytest.approx(real, rel=1e-3)
    assert sizing.weight_count(model) == sizing.weight_count(config) if isinstance(model, dict) else True  # dicts read alike
    gib = 2**30
    assert [sizing.batch_rows(config, g * gib, 7169) for g in (24, 80)] == [rows_24g, rows_80g]
    free = 0.9 * 24 * gib - sizing.weight_count(config) * 2
    assert rows_24g == int(free // (kv_per_token * 7169 + sizing.dims(config).vocab * 4))  # the arithmetic, spelled out
    with pytest.raises(ValueError, match="not one row"):
        sizing.batch_rows(config, sizing.weight_count(config) * 2, 7169)  # the weights alone fill the GPU


def test_inference_rows_come_from_the_gpu_only_on_cuda(monkeypatch):
    from types import SimpleNamespace

    from restpg import sizing

    config = {**GEMMA3_1B, "tie_word_embeddings": True}
    cpu = SimpleNamespace(device=torch.device("cpu"), config=config, dtype=torch.bfloat16)
    assert models.inference_rows(cpu, 7169, 64) == 64  # CPUs keep their measured size
    gpu = SimpleNamespace(device=torch.device("cuda", 1), config=config, dtype=torch.bfloat16)
    seen = []
    properties = SimpleNamespace(total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: seen.append(d) or properties)
    assert models.inference_rows(gpu, 7169, 64) == sizing.batch_rows(config, 80 * 2**30, 7169) == 392
    assert seen == [torch.device("cuda", 1)]
