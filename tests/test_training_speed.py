"""Training speed options: length-grouped micro-batches (less padding, same gradient) and bf16 autocast."""
from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_lm

from restpg.training.data import IGNORE_INDEX, bucket_length, collate, length_grouped, padded_tokens, token_grouped
from restpg.training.objective import autocast, weighted_nll, weighted_tokens


def _rows(lengths: list[int], vocab: int = 300) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2:], "weight": 1.0 + n % 3})
    return rows


def test_length_grouping_keeps_the_rows_and_cuts_padding():
    lengths = [20, 200, 30, 190, 25, 210, 35, 180]
    steps = list(range(8))
    grouped = length_grouped(steps, lengths, 4)
    assert sorted(i for g in grouped for i in g) == steps and all(len(g) == 4 for g in grouped)
    assert grouped[0] == [5, 1, 3, 7]  # the longest rows together
    as_drawn = [steps[:4], steps[4:]]
    assert padded_tokens(grouped, lengths, [64, 256]) == 4 * 64 + 4 * 256 < padded_tokens(as_drawn, lengths, [64, 256])


def test_token_budgeted_micro_batches_bound_each_pass_and_keep_every_row():
    lengths = [20, 200, 30, 190, 25, 210, 35, 600]
    buckets = [64, 256]
    groups = token_grouped(list(range(8)), lengths, 4, 512, buckets)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert groups[0] == [7]  # 600 tokens, padded to 640: over the budget, so alone
    assert groups[1:] == [[5, 1], [3, 6], [2, 4, 0]]  # 2 rows padded to 256 fit 512, a third would not
    assert all(len(g) * bucket_length(lengths[g[0]], buckets) <= 512 for g in groups[1:])
    assert token_grouped(list(range(8)), lengths, 2, 10 ** 6, buckets) == [[7, 5], [1, 3], [6, 2], [4, 0]]  # rows cap


def test_a_token_budget_trains_the_same_model_in_more_passes(tmp_path):
    """fit with `micro_batch_tokens`: the same losses and weights as one pass per step, in more, smaller passes."""
    from transformers import AutoModelForCausalLM

    from restpg.config import TrainConfig
    from restpg.training import trainer

    path = make_tiny_lm(tmp_path / "tiny")
    rows = _rows([12, 60, 15, 58, 10, 64, 40, 33])
    passes, results, weights = {}, {}, {}
    for budget in (0, 64):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        calls = []
        model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
        cfg = TrainConfig(device="cpu", optimizer="adamw", lr=1e-2, warmup_steps=0, batch_size=4, micro_batch_size=4,
                          micro_batch_tokens=budget, steps=4, length_buckets=[16, 32, 64], eval_every=10 ** 9,
                          checkpoint_every=0, log_every=1, grad_clip=0.0)
        results[budget] = trainer.fit(model, rows, cfg, pad_id=0)
        passes[budget], weights[budget] = calls, [p.detach().clone() for p in model.parameters()]
    assert len(passes[0]) == 4 and len(passes[64]) > 4  # one pass per step against several
    assert max(n * w for n, w in passes[64]) <= 64 < max(n * w for n, w in passes[0])
    assert results[64].final_loss == pytest.approx(results[0].final_loss, rel=1e-4)
    for a, b in zip(weights[0], weights[64]):  # 4 AdamW steps at lr 1e-2 move weights by ~1e-2; rounding stays near 1e-5
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def _step_grad(model, rows, groups, buckets) -> list[torch.Tensor]:
    """The accumulated gradient of one optimizer step over micro-batches `groups` (one normaliser)."""
    model.zero_grad()
    batches = [collate([rows[i] for i in g], [rows[i]["weight"] for i in g], buckets, 0) for g in groups]
    denominator = torch.tensor(sum(weighted_tokens(b["labels"], b["weights"]) for b in batches))
    for b in batches:
        weighted_nll(model(input_ids=b["input_ids"]).logits, b["labels"], b["weights"], denominator).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_length_grouped_micro_batches_give_the_step_the_same_gradient(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_lm(tmp_path / "tiny"), dtype=torch.float32)
    lengths = [12, 60, 15, 58, 10, 64]
    rows, buckets = _rows(lengths), [16, 64]
    drawn = _step_grad(model, rows, [[0, 1, 2], [3, 4, 5]], buckets)
    grouped = _step_grad(model, rows, length_grouped(list(range(6)), lengths, 3), buckets)
    for a, b in zip(drawn, grouped):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_runs_matmuls_in_bf16_and_keeps_weights_and_loss_float32(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_lm(tmp_path / "tiny"), dtype=torch.float32)
    b = collate(_rows([40, 30]), [1.0, 1.0], [64], 0)
    with autocast("cpu", "float32"):
        exact = model(input_ids=b["input_ids"]).logits
    with autocast("cpu", "bfloat16"):
        logits = model(input_ids=b["input_ids"]).logits
    assert exact.dtype == torch.float32 and logits.dtype == torch.bfloat16
    loss = weighted_nll(logits, b["labels"], b["weights"])
    loss.backward()
    assert loss.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert loss.item() == pytest.approx(weighted_nll(exact, b["labels"], b["weights"]).item(), rel=0.05)
    with pytest.raises(ValueError, match="autocast dtype"):
        autocast("cpu", "float16")
