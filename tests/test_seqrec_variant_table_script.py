"""scripts/seqrec_variant_table.py: single-run differences only against the baseline's seed and data."""

from __future__ import annotations

import json

import pytest
from conftest import load_script


def _run(directory, seed, num_items=1682, ndcg=0.06):
    directory.mkdir(parents=True)
    metrics = {"ndcg@10": ndcg, "hr@10": 0.12}
    protocol = {"num_items": num_items, "split": "loo", "rows": {"train": 10, "valid": 2, "test": 2}}
    (directory / "results.json").write_text(json.dumps({"seed": seed, "valid": metrics, "test": metrics,
                                                        "best_epoch": 3, "protocol": protocol}))
    return directory


def test_a_variant_of_another_seed_or_dataset_is_refused(tmp_path):
    mod = load_script("seqrec_variant_table")
    base, same = _run(tmp_path / "base", 42), _run(tmp_path / "same", 42, ndcg=0.07)
    assert mod.main([f"recipe={base}", f"variant={same}", "--output", str(tmp_path / "ok")]) == 0
    assert "| variant | 42 | 0.0700 | +0.0100 |" in (tmp_path / "ok.md").read_text()
    for other in (_run(tmp_path / "seed44", 44), _run(tmp_path / "beauty", 42, num_items=12101)):
        with pytest.raises(SystemExit, match=rf"{other.name}: seed .* the baseline .* \(a variant must differ in "
                                             r"its settings only\)"):
            mod.main([f"recipe={base}", f"variant={other}", "--output", str(tmp_path / other.name)])
        assert not (tmp_path / f"{other.name}.md").exists()
