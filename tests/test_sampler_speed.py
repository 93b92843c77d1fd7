"""The sampler's partial ranking picks exactly the token a full sort of the vocabulary picks."""
from __future__ import annotations

import pytest
import torch

from restpg import generation


@pytest.mark.parametrize("scale, top_p", [(8.0, 0.95), (3.0, 0.9), (0.5, 0.95), (8.0, 1.0), ("mixed", 0.95)])
def test_nucleus_from_the_top_k_equals_the_nucleus_from_a_full_sort(monkeypatch, scale, top_p):
    """Peaked rows (nucleus inside the top k) take the fast path; flat rows (scale 0.5, top_p 1.0)
    need the whole vocabulary and are sorted whole; a batch of both splits. All must match the full
    sort draw for draw."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(48, 4000, generator=g)
    logits = logits * (torch.tensor([8.0, 0.5] * 24)[:, None] if scale == "mixed" else scale)
    seeds = list(range(48))

    def pick(k: int) -> torch.Tensor:
        monkeypatch.setattr(generation, "NUCLEUS_K", k)
        return generation.choose_tokens(logits, [torch.Generator().manual_seed(s) for s in seeds], 0.7, top_p)

    fast, full = pick(64), pick(4000)
    assert torch.equal(fast, full)
    probs = torch.softmax(logits / 0.7, -1)
    assert bool((probs.gather(1, fast[:, None]) > 0).all())
