"""Model references resolve offline: a tiny local checkpoint, the packaged GGUF (converted once), MiniLM, MLflow URIs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from restpg import generation, models  # noqa: E402

SMOLLM2 = "packaged:smollm2-135m-instruct"
CORPUS = [f"The quick brown fox jumps over the lazy dog {i} times; 10 apples, 1 pear, a review, an email." for i in range(40)]


def make_tiny_lm(path: Path) -> Path:
    """A randomly initialised 2-layer Llama with a byte-level BPE tokenizer (adds BOS) saved to `path`."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(tok_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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


def test_packaged_smollm2_converts_once_and_generates(settings):
    cache = settings.home_dir / "models" / "smollm2-135m-instruct"
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
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="policy", python_model=Checkpoint(), artifacts={"checkpoint": str(tiny_dir)},
                                registered_model_name="tiny-policy", pip_requirements=[])
    mlflow.MlflowClient().set_registered_model_alias("tiny-policy", "champion", "1")

    assert models.resolve_ref("models:/tiny-policy@champion", fresh_settings) == "models:/tiny-policy/1"
    local = models.checkpoint_dir("models:/tiny-policy@champion", fresh_settings)
    assert (local / "config.json").exists() and local.is_relative_to(fresh_settings.home_dir / "models")
    model, _ = models.load_causal_lm("models:/tiny-policy/1", fresh_settings)
    reference, _ = models.load_causal_lm(str(tiny_dir), fresh_settings)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


@pytest.mark.skipif(not os.environ.get("RESTPG_SLOW_TESTS"), reason="converts 1.1 GB of Gemma weights (~1 min)")
def test_packaged_gemma_converts(settings):
    model, tokenizer = models.load_causal_lm("packaged:gemma3-270m", settings)
    [[out]], _ = generation.sample(model, tokenizer, ["The capital of France is"], [[0]], temperature=0.0,
                                   top_p=1.0, max_new_tokens=4)
    assert out.n_tokens > 0
