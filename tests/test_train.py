"""Training stage: features, the reward-weighted loss, the schedule, the loop (eager and XLA), and
`run()` end to end on a real local Delta table and MLflow registry, with a tiny random Llama."""
from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import math
import os
from pathlib import Path

import pytest
import torch

# The XLA device must exist before autograd's first backward in this process sizes the engine's
# per-device queues (else an INTERNAL ASSERT in engine.cpp); starting it at collection guarantees that.
os.environ.setdefault("PJRT_DEVICE", "CPU")
import torch_xla  # noqa: E402

torch_xla.device()

from restpg import train
from restpg.config import TrainConfig, load_settings

WORDS = ("user writes about food films books travel music and likes hates loves the plot taste price "
         "story cast sound view good bad great slow fast warm cold long short review of a this very").split()
TOPICS = ["food", "films", "books", "travel", "music"]
STYLES = ["loves the taste very good", "hates the slow plot", "likes a long story great cast",
          "loves the warm view", "hates bad sound very short"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + [str(d) for d in range(10)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def example(i: int) -> tuple[str, str]:
    """A learnable mapping: the user's digit picks the topic, the style follows the user."""
    user = i % 5
    return f"user {user} writes about {TOPICS[user]} {i % 10}", f"{STYLES[user]} {TOPICS[user]}"


def small_cfg(**overrides) -> TrainConfig:
    base = dict(device="cpu", optimizer="adamw", lr=3e-3, lr_final_ratio=0.1, warmup_steps=2, weight_decay=0.0,
                grad_clip=1.0, batch_size=4, micro_batch_size=2, max_steps=30, epochs=100.0, max_input_tokens=16,
                max_output_tokens=12, length_buckets=[16, 32], eval_every=10, val_fraction=0.25, log_every=10, seed=0)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def featurize(tokenizer, n, cfg, weight=1.0):
    return [dict(train.build_features(tokenizer, *example(i), cfg.max_input_tokens, cfg.max_output_tokens), weight=weight)
            for i in range(n)]


# --------------------------------------------------------------------------- features and batches

def test_build_features_masks_prompt_truncates_and_appends_eos(tokenizer):
    prompt = "user 1 writes about food and likes the long plot of this review"
    completion = "good taste great price very warm"
    f = train.build_features(tokenizer, prompt, completion, max_input_tokens=5, max_output_tokens=4)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    comp = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert f["input_ids"][:5] == [bos] + body[-4:]          # BOS kept, prompt left-truncated
    assert f["input_ids"][5:] == comp[:3] + [eos]           # completion right-truncated, EOS appended
    assert f["labels"] == [-100] * 5 + comp[:3] + [eos]     # every prompt position masked


@pytest.mark.parametrize("n, expected", [(1, 16), (16, 16), (17, 32), (32, 32), (33, 128), (200, 256)])
def test_bucket_length(n, expected):
    assert train.bucket_length(n, [32, 16]) == expected


def test_collate_pads_to_the_smallest_bucket(tokenizer):
    features = [{"input_ids": [5] * 3, "labels": [-100, 6, 7]}, {"input_ids": [5] * 20, "labels": [8] * 20}]
    b = train.collate(features, [1.0, 0.5], [16, 32, 64], pad_id=0)
    assert b["input_ids"].shape == b["labels"].shape == (2, 32)
    assert b["input_ids"][0, 3:].eq(0).all() and b["labels"][0, 3:].eq(-100).all()
    assert b["weights"].tolist() == [1.0, 0.5]


# --------------------------------------------------------------------------- the loss

def test_masked_prompt_positions_contribute_nothing():
    torch.manual_seed(0)
    labels = torch.tensor([[-100, -100, -100, 4, 5, 6]])
    logits = torch.randn(1, 6, 10, requires_grad=True)
    loss = train.weighted_nll(logits, labels, torch.ones(1))
    loss.backward()
    # position t predicts label t+1: positions 0 and 1 predict masked prompt labels, position 5 nothing
    assert logits.grad[0, :2].abs().sum() == 0 and logits.grad[0, 5].abs().sum() == 0
    assert logits.grad[0, 2:5].abs().sum() > 0
    # what sits at masked positions does not move the loss; a completion label does
    perturbed = logits.detach().clone()
    perturbed[0, :2] += 5 * torch.randn(2, 10)
    assert torch.equal(train.weighted_nll(perturbed, labels, torch.ones(1)), loss.detach())
    changed = labels.clone()
    changed[0, 4] = 7
    assert not torch.isclose(train.weighted_nll(logits.detach(), changed, torch.ones(1)), loss.detach())
    # weights of 1.0: the plain mean-token NLL over completion tokens
    plain = torch.nn.functional.cross_entropy(logits.detach()[0, 2:5], labels[0, 3:])
    assert torch.isclose(loss.detach(), plain, rtol=1e-6)


def _gradients(model, features, weights, buckets=(16, 32)):
    model.zero_grad(set_to_none=True)
    b = train.collate(features, weights, list(buckets), pad_id=0)
    train.weighted_nll(model(input_ids=b["input_ids"]).logits, b["labels"], b["weights"]).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_weight_zero_adds_nothing_and_weight_two_counts_twice(tokenizer):
    model = make_model(tokenizer)
    a, b = featurize(tokenizer, 2, small_cfg())
    only_a = _gradients(model, [a], [1.0])
    assert torch.allclose(_gradients(model, [a, b], [1.0, 0.0]), only_a, atol=1e-7)
    twice = _gradients(model, [a, a, b], [1.0, 1.0, 1.0])
    assert torch.allclose(_gradients(model, [a, b], [2.0, 1.0]), twice, atol=1e-7)
    assert not torch.allclose(_gradients(model, [a, b], [1.0, 1.0]), twice, atol=1e-5)


# --------------------------------------------------------------------------- schedule and split

def test_lr_warms_up_then_decays_to_the_final_ratio():
    cfg = small_cfg(lr=1.0, warmup_steps=4, lr_final_ratio=0.1)
    lrs = [train.lr_at(s, cfg, 20) for s in range(20)]
    assert lrs[0] == pytest.approx(0.2) and lrs[3] == pytest.approx(0.8)
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(x < y for x, y in zip(lrs[:4], lrs[1:5])) and all(x > y for x, y in zip(lrs[4:], lrs[5:]))


@pytest.mark.parametrize("n_examples, fraction", [(1, 0.5), (2, 0.0), (2, 0.1), (3, 1.0), (40, 0.25)])
def test_split_validation_by_example(n_examples, fraction):
    rows = [{"example_id": f"e{i}", "sample_index": s} for i in range(n_examples) for s in range(3)]
    tr, va = train.split_validation(rows, fraction)
    assert tr and len(tr) + len(va) == len(rows)
    assert not {r["example_id"] for r in tr} & {r["example_id"] for r in va}  # samples never straddle
    assert bool(va) == (fraction > 0 and n_examples >= 2)
    ids = {r["example_id"] for r in va}
    assert {r["example_id"] for r in train.split_validation(list(reversed(rows)), fraction)[1]} == ids  # order-free
    assert train.plan_steps(small_cfg(epochs=1.0, batch_size=4, max_steps=100), len(tr)) == math.ceil(len(tr) / 4)


# --------------------------------------------------------------------------- the loop

def test_loss_decreases_and_best_state_is_kept(tokenizer):
    cfg = small_cfg(lr=1e-2)
    data = featurize(tokenizer, 10, cfg)
    model = make_model(tokenizer)
    result = train.fit(model, data[:8], data[8:], cfg, pad_id=tokenizer.pad_token_id)
    assert result.steps == 30 and result.device == "cpu" and result.compilations == 0
    assert result.final_loss < 0.5 * result.first_loss
    assert result.best_step in (10, 20, 30)
    # the model left behind is the best state: its validation loss is the best one recorded
    val = train.evaluate(model, data[8:], 2, cfg.length_buckets, tokenizer.pad_token_id, torch.device("cpu"), "cpu")
    assert val == pytest.approx(result.best_val_loss, rel=1e-5)


def test_xla_matches_eager(tokenizer):
    # AdamW here; Adafactor on XLA runs in the end-to-end test below
    cfg = small_cfg(optimizer="adamw", max_steps=3, eval_every=3, log_every=1, lr=1e-3, length_buckets=[32])
    data = featurize(tokenizer, 8, cfg)
    model = make_model(tokenizer)
    eager, xla = copy.deepcopy(model), copy.deepcopy(model)
    r_cpu = train.fit(eager, data[:6], data[6:], cfg, pad_id=tokenizer.pad_token_id)
    r_xla = train.fit(xla, data[:6], data[6:], dataclasses.replace(cfg, device="xla"), pad_id=tokenizer.pad_token_id)
    assert r_xla.device == "xla"
    assert r_xla.first_loss == pytest.approx(r_cpu.first_loss, rel=1e-4)
    assert r_xla.final_loss == pytest.approx(r_cpu.final_loss, rel=1e-3)
    assert r_xla.best_val_loss == pytest.approx(r_cpu.best_val_loss, rel=1e-3)
    # a handful of graphs (per bucket: first/accumulating micro-batch, optimizer step, eval), not one per step
    assert 0 < r_xla.compilations <= 8
    for p, q in zip(eager.parameters(), xla.parameters()):
        assert q.device.type == "cpu" and torch.allclose(p, q, atol=1e-4)


def test_lora_trains_adapters_only_and_merges(tokenizer, tiny_dir):
    cfg = small_cfg(lora_rank=4, lr=1e-2, max_steps=4, eval_every=4)
    model, _ = train.load_for_training(str(tiny_dir), cfg)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    data = featurize(tokenizer, 6, cfg)
    result = train.fit(model, data[:4], data[4:], cfg, pad_id=tokenizer.pad_token_id)
    assert result.final_loss < result.first_loss
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    q_proj = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_proj, base["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])


# --------------------------------------------------------------------------- run() end to end

def _training_rows(n: int, variant: str, iteration: int):
    now = dt.datetime(2025, 1, 1)
    rows = []
    for i in range(n):
        prompt, completion = example(i)
        rows.append((variant, iteration, f"ex{i:03d}", -1, "review", prompt, completion, 1.0 if i else 0.0,
                     "gold", "v1", "test-run", now))
    return rows


@pytest.fixture(scope="module")
def e2e(spark, tmp_path_factory, tiny_dir):
    import mlflow

    from restpg import catalog
    from restpg.runtime import setup_mlflow

    home = tmp_path_factory.mktemp("train-home")
    settings = load_settings("local", home=str(home), overrides=[
        f"models.policy={tiny_dir}", "catalog.schema=restpg_train_test", "mlflow.policy_model_name=tiny-policy",
        "train.device=xla", "train.optimizer=adafactor", "train.lr=0.01", "train.warmup_steps=1",
        "train.batch_size=4", "train.micro_batch_size=2", "train.max_steps=6", "train.epochs=50.0",
        "train.max_input_tokens=16", "train.max_output_tokens=12", "train.length_buckets=[32]",
        "train.eval_every=2", "train.log_every=2", "train.val_fraction=0.25"])
    rows = _training_rows(12, "sft", 0) + _training_rows(3, "sft", 1)  # iteration 1 must stay unread
    catalog.replace_slice(spark, settings, spark.createDataFrame(rows, catalog.spec("training_sets").struct()),
                          "training_sets", {"variant": "sft"}, "test-run")
    setup_mlflow(settings)
    with mlflow.start_run(run_name="pipeline") as parent:
        result = train.run(spark, settings, "sft", 0)
    return settings, result, parent.info.run_id


def test_run_trains_registers_and_logs_lineage(e2e, tiny_dir):
    from mlflow import MlflowClient

    settings, result, parent_id = e2e
    assert result["device"] == "xla" and result["steps"] == 6 and 0 < result["compilations"] <= 8
    assert result["train_rows"] + result["val_rows"] == 11  # the weight-0 row is dropped, iteration 1 unread
    assert result["val_rows"] > 0 and result["final_loss"] < result["first_loss"]
    assert result["model_uri"] == f"models:/tiny-policy/{result['version']}"
    client = MlflowClient()
    version = client.get_model_version("tiny-policy", result["version"])
    assert version.tags["variant"] == "sft" and version.tags["iteration"] == "0"
    assert version.tags["init_ref"] == str(tiny_dir) and float(version.tags["val_loss"]) == pytest.approx(result["best_val_loss"], rel=1e-5)
    assert version.tags["training_set_version"] == str(result["training_set_version"])
    run = client.get_run(result["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert [m.step for m in client.get_metric_history(result["run_id"], "val_loss")] == [2, 4, 6]
    meta = json.loads((Path(result["checkpoint_dir"]) / train.CHECKPOINT_META).read_text())
    assert meta["step"] == result["best_step"] and meta["init_ref"] == str(tiny_dir)
    assert meta["train_config"]["batch_size"] == 4 and meta["training_set_version"] == result["training_set_version"]


def test_registered_checkpoint_loads_back_as_the_best_state(e2e):
    from transformers import AutoModelForCausalLM

    from restpg import models

    settings, result, _ = e2e
    registered, tokenizer = models.load_causal_lm(result["model_uri"], settings)
    saved = AutoModelForCausalLM.from_pretrained(result["checkpoint_dir"])
    ids = torch.tensor([tokenizer("user 3 writes about travel")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(registered(input_ids=ids).logits, saved(input_ids=ids).logits, atol=1e-6)
    # its validation loss is the best one recorded: the best state, not merely the last, was saved
    cfg = settings.train
    rows = [r for r in _training_rows(12, "sft", 0) if r[7] > 0]
    _, val_rows = train.split_validation([{"example_id": r[2], "prompt": r[5], "completion": r[6], "weight": r[7]}
                                          for r in rows], cfg.val_fraction)
    val = [dict(train.build_features(tokenizer, r["prompt"], r["completion"], cfg.max_input_tokens,
                                     cfg.max_output_tokens), weight=r["weight"]) for r in val_rows]
    loss = train.evaluate(registered, val, cfg.micro_batch_size, cfg.length_buckets, tokenizer.pad_token_id,
                          torch.device("cpu"), "cpu")
    assert loss == pytest.approx(result["best_val_loss"], rel=1e-4)


def test_registered_pyfunc_writes_text(e2e):
    import mlflow

    _, result, _ = e2e
    out = mlflow.pyfunc.load_model(result["model_uri"]).predict(["user 2 writes about books"], params={"max_new_tokens": 4})
    assert len(out) == 1 and isinstance(out[0], str)


def test_empty_slice_fails_clearly(spark, e2e):
    settings, _, _ = e2e
    with pytest.raises(ValueError, match="no rows for variant='rest_pg' iteration=2"):
        train.run(spark, settings, "rest_pg", 2)
