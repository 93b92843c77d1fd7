"""Sparse-profile evaluation: deterministic profile cuts, size labels, the profile-size plot."""
import pandas as pd
import pytest

from restpg import sparse_eval


def test_parse_sizes_and_labels():
    assert sparse_eval.parse_sizes("0,1, 2,all") == [0, 1, 2, None]
    assert [sparse_eval.label(s) for s in (0, None)] == ["profile_size=0", "profile_size=all"]
    with pytest.raises(ValueError, match="-1"):
        sparse_eval.parse_sizes("0,-1")


def test_truncate_is_deterministic_and_order_blind():
    items = [{"item_id": "c", "text": "C"}, {"item_id": "a", "text": "A"}, {"item_id": "b", "text": "B"}]
    assert [it["item_id"] for it in sparse_eval.truncate(items, 2)] == ["a", "b"]
    assert sparse_eval.truncate(list(reversed(items)), 2) == sparse_eval.truncate(items, 2)
    assert sparse_eval.truncate(items, 0) == [] and len(sparse_eval.truncate(items, None)) == 3


def test_plot_draws_one_line_per_variant(tmp_path):
    rows = [("profile_size=0", "pat", "macro", "judge_score", 0.3), ("profile_size=all", "pat", "macro", "judge_score", 0.4),
            ("profile_size=0", "sft", "macro", "judge_score", 0.2), ("profile_size=1", "sft", "macro", "judge_score", 0.25)]
    summary = pd.DataFrame(rows, columns=["ablation", "variant", "task", "metric", "mean"])
    path = sparse_eval.plot(summary, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000 and path.endswith("curve.png")
