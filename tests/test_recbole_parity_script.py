"""scripts/recbole_parity.py: a seed given twice in one setting is an error naming both files."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import load_script


def _recbole(path, seed, ndcg):
    path.write_text(json.dumps({"seed": seed, "test": {"ndcg@10": ndcg, "hit@10": 0.1, "ndcg@20": 0.08},
                                "best_valid_ndcg@10": 0.07, "users": 943, "items": 1682}))


def _ours(path, seed, ndcg, num_items=1682):
    metrics = {"ndcg@10": ndcg, "hit@10": 0.1, "ndcg@20": 0.08, "hr@10": 0.1, "hr@20": 0.2, "mrr@10": 0.03}
    protocol = {"num_items": num_items, "rows": {"test": 943}, "mask_history": False, "split": "loo"}
    path.write_text(json.dumps({"model": "sasrec", "seed": seed, "test": metrics, "valid": {"ndcg@10": 0.07},
                                "protocol": protocol}))


def test_a_seed_given_twice_is_an_error_naming_both_files(tmp_path, monkeypatch):
    # Two files of one seed (a rerun beside the first): the later silently replaced the earlier in the table.
    mod = load_script("recbole_parity")
    _recbole(tmp_path / "rb_a.json", 42, 0.06)
    _recbole(tmp_path / "rb_b.json", 42, 0.07)
    _ours(tmp_path / "ours_42.json", 42, 0.059)
    argv = ["recbole_parity.py", "--recbole", str(tmp_path / "rb_*.json"), "--ours", str(tmp_path / "ours_*.json"),
            "llmrec", "--output", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=r"seed 42 is given twice \(.*rb_a.json and .*rb_b.json\)"):
        mod.main()
    assert mod.runs_by_seed([("a", 1, {"x": 1}), ("b", 2, {"x": 2})], "s") == {1: {"x": 1}, 2: {"x": 2}}
    with pytest.raises(SystemExit, match=r"llmrec: seed 1 is given twice \(a and b\)"):
        mod.runs_by_seed([("a", 1, {}), ("b", 1, {})], "llmrec")


def test_a_run_on_another_dataset_is_refused(tmp_path, monkeypatch):
    """A Beauty SASRec was printed as "vs RecBole" under the ML-100K caption (a review)."""
    mod = load_script("recbole_parity")
    _recbole(tmp_path / "rb_a.json", 42, 0.06)
    _ours(tmp_path / "ours_42.json", 42, 0.059, num_items=12101)
    argv = ["recbole_parity.py", "--recbole", str(tmp_path / "rb_*.json"), "--ours", str(tmp_path / "ours_*.json"),
            "llmrec", "--output", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=r"ours_42.json: seed 42 is not on RecBole's protocol \(items, test users "
                                         r"\(12101, 943\)"):
        mod.main()
    assert not (tmp_path / "out.md").exists()
