"""scripts/rank_fusion.py: reciprocal rank fusion of two evaluations, written as an evaluation `llmrec compare` reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rank_fusion.py"


def _module():
    return load_script("rank_fusion")


def _run(d: Path, rows: list[tuple[int, int, list[int]]]) -> Path:
    """An evaluation directory: (row, target, ranked items) per row, ranks 0-based as the evaluator writes them."""
    d.mkdir(parents=True)
    (d / "results.json").write_text("{}")
    with (d / "rankings.jsonl").open("w") as f:
        for row, target, items in rows:
            rank = items.index(target) if target in items else None
            f.write(json.dumps({"row": row, "user_id": f"u{row}", "target_item_id": target, "item_ranking": items,
                                "item_rank": rank, "title_rank": rank}) + "\n")
    return d


def test_fuse_by_hand():
    fuse = _module().fuse
    # c = 1: item 5 gets 1/2 + 1/3, item 7 1/3 + 1/2 (a tie: the smaller id first), item 9 1/4, item 8 1/4
    assert fuse([[5, 7, 9], [7, 5, 8]], c=1) == [5, 7, 8, 9]
    # one list: its own order
    assert fuse([[3, 1, 2]]) == [3, 1, 2]


def test_fused_run_is_an_evaluation_compare_reads(tmp_path, monkeypatch):
    from llmrec.evaluation.compare import compare_runs, load_rankings

    a = _run(tmp_path / "a", [(0, 5, [5, 7, 9]), (1, 2, [4, 3, 1]), (2, 8, [1, 2, 3])])
    b = _run(tmp_path / "b", [(0, 5, [7, 5, 8]), (1, 2, [2, 6, 7]), (3, 4, [4])])
    out = tmp_path / "fused"
    monkeypatch.setattr(sys, "argv", ["rank_fusion.py", str(a), str(b), "--c", "1", "--output", str(out)])
    assert _module().main() == 0
    fused = load_rankings(out)
    assert sorted(fused) == [0, 1]  # the shared rows only
    assert fused[0]["item_ranking"] == [5, 7, 8, 9] and fused[0]["item_rank"] == 0
    # row 1: 4 -> 1/2, 3 -> 1/3, 1 -> 1/4 (list a); 2 -> 1/2, 6 -> 1/3, 7 -> 1/4 (list b): 2 is second (ties by id)
    assert fused[1]["item_ranking"][:2] == [2, 4] and fused[1]["item_rank"] == 0
    res = json.loads((out / "results.json").read_text())
    assert res["metrics"]["item"]["hr@1"] == 1.0
    cmp = compare_runs([a, out], metrics=["hr@1"])
    assert cmp["rows"] == 2 and cmp["metrics"]["hr@1"] == [0.5, 1.0]


def test_runs_on_different_rows_are_refused(tmp_path, monkeypatch):
    a = _run(tmp_path / "a", [(0, 5, [5, 7])])
    b = _run(tmp_path / "b", [(0, 6, [6, 5])])
    monkeypatch.setattr(sys, "argv", ["rank_fusion.py", str(a), str(b), "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="row 0: target 5 .* 6 .*not the same rows"):
        _module().main()
    assert not (tmp_path / "o").exists()
    # the same targets, other users (a review)
    other_users = _run(tmp_path / "c", [(0, 5, [5, 7])])
    rankings = other_users / "rankings.jsonl"
    rankings.write_text(rankings.read_text().replace('"u0"', '"x0"'))
    monkeypatch.setattr(sys, "argv", ["rank_fusion.py", str(a), str(other_users), "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"row 0: target 5 \(user u0\) .* 5 \(user x0\) .*not the same rows"):
        _module().main()
    assert not (tmp_path / "o").exists()
