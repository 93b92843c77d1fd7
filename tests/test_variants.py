"""The variant table: each variant's start and the training slice of its final policy."""
from __future__ import annotations

from restpg import variants as V


def test_final_slice_is_the_last_em_iteration_or_the_start():
    assert V.final_slice("rest_pg", 2) == ("rest_pg", 2) and V.final_slice("rest_em", 1) == ("rest_em", 1)
    assert V.final_slice("pat", 3) == ("pat", 3)
    # without EM iterations an EM variant's final policy is its SFT start (pat trains its own start)
    assert V.final_slice("rest_pg", 0) == ("sft_reasoning", 0) and V.final_slice("rest_em", 0) == ("sft", 0)
    assert V.final_slice("pat", 0) == ("pat", 0)
    assert V.final_slice("sft", 2) == ("sft", 0) and V.final_slice("sft_reasoning", 2) == ("sft_reasoning", 0)
