"""Training speed options: length-grouped micro-batches (less padding, same gradient) and bf16 autocast."""
from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_lm

from restpg.training.data import IGNORE_INDEX, collate, length_grouped, padded_tokens
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
