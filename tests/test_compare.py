"""``llmrec compare``: paired differences of evaluation runs and the rows a comparison would need."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llmrec.evaluation.compare import compare_runs, comparison_table
from llmrec.evaluation.metrics import rows_for_power


def _run(path, item_ranks: list[int | None]):
    path.mkdir(parents=True)
    (path / "results.json").write_text("{}")
    with open(path / "rankings.jsonl", "w") as f:
        for row, rank in enumerate(item_ranks):
            f.write(json.dumps({"row": row, "target_item_id": 100 + row, "item_rank": rank, "title_rank": rank}) + "\n")
    return path


def test_rows_for_power_by_hand():
    # differences 1, 0, 0, 0: sd = 0.5; (z_0.975 + z_0.8) = 1.959964 + 0.841621 = 2.801585
    assert rows_for_power([1, 0, 0, 0], [0, 0, 0, 0], effect=0.1) == pytest.approx((2.801585 * 0.5 / 0.1) ** 2, rel=1e-6)
    # halving the effect quadruples the rows; the sign of the effect does not matter
    assert rows_for_power([1, 0, 0, 0], [0, 0, 0, 0], effect=-0.05) == pytest.approx(
        4 * rows_for_power([1, 0, 0, 0], [0, 0, 0, 0], effect=0.1))
    # 90% power, 1% level: z = 2.575829 + 1.281552
    assert rows_for_power(np.array([2.0, 0, 1, 1]), np.zeros(4), 0.5, alpha=0.01, power=0.9) == pytest.approx(
        (3.857381 * math.sqrt(2 / 3) / 0.5) ** 2, rel=1e-6)
    assert math.isnan(rows_for_power([1, 0, 1], [1, 0, 1], effect=0.1))  # no row differs: no spread to go by
    for bad in (dict(effect=0.0), dict(effect=0.1, power=1.0), dict(effect=0.1, alpha=0.0)):
        with pytest.raises(ValueError):
            rows_for_power([1, 0], [0, 0], **bad)
    with pytest.raises(ValueError, match="at least 2"):
        rows_for_power([1], [0], effect=0.1)


def test_compare_reports_rows_needed_relative_to_the_baseline(tmp_path):
    base = _run(tmp_path / "a", [0, None, 3, None, 12, 1])
    other = _run(tmp_path / "b", [0, 2, None, None, 12, 1])
    res = compare_runs([base, other], ["hr@10", "ndcg@10"], power_rel=[0.1, 0.5])
    per_a = np.array([1, 0, 1, 0, 0, 1.0])
    per_b = np.array([1, 1, 0, 0, 0, 1.0])
    want = rows_for_power(per_b, per_a, 0.5 * per_a.mean())
    assert res["differences"]["hr@10"][0]["rows_for_power"]["0.5"] == pytest.approx(want)
    assert res["differences"]["hr@10"][0]["rows_for_power"]["0.1"] == pytest.approx(25 * want)
    table = comparison_table(res)
    assert "| 10% | 50% |" in table and f"{want:,.0f}" in table
    assert "rows_for_power" not in compare_runs([base, other], ["hr@10"])["differences"]["hr@10"][0]
    with pytest.raises(ValueError, match="power_rel"):
        compare_runs([base, other], ["hr@10"], power_rel=[-0.1])
