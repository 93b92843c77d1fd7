"""Shared test factories: settings on a home of their own, a tiny real model, and hand-built table rows.

Stage tests build the few rows they need with `write_rows` (missing columns get typed defaults from
the table's schema) instead of running the pipeline before them.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import torch

SMOLLM2 = "packaged:smollm2-135m-instruct"
GEMMA = "packaged:gemma3-270m"
CORPUS = [f"The quick brown fox jumps over the lazy dog {i} times; 10 apples, 1 pear, a review, an email." for i in range(40)]


def make_tiny_lm(path: Path, seed: int = 0) -> Path:
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
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_overrides(tiny: str, m: int = 3) -> list[str]:
    """A local profile shrunk to seconds per stage, every model the tiny one; the teacher the extractive one
    (a random teacher's paths are all degenerate, so sft_data would keep none), with a reasoning budget
    its slotted paths fit in the tiny tokenizer's short tokens."""
    return [f"models.policy={tiny}", "models.teacher=extractive", f"models.judge={tiny}",
            "data.demo_users=1", "data.demo_profile_items=3", "loop.iterations=1", f"sample.m={m}",
            "prompt.max_reasoning_tokens=96", "prompt.max_response_tokens=240",
            "prompt.max_input_tokens=200", "train.steps=2", "train.eval_every=2", "train.selection_examples=2",
            "train.device=cpu", "train.length_buckets=[256, 512]", "filter.tau=-1.0", "filter.max_kept_per_input=2",
            "validate.allow_unfit_reward=true", "validate.examples=4"]


def make_settings(home: Path, *overrides: str, profile: str = "local"):
    from restpg.config import load_settings

    return load_settings(profile, list(overrides), home=str(home))


def _default(spark_type: str, name: str):
    t = spark_type.lower()
    if t.startswith("array"):
        return []
    if t.startswith("map"):
        return {}
    if t.startswith("struct"):
        return None
    return {"string": f"{name}-0", "int": 0, "bigint": 0, "double": 0.0, "float": 0.0, "boolean": False,
            "timestamp": dt.datetime(2026, 1, 1), "date": dt.date(2026, 1, 1)}.get(t)


def rows_df(spark, name: str, rows: list[dict]):
    """A DataFrame in `name`'s declared schema; columns a row leaves out get typed defaults."""
    from restpg import catalog

    spec = catalog.spec(name)
    full = [{c["name"]: r.get(c["name"], _default(c["type"], c["name"])) for c in spec.columns} for r in rows]
    return spark.createDataFrame([tuple(r[c["name"]] for c in spec.columns) for r in full], catalog.spec(name).struct())


def write_rows(spark, settings, name: str, rows: list[dict], slice_: dict | None = None) -> int:
    """Replace `slice_` (default: the whole table) of `name` with `rows`; returns the new version."""
    from restpg import catalog

    return catalog.replace_slice(spark, settings, rows_df(spark, name, rows), name, slice_ or {}, run_id="test")


def example_row(example_id: str, user_id: str, split: str = "train", task: str = "product_review", *,
                input: str = "Write a review of a kettle.", target: str = "Great kettle, boils fast.",
                profile: list[dict] | None = None) -> dict:
    """An `examples` row; profile items are dicts with item_id and text (fields default to the text)."""
    items = profile if profile is not None else [
        {"item_id": f"{user_id}-p{i}", "text": f"{user_id} wrote review {i} about tea and kettles."} for i in range(3)]
    return {"example_id": example_id, "user_id": user_id, "split": split, "task": task, "input": input, "target": target,
            "profile": [{"item_id": it["item_id"], "text": it["text"], "fields": it.get("fields", {"reviewText": it["text"]})}
                        for it in items]}


def register_tiny_policy(settings, checkpoint: str, slices: list[tuple[str, int]]) -> list[str]:
    """One registered version of `checkpoint` (a pyfunc whose artifact is the checkpoint directory, as the
    training job logs it) per (variant, iteration), tagged as the training job tags it; their numbers."""
    import mlflow

    from restpg.runtime import setup_mlflow

    class Checkpoint(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    setup_mlflow(settings)
    with mlflow.start_run(run_name="tiny-policy"):
        source = mlflow.pyfunc.log_model(name="policy", python_model=Checkpoint(), artifacts={"checkpoint": checkpoint},
                                         pip_requirements=[]).model_uri
    client, name, versions = mlflow.MlflowClient(), settings.mlflow.policy_model_name, []
    for variant, iteration in slices:
        version = str(mlflow.register_model(source, name).version)
        client.set_model_version_tag(name, version, "variant", variant)
        client.set_model_version_tag(name, version, "iteration", str(iteration))
        versions.append(version)
    return versions
