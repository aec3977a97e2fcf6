"""The real datasets of ../shared/data: prepare each and check the raw counts of its README.

Skipped cleanly when the folder is absent (e.g. outside the project's workspace).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmrec.data import formats
from llmrec.data.prepare import prepare

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}"),
]

GAMES = SHARED / "amazon_games_dealrec"
BEAUTY = SHARED / "amazon_beauty_p5_transrec"
ML100K = SHARED / "ml-100k_recbole"
CDS = SHARED / "cds_and_vinyl_latentr3_PARTIAL_no_train"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def games(out_root: Path) -> tuple[dict, Path]:
    out = out_root / "games"
    return prepare(formats.read_seq_txt(need(GAMES)), out), out


def test_games_counts(games):
    stats, out = games
    raw = stats["raw"]
    assert (raw["users"], raw["items"], raw["interactions"]) == (49_156, 17_332, 342_329)
    assert raw["per_split"]["train"] == {"users": 49_156, "items": 16_586, "interactions": 299_987}
    assert raw["per_split"]["valid"] == {"users": 9_609, "items": 6_517, "interactions": 22_609}
    assert raw["per_split"]["test"] == {"users": 8_696, "items": 5_986, "interactions": 19_733}
    assert raw["catalog_items"] == 17_332
    assert stats["cleaning"]["found"]["placeholder"] == 19
    assert stats["cleaning"]["dropped_items"]["placeholder"] == 19
    assert stats["cleaned"]["catalog_items"] == 17_332 - 19
    # the placeholders covered 11 valid and 7 test interactions; a first interaction has no history
    assert stats["rows"]["valid"] == 22_609 - 11 - stats["skipped"].get("valid_rows_empty_history", 0)
    assert stats["rows"]["test"] == 19_733 - 7 - stats["skipped"].get("test_rows_empty_history", 0)
    assert json.loads((out / "stats.json").read_text(encoding="utf-8")) == stats
    first = json.loads((out / "catalog.jsonl").open(encoding="utf-8").readline())
    assert first == {"item_id": 1, "raw_id": "1", "title": "X: Beyond the Frontier - PC"}


def test_games_title_sources_agree():
    npy = formats.read_seq_titles(need(GAMES), "npy")
    jsonl = formats.read_seq_titles(GAMES, "jsonl")
    assert npy == jsonl and len(npy) == 17_332 and npy["2"] == "Anno 2070"


def test_beauty_counts(out_root: Path):
    stats = prepare(formats.read_seq_txt(need(BEAUTY)), out_root / "beauty")
    raw = stats["raw"]
    assert (raw["users"], raw["items"], raw["interactions"]) == (22_363, 12_101, 198_502)
    assert stats["cleaning"]["found"]["placeholder"] == 7
    assert stats["options"]["split_mode"] == "loo"
    # every user has >= 5 items: one valid and one test row each (placeholder targets dropped first)
    assert stats["rows"]["valid"] <= 22_363 and stats["rows"]["test"] <= 22_363
    assert stats["rows"]["test"] >= 22_363 - 13
    # item 0 occurs and is not the padding id
    assert json.loads((out_root / "beauty" / "catalog.jsonl").open().readline())["raw_id"] == "0"


def test_ml100k_counts(out_root: Path):
    stats = prepare(formats.read_recbole(need(ML100K)), out_root / "ml")
    raw = stats["raw"]
    assert (raw["users"], raw["items"], raw["interactions"]) == (943, 1_682, 100_000)
    assert stats["rows"]["valid"] == 943 and stats["rows"]["test"] == 943
    assert stats["rows"]["train"] == 100_000 - 3 * 943  # minus valid, test and each user's first item
    assert stats["cleaning"]["found"]["duplicate"] == 23


def test_cds_partial_valid_and_test(out_root: Path):
    raw = formats.read_d3_csv(need(CDS), ["valid", "test"])
    stats = prepare(raw, out_root / "cds", splits=["valid", "test"])
    per = stats["raw"]["per_split"]
    assert (per["valid"]["rows"], per["valid"]["users"], per["valid"]["distinct_targets"]) == (6_156, 1_907, 3_316)
    assert (per["test"]["rows"], per["test"]["users"], per["test"]["distinct_targets"]) == (6_157, 1_723, 3_309)
    assert stats["raw"]["catalog_items"] == 5_841
    assert stats["cleaning"]["found"]["html"] == 29
    # the html titles are the target of 33 valid and 87 test rows
    assert stats["skipped"]["valid_rows_target_dropped"] == 33
    assert stats["skipped"]["test_rows_target_dropped"] == 87
    assert max(len(r.history) for r in raw.rows["test"]) == 10
    assert sorted(p.name for p in (out_root / "cds").iterdir()) == ["catalog.jsonl", "stats.json", "test.jsonl",
                                                                    "valid.jsonl"]


def test_cds_without_split_names_is_a_clear_error(tmp_path: Path, capsys):
    with pytest.raises(FileNotFoundError, match=r"split 'train' is missing.*--splits"):
        formats.read_d3_csv(need(CDS), ["train", "valid", "test"])
    from llmrec.cli import main

    out = tmp_path / "cds"
    assert main(["data", "prepare", "--format", "d3-csv", "--input", str(CDS), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "split 'train' is missing" in err and "Traceback" not in err
    assert not out.exists()
