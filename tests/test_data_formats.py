"""Readers + prepare on small hand-built files: exact rows, stats, determinism, atomicity, safe .npy."""

from __future__ import annotations

import csv
import gzip
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from llmrec.data import formats
from llmrec.data.canonical import DataFormatError, atomic_directory, load_prepared
from llmrec.data.prepare import PrepareOptions, prepare
from llmrec.data.safe_npy import UnsafePickleError, load_npy_restricted

D3_HEADER = ["user_id", "item_asins", "item_asin", "history_item_id", "item_id", "history_item_title",
             "item_title", "history_rating", "rating", "history_timestamp", "timestamp"]


# --------------------------------------------------------------------------- helpers


def rows_of(directory: Path, split: str) -> list[tuple]:
    """A split file as (user, history, target, timestamp) tuples, in file order."""
    out = []
    for line in (directory / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        assert set(r) == {"user_id", "history_item_ids", "target_item_id", "timestamp"}
        out.append((r["user_id"], r["history_item_ids"], r["target_item_id"], r["timestamp"]))
    return out


def catalog_of(directory: Path) -> list[tuple]:
    lines = (directory / "catalog.jsonl").read_text(encoding="utf-8").splitlines()
    return [(r["item_id"], r["raw_id"], r["title"]) for r in map(json.loads, lines)]


def stats_of(directory: Path) -> dict:
    return json.loads((directory / "stats.json").read_text(encoding="utf-8"))


def dir_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def write_d3(root: Path, cat: str, info: dict[str, str], splits: dict[str, list[tuple]]) -> Path:
    """D3/LatentR3 layout: info/<cat>.txt (title<TAB>id) and <split>/<cat>.csv with list literals."""
    (root / "info").mkdir(parents=True, exist_ok=True)
    (root / "info" / f"{cat}.txt").write_text("".join(f"{t}\t{i}\n" for i, t in info.items()), encoding="utf-8")
    for split, rows in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        with open(root / split / f"{cat}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(D3_HEADER)
            for user, hist, target, ts in rows:
                w.writerow([user, str([f"ASIN{h}" for h in hist]), f"ASIN{target}", str(hist), target,
                            str([info[str(h)] for h in hist]), info[str(target)], str([5.0] * len(hist)), 5.0,
                            str([ts - 1] * len(hist)), ts])
    return root


D3_INFO = {"0": "Alpha", "1": "Beta", "2": "Gamma", "3": '<span class="a-size-medium a-color-secondary">',
           "10": "Delta"}
D3_SPLITS = {
    "train": [("u1", [0, 1], 2, 100), ("u2", [1], 10, 101)],
    "valid": [("u1", [0, 1, 2], 10, 200), ("u3", [3], 1, 201), ("u2", [1, 10], 3, 202)],
    "test": [("u1", [0, 1, 2, 10], 1, 300)],
}


@pytest.fixture
def d3_dir(tmp_path: Path) -> Path:
    return write_d3(tmp_path / "d3", "Toys_5_2017-10-2018-11", D3_INFO, D3_SPLITS)


def save_npy_dict(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, obj, allow_pickle=True)  # a 0-d object array holding the dict, as DEALRec/TransRec do


# DEALRec-like time windows: user -> items per file (ids as in the files)
SEQ_TITLES = {"1": "A game", "2": "B game", "3": "title_3", "4": "D game", "5": "E game"}
SEQ_FILES = {
    "train": "1 1 2 4\n2 2\n3 5 1\n",
    "valid": "1 3 5\n2\n3 2\n",
    "test": "1 2 1\n2 4\n3\n",
}


def write_seq_windows(root: Path, titles_as: str = "npy") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, text in SEQ_FILES.items():
        (root / f"sequential_{split}.txt").write_text(text)
    if titles_as == "npy":
        save_npy_dict(root / "title_maps.npy", {
            "seqid2title": dict(SEQ_TITLES),
            "recid2title": {int(k) - 1: v for k, v in SEQ_TITLES.items()},
            "item2title": {f"ASIN{k}": v for k, v in SEQ_TITLES.items()},
        })
    else:
        (root / "derived").mkdir()
        with open(root / "derived" / "items.jsonl", "w") as f:
            for k, v in SEQ_TITLES.items():
                f.write(json.dumps({"seq_id": int(k), "rec_id": int(k) - 1, "asin": f"ASIN{k}", "title": v,
                                    "title_is_placeholder": v.startswith("title_"), "categories": []}) + "\n")
    return root


# --------------------------------------------------------------------------- d3-csv


def test_d3_csv_rows_catalog_and_stats(d3_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    raw = formats.read_d3_csv(d3_dir, ["train", "valid", "test"])
    assert raw.mode == "rows"
    assert raw.rows["valid"][1] == formats.RawRow("u3", ["3"], "1", 201)
    prepare(raw, out)
    # numbered from 1 in source-id order (numeric: 0, 1, 2, 10); the html item (3) is dropped
    assert catalog_of(out) == [(1, "0", "Alpha"), (2, "1", "Beta"), (3, "2", "Gamma"), (4, "10", "Delta")]
    assert rows_of(out, "train") == [("u1", [1, 2], 3, 100), ("u2", [2], 4, 101)]
    # u3's only history item is the html item -> empty history -> skipped; u2's target is the html item
    assert rows_of(out, "valid") == [("u1", [1, 2, 3], 4, 200)]
    assert rows_of(out, "test") == [("u1", [1, 2, 3, 4], 2, 300)]
    st = stats_of(out)
    assert st["skipped"] == {"valid_history_items_dropped": 1, "valid_rows_empty_history": 1,
                             "valid_rows_target_dropped": 1}
    assert st["raw"]["users"] == 3 and st["raw"]["items"] == 5 and st["raw"]["interactions"] == 6
    assert st["raw"]["catalog_items"] == 5
    assert st["raw"]["per_split"]["valid"] == {"rows": 3, "users": 3, "distinct_targets": 3, "items": 5}
    assert st["raw"]["per_split"]["test"] == {"rows": 1, "users": 1, "distinct_targets": 1, "items": 4}
    assert st["cleaning"]["found"]["html"] == 1 and st["cleaning"]["dropped_items"]["html"] == 1
    assert st["rows"] == {"train": 2, "valid": 1, "test": 1}
    assert st["cleaned"] == {"users": 2, "items_in_examples": 4, "catalog_items": 4, "examples": 4}
    assert st["options"]["split_mode"] == "rows"


def test_d3_csv_max_history_and_load_prepared(d3_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    prepare(formats.read_d3_csv(d3_dir, ["train", "valid", "test"]), out, PrepareOptions(max_history=2))
    assert rows_of(out, "test") == [("u1", [3, 4], 2, 300)]
    data = load_prepared(out)
    row = data.splits["test"][0]
    assert row["history_titles"] == ["Gamma", "Delta"] and row["target_title"] == "Beta"
    assert data.num_items == 4
    data1 = load_prepared(out, splits=["valid"], max_history=1)
    assert data1.splits["valid"][0]["history_item_ids"] == [3]


def test_d3_csv_catalogue_is_the_info_files_items_whichever_splits_are_read(d3_dir: Path, tmp_path: Path):
    """D3/BIGRec decode over every item of the info file: an item in no row read (here one in no row at all) is a
    candidate too, and the ids do not depend on --splits (from valid,test alone the train-only items were missing)."""
    info = next((d3_dir / "info").glob("*.txt"))
    info.write_text(info.read_text() + "Epsilon\t11\n")
    prepare(formats.read_d3_csv(d3_dir, ["train", "valid", "test"]), tmp_path / "all")
    prepare(formats.read_d3_csv(d3_dir, ["test"]), tmp_path / "test", splits=["test"])
    assert catalog_of(tmp_path / "all") == catalog_of(tmp_path / "test") == [
        (1, "0", "Alpha"), (2, "1", "Beta"), (3, "2", "Gamma"), (4, "10", "Delta"), (5, "11", "Epsilon")]
    assert rows_of(tmp_path / "test", "test") == rows_of(tmp_path / "all", "test")
    assert stats_of(tmp_path / "all")["cleaned"]["catalog_items"] == 5


def test_d3_csv_named_splits_and_missing_split(d3_dir: Path, tmp_path: Path):
    (d3_dir / "train" / "Toys_5_2017-10-2018-11.csv").unlink()
    with pytest.raises(FileNotFoundError, match="split 'train' is missing.*--splits"):
        formats.read_d3_csv(d3_dir, ["train", "valid", "test"])
    out = tmp_path / "out"
    prepare(formats.read_d3_csv(d3_dir, ["valid", "test"]), out, splits=["valid", "test"])
    assert sorted(p.name for p in out.iterdir()) == ["catalog.jsonl", "stats.json", "test.jsonl", "valid.jsonl"]


def test_d3_csv_category_choice(tmp_path: Path):
    root = write_d3(tmp_path / "d3", "Cat_A", {"1": "One", "2": "Two"}, {"test": [("u", [1], 2, 5)]})
    write_d3(root, "Cat_B", {"1": "Uno", "2": "Dos"}, {"test": [("v", [2], 1, 6)]})
    with pytest.raises(ValueError, match="several info files"):
        formats.read_d3_csv(root, ["test"])
    raw = formats.read_d3_csv(root, ["test"], category="Cat_B")
    assert raw.titles == {"1": "Uno", "2": "Dos"} and raw.rows["test"] == [formats.RawRow("v", ["2"], "1", 6)]
    with pytest.raises(FileNotFoundError, match="no info file"):
        formats.read_d3_csv(root, ["test"], category="Cat_C")


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.__setitem__(3, "[99]"), "history_item_id"),  # unknown item
        (lambda r: r.__setitem__(4, "abc"), "item_id"),  # non-numeric id
        (lambda r: r.__setitem__(3, "[0, 1"), "history_item_id"),  # bad list literal
        (lambda r: r.__setitem__(3, "5"), "history_item_id"),  # not a list
        (lambda r: r.__setitem__(5, "['A', 'B']"), "history_item_title"),  # length differs
        (lambda r: r.__setitem__(10, "1.5"), "timestamp"),
        (lambda r: r.__setitem__(3, "{[1]: 2}"), "history_item_id"),  # literal_eval raises TypeError here
    ],
)
def test_d3_csv_malformed_row_names_file_row_field(d3_dir: Path, mutate, field):
    path = d3_dir / "valid" / "Toys_5_2017-10-2018-11.csv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    mutate(rows[2])  # the second data row: line 3 of the file
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataFormatError) as e:
        formats.read_d3_csv(d3_dir, ["train", "valid", "test"])
    assert e.value.path == str(path) and e.value.row == 3 and e.value.field == field
    assert f"{path}, row 3, field '{field}'" in str(e.value)


def test_d3_csv_wrong_field_count_and_duplicate_info_id(d3_dir: Path):
    path = d3_dir / "test" / "Toys_5_2017-10-2018-11.csv"
    with open(path, "a") as f:
        f.write("u9,1,2\n")
    with pytest.raises(DataFormatError, match=r"row 3: 3 fields where the header has 11"):
        formats.read_d3_csv(d3_dir, ["test"])
    info = d3_dir / "info" / "Toys_5_2017-10-2018-11.txt"
    info.write_text(info.read_text() + "Again\t2\n")
    with pytest.raises(DataFormatError, match=r"row 6, field 'item_id': item id 2 appears twice"):
        formats.read_d3_csv(d3_dir, ["test"])


def test_d3_csv_user_ids_are_stripped_as_its_item_ids_are(tmp_path: Path):
    """d3-csv read its item ids as integers (surrounding spaces dropped) but kept its user ids as written: " u1"
    (after a ", " separator) was another user than "u1", in the prepared rows and in the user counts."""
    root = write_d3(tmp_path / "d3", "Cat", {"1": "One", "2": "Two", "3": "Three"},
                    {"train": [("u1", [1], 2, 5), (" u1", [1, 2], 3, 6), ("u2 ", [2], 3, 7)]})
    raw = formats.read_d3_csv(root, ["train"])
    assert [r.user for r in raw.rows["train"]] == ["u1", "u1", "u2"]
    out = tmp_path / "out"
    prepare(raw, out, splits=["train"])
    assert [r[0] for r in rows_of(out, "train")] == ["u1", "u1", "u2"]
    assert stats_of(out)["raw"]["users"] == 2


# --------------------------------------------------------------------------- seq-txt (time windows)


SEQ_TRAIN = [("1", [1], 2, None), ("1", [1, 2], 3, None), ("3", [4], 1, None)]
SEQ_VALID = [("1", [1, 2, 3], 4, None), ("3", [4, 1], 2, None)]
SEQ_TEST = [("1", [1, 2, 3, 4], 2, None), ("1", [1, 2, 3, 4, 2], 1, None), ("2", [2], 3, None)]


@pytest.mark.parametrize("titles_as", ["npy", "jsonl"])
def test_seq_txt_windows(tmp_path: Path, titles_as: str):
    src = write_seq_windows(tmp_path / "src", titles_as)
    out = tmp_path / "out"
    raw = formats.read_seq_txt(src)
    assert raw.mode == "windows" and raw.titles == SEQ_TITLES
    assert raw.sequences["1"] == {"train": [("1", None), ("2", None), ("4", None)],
                                  "valid": [("3", None), ("5", None)], "test": [("2", None), ("1", None)]}
    prepare(raw, out)
    # item 3 is a placeholder title -> dropped everywhere; the rest numbered 1.. in source-id order
    assert catalog_of(out) == [(1, "1", "A game"), (2, "2", "B game"), (3, "4", "D game"), (4, "5", "E game")]
    assert rows_of(out, "train") == SEQ_TRAIN
    assert rows_of(out, "valid") == SEQ_VALID
    assert rows_of(out, "test") == SEQ_TEST
    st = stats_of(out)
    # the placeholder-titled item's one valid interaction is counted as dropped
    assert st["skipped"] == {"train_rows_empty_history": 3, "valid_interactions_item_dropped": 1}
    assert st["raw"]["users"] == 3 and st["raw"]["items"] == 5 and st["raw"]["interactions"] == 12
    assert st["raw"]["per_split"] == {"train": {"users": 3, "items": 4, "interactions": 6},
                                      "valid": {"users": 2, "items": 3, "interactions": 3},
                                      "test": {"users": 2, "items": 3, "interactions": 3}}
    assert st["cleaning"]["found"]["placeholder"] == 1 and st["cleaning"]["dropped_items"]["placeholder"] == 1
    assert st["options"]["split_mode"] == "windows"


def test_seq_txt_npy_and_jsonl_titles_give_same_bytes(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    prepare(formats.read_seq_txt(write_seq_windows(tmp_path / "s1", "npy")), a)
    prepare(formats.read_seq_txt(write_seq_windows(tmp_path / "s2", "jsonl")), b)
    assert dir_bytes(a) == dir_bytes(b)
    # titles_from forces the source; a missing one is a clear FileNotFoundError
    with pytest.raises(FileNotFoundError, match="title map not found"):
        formats.read_seq_txt(tmp_path / "s2", titles_from="npy")
    with pytest.raises(FileNotFoundError, match="items.jsonl"):
        formats.read_seq_txt(tmp_path / "s1", titles_from="jsonl")


def test_seq_txt_eval_rows_first_and_max_history(tmp_path: Path):
    src = write_seq_windows(tmp_path / "src")
    out = tmp_path / "first"
    prepare(formats.read_seq_txt(src), out, PrepareOptions(eval_rows="first"))
    assert rows_of(out, "test") == [SEQ_TEST[0], SEQ_TEST[2]]
    assert rows_of(out, "valid") == SEQ_VALID
    assert stats_of(out)["skipped"] == {"test_rows_not_first": 1, "train_rows_empty_history": 3,
                                        "valid_interactions_item_dropped": 1}
    out2 = tmp_path / "h2"
    prepare(formats.read_seq_txt(src), out2, PrepareOptions(max_history=2))
    assert rows_of(out2, "valid") == [("1", [2, 3], 4, None), ("3", [4, 1], 2, None)]
    assert rows_of(out2, "test") == [("1", [3, 4], 2, None), ("1", [4, 2], 1, None), ("2", [2], 3, None)]
    with pytest.raises(ValueError, match="eval_rows"):
        prepare(formats.read_seq_txt(src), tmp_path / "bad", PrepareOptions(eval_rows="last"))


def test_seq_txt_splits_unknown_items_and_errors(tmp_path: Path):
    src = write_seq_windows(tmp_path / "src")
    (src / "sequential_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="split 'test' is missing"):
        formats.read_seq_txt(src)
    raw = formats.read_seq_txt(src, splits=["train", "valid"])
    out = tmp_path / "out"
    prepare(raw, out, splits=["train", "valid"])
    assert rows_of(out, "valid") == SEQ_VALID
    assert not (out / "test.jsonl").exists()
    # unknown item: an error by default (file, row, field), or skipped and counted
    (src / "sequential_valid.txt").write_text("1 3 5\n2 77\n3 2\n")
    with pytest.raises(DataFormatError) as e:
        formats.read_seq_txt(src, splits=["train", "valid"])
    assert (e.value.row, e.value.field) == (2, "item 1") and "77" in e.value.problem
    raw = formats.read_seq_txt(src, on_unknown="skip", splits=["train", "valid"])
    assert raw.skipped == {"unknown_item_interactions": 1}
    prepare(raw, out, splits=["train", "valid"])
    assert stats_of(out)["skipped"]["unknown_item_interactions"] == 1
    # a user twice in one file, a non-numeric item id
    (src / "sequential_valid.txt").write_text("1 3\n1 5\n")
    with pytest.raises(DataFormatError, match=r"row 2, field 'user_id': user 1 appears twice"):
        formats.read_seq_txt(src, splits=["train", "valid"])
    (src / "sequential_valid.txt").write_text("1 3 x5\n")
    with pytest.raises(DataFormatError, match=r"row 1, field 'item 2': expected an integer"):
        formats.read_seq_txt(src, splits=["train", "valid"])
    (src / "sequential_valid.txt").write_bytes(b"1 3\n2 \xff\xfe\n")
    with pytest.raises(DataFormatError, match=r"row 2: bytes that are not UTF-8"):
        formats.read_seq_txt(src, splits=["train", "valid"])


# --------------------------------------------------------------------------- seq-txt (leave-one-out)


LOO_TITLES = {"0": "Zero", "1": "One", "2": "Two", "3": "Three", "10": "Ten"}


def write_loo(root: Path, titles_as: str = "npy") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sequential_data.txt").write_text("1 0 1 2 3\n2 10 0\n3 3 2 10\n")
    if titles_as == "npy":
        save_npy_dict(root / "title_maps.npy", {"id2title": dict(LOO_TITLES)})
    else:
        (root / "derived").mkdir()
        (root / "derived" / "items.jsonl").write_text(
            "".join(json.dumps({"item_id": k, "title": v, "title_is_placeholder": False}) + "\n"
                    for k, v in LOO_TITLES.items()))
    return root


@pytest.mark.parametrize("titles_as", ["npy", "jsonl"])
def test_seq_txt_leave_one_out(tmp_path: Path, titles_as: str):
    out = tmp_path / "out"
    raw = formats.read_seq_txt(write_loo(tmp_path / "src", titles_as))
    assert raw.mode == "loo"
    prepare(raw, out)
    # item 0 occurs: ids are shifted so that it gets 1 (0 is padding)
    assert catalog_of(out) == [(1, "0", "Zero"), (2, "1", "One"), (3, "2", "Two"), (4, "3", "Three"),
                               (5, "10", "Ten")]
    assert rows_of(out, "train") == [("1", [1], 2, None), ("2", [5], 1, None)]
    assert rows_of(out, "valid") == [("1", [1, 2], 3, None), ("3", [4], 3, None)]
    assert rows_of(out, "test") == [("1", [1, 2, 3], 4, None), ("3", [4, 3], 5, None)]
    st = stats_of(out)
    assert st["skipped"] == {"train_rows_empty_history": 3, "users_too_short_for_leave_one_out": 1}
    assert (st["raw"]["users"], st["raw"]["items"], st["raw"]["interactions"]) == (3, 5, 9)
    assert st["options"]["split_mode"] == "loo"


# --------------------------------------------------------------------------- recbole


def test_recbole_typed_headers_and_stable_ties(tmp_path: Path):
    src = tmp_path / "ml"
    src.mkdir()
    (src / "ml.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\t5\t3\t300\n"
        "u1\t3\t4\t100\n"
        "u1\t7\t5\t200.0\n"  # tie with the next line: file order decides
        "u1\t2\t1\t200\n"
        "u2\t3\t4\t50\n"
        "u2\t5\t4\t50\n"
        "u2\t7\t4\t50\n"
    )
    (src / "ml.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "2\tTwo\t1995\tComedy\n3\tThree\t1996\tDrama\n5\tFive\t1997\tAction\n"
        "7\tSeven\t1998\tHorror\n9\tNine\t1999\tWar\n"
    )
    raw = formats.read_recbole(src)
    assert raw.sequences["u1"] == {"all": [("3", 100), ("7", 200), ("2", 200), ("5", 300)]}
    out = tmp_path / "out"
    prepare(raw, out)
    assert catalog_of(out) == [(1, "2", "Two"), (2, "3", "Three"), (3, "5", "Five"), (4, "7", "Seven")]
    assert rows_of(out, "train") == [("u1", [2], 4, 200)]
    assert rows_of(out, "valid") == [("u1", [2, 4], 1, 200), ("u2", [2], 3, 50)]
    assert rows_of(out, "test") == [("u1", [2, 4, 1], 3, 300), ("u2", [2, 3], 4, 50)]
    st = stats_of(out)
    assert st["raw"]["catalog_items"] == 5 and st["cleaned"]["catalog_items"] == 4
    assert st["skipped"] == {"train_rows_empty_history": 2}
    # same input again -> same bytes
    out2 = tmp_path / "out2"
    prepare(formats.read_recbole(src), out2)
    assert dir_bytes(out) == dir_bytes(out2)


def test_recbole_exact_repeats_are_dropped_and_counted(tmp_path: Path):
    # "u1 4 4" twice: the test target was the very event that ended its own history
    src = tmp_path / "ml"
    src.mkdir()
    (src / "ml.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                                  "u1\t1\t1\nu1\t2\t2\nu1\t3\t3\nu1\t4\t4\nu1\t4\t4\nu1\t2\t5\n")
    (src / "ml.item").write_text("item_id:token\ttitle:token_seq\n" + "".join(f"{k}\tT{k}\n" for k in range(1, 5)))
    raw = formats.read_recbole(src)
    # the repeat of 4 at t=4 goes, item 2 again at t=5 is another interaction and stays
    assert raw.sequences["u1"] == {"all": [("1", 1), ("2", 2), ("3", 3), ("4", 4), ("2", 5)]}
    assert raw.skipped == {"duplicate_interactions_dropped": 1}
    out = tmp_path / "out"
    prepare(raw, out)
    assert rows_of(out, "valid") == [("u1", [1, 2, 3], 4, 4)]
    assert rows_of(out, "test") == [("u1", [1, 2, 3, 4], 2, 5)]
    st = stats_of(out)
    assert st["skipped"]["duplicate_interactions_dropped"] == 1 and st["raw"]["interactions"] == 5


def test_recbole_errors(tmp_path: Path):
    src = tmp_path / "ml"
    src.mkdir()
    (src / "ml.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\t2\t1\nu1\t8\t2\n")
    with pytest.raises(FileNotFoundError, match="ml.item"):
        formats.read_recbole(src)
    (src / "ml.item").write_text("item_id:token\tname:token_seq\n2\tTwo\n")
    with pytest.raises(DataFormatError, match="no title column"):
        formats.read_recbole(src)
    (src / "ml.item").write_text("item_id:token\ttitle:token_seq\n2\tTwo\n")
    with pytest.raises(DataFormatError, match=r"ml.inter, row 3, field 'item_id': item 8 is not in ml.item"):
        formats.read_recbole(src)
    assert formats.read_recbole(src, on_unknown="skip").skipped == {"unknown_item_interactions": 1}
    (src / "ml.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\t2\tnoon\n")
    with pytest.raises(DataFormatError, match=r"row 2, field 'timestamp'"):
        formats.read_recbole(src)
    (src / "ml.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\t2\n")
    with pytest.raises(DataFormatError, match=r"row 2: 2 fields where the header has 3"):
        formats.read_recbole(src)
    (src / "ml.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\t2\t5\t9\n")  # one too many
    with pytest.raises(DataFormatError, match=r"row 2: 4 fields where the header has 3"):
        formats.read_recbole(src)
    (src / "ml.inter").write_text("user_id:token\titem_id:token\n")
    with pytest.raises(DataFormatError, match=r"row 1, field 'timestamp': missing column"):
        formats.read_recbole(src)


# --------------------------------------------------------------------------- generic csv


CSV_EVENTS = [("a", "i1", 1), ("a", "i2", 2), ("a", "i3", 3), ("b", "i1", 4), ("b", "i3", 5), ("a", "i4", 6),
              ("b", "i2", 7), ("c", "i2", 8), ("a", "i5", 9), ("b", "i4", 10)]


def write_generic(root: Path, events=CSV_EVENTS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "interactions.csv").write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in events))
    (root / "items.csv").write_text("item,title\n" + "".join(f'i{k},"Title {k}, vol. {k}"\n' for k in range(1, 6)))
    return root


def read_csv_dir(root: Path, **kw):
    return formats.read_generic_csv(root / "interactions.csv", root / "items.csv", **kw)


def test_generic_csv_leave_one_out(tmp_path: Path):
    root = write_generic(tmp_path / "src")
    out = tmp_path / "out"
    prepare(read_csv_dir(root, split="loo"), out)
    assert catalog_of(out) == [(k, f"i{k}", f"Title {k}, vol. {k}") for k in range(1, 6)]
    assert rows_of(out, "train") == [("a", [1], 2, 2), ("a", [1, 2], 3, 3), ("b", [1], 3, 5)]
    assert rows_of(out, "valid") == [("a", [1, 2, 3], 4, 6), ("b", [1, 3], 2, 7)]
    assert rows_of(out, "test") == [("a", [1, 2, 3, 4], 5, 9), ("b", [1, 3, 2], 4, 10)]
    assert stats_of(out)["skipped"] == {"train_rows_empty_history": 3, "users_too_short_for_leave_one_out": 1}


def test_generic_csv_time_split_by_ratio(tmp_path: Path):
    # 10 interactions at t=1..10: valid starts at the 80% quantile (t=9), test at the 90% one (t=10)
    out = tmp_path / "out"
    raw = read_csv_dir(write_generic(tmp_path / "src"), split="time")
    assert raw.mode == "windows"
    prepare(raw, out)
    assert rows_of(out, "train") == [("a", [1], 2, 2), ("a", [1, 2], 3, 3), ("a", [1, 2, 3], 4, 6),
                                     ("b", [1], 3, 5), ("b", [1, 3], 2, 7)]
    assert rows_of(out, "valid") == [("a", [1, 2, 3, 4], 5, 9)]
    assert rows_of(out, "test") == [("b", [1, 3, 2], 4, 10)]
    st = stats_of(out)
    assert st["skipped"] == {"train_rows_empty_history": 3}
    assert st["raw"]["per_split"]["valid"] == {"users": 1, "items": 1, "interactions": 1}


def test_time_split_ratios_are_checked_and_exact():
    from llmrec.data.formats import _events_to_sequences

    def counts(n: int, valid: float, test: float) -> tuple[int, int, int]:
        events = {"u": [(t, t, f"i{t}") for t in range(n)]}
        _, seqs = _events_to_sequences(events, "time", valid, test, None)
        return tuple(len(seqs["u"][k]) for k in ("train", "valid", "test"))

    assert counts(10, 0.1, 0.1) == (8, 1, 1)
    assert counts(30, 0.05, 0.05) == (27, 1, 2)  # 30 * 0.9 is 26.999999999999996 in floats: still 27 in train
    assert counts(10, 0.1, 0.0) == (9, 1, 0)  # a ratio of 0 leaves that split empty
    assert counts(10, 0.0, 0.0) == (10, 0, 0)
    for valid, test in ((0.6, 0.6), (-0.5, 0.1), (0.1, -0.1), (0.5, 0.5)):
        with pytest.raises(ValueError, match="each must be >= 0 and their sum < 1"):
            counts(10, valid, test)


def test_generic_csv_time_split_absolute_cutoffs(tmp_path: Path):
    root = write_generic(tmp_path / "src")
    out = tmp_path / "out"
    prepare(read_csv_dir(root, split="time", cutoffs=(5, 8)), out)
    assert rows_of(out, "train") == [("a", [1], 2, 2), ("a", [1, 2], 3, 3)]
    # histories include the earlier windows of the same user
    assert rows_of(out, "valid") == [("a", [1, 2, 3], 4, 6), ("b", [1], 3, 5), ("b", [1, 3], 2, 7)]
    assert rows_of(out, "test") == [("a", [1, 2, 3, 4], 5, 9), ("b", [1, 3, 2], 4, 10)]
    assert stats_of(out)["skipped"] == {"test_rows_empty_history": 1, "train_rows_empty_history": 2}
    out2 = tmp_path / "first"
    prepare(read_csv_dir(root, split="time", cutoffs=(5, 8)), out2, PrepareOptions(eval_rows="first"))
    assert rows_of(out2, "valid") == [("a", [1, 2, 3], 4, 6), ("b", [1], 3, 5)]
    assert stats_of(out2)["skipped"]["valid_rows_not_first"] == 1


def test_generic_csv_ties_keep_file_order(tmp_path: Path):
    root = write_generic(tmp_path / "src", [("u", "i3", 5), ("u", "i1", 5), ("u", "i2", 1), ("u", "i5", 5)])
    raw = read_csv_dir(root, split="loo")
    assert [it for it, _ in raw.sequences["u"]["all"]] == ["i2", "i3", "i1", "i5"]


def test_generic_csv_exact_repeats_are_dropped_and_counted(tmp_path: Path):
    events = [("d", "i1", 1), ("d", "i2", 2), ("d", "i3", 3), ("d", "i4", 4), ("d", "i4", 4),
              ("e", "i1", 7), ("e", "i2", 5), ("e", "i1", 7), ("e", "i1", 9)]  # e: a repeat that is not adjacent
    root = write_generic(tmp_path / "src", events)
    raw = read_csv_dir(root, split="loo")
    assert raw.skipped == {"duplicate_interactions_dropped": 2}
    assert raw.sequences["e"] == {"all": [("i2", 5), ("i1", 7), ("i1", 9)]}  # i1 at t=9 is another interaction
    out = tmp_path / "out"
    prepare(raw, out)
    # the test row of d used to be history [1, 2, 3, 4] -> target 4: the same event on both sides
    assert rows_of(out, "test") == [("d", [1, 2, 3], 4, 4), ("e", [2, 1], 1, 9)]
    assert stats_of(out)["skipped"]["duplicate_interactions_dropped"] == 2
    # a time split: the quantile cutoffs count each interaction once
    timed = read_csv_dir(root, split="time")
    assert timed.skipped == {"duplicate_interactions_dropped": 2}
    assert sum(len(w) for seq in timed.sequences.values() for w in seq.values()) == 7
    # no repeats: no key (as the other skip counts)
    assert read_csv_dir(write_generic(tmp_path / "clean"), split="loo").skipped == {}


def test_generic_csv_errors(tmp_path: Path):
    root = write_generic(tmp_path / "src", CSV_EVENTS + [("d", "i9", 11)])
    with pytest.raises(DataFormatError) as e:
        read_csv_dir(root)
    assert (e.value.row, e.value.field) == (12, "item") and "items.csv" in e.value.problem
    assert read_csv_dir(root, on_unknown="skip").skipped == {"unknown_item_interactions": 1}
    root = write_generic(tmp_path / "src2", [("a", "i1", "soon")])
    with pytest.raises(DataFormatError, match=r"interactions.csv, row 2, field 'timestamp'"):
        read_csv_dir(root)
    (root / "interactions.csv").write_text("user,item,time\na,i1,1\n")
    with pytest.raises(DataFormatError, match=r"row 2, field 'timestamp': missing column"):
        read_csv_dir(root)
    (root / "items.csv").write_text("item,title\ni1,One\ni1,Again\n")
    with pytest.raises(DataFormatError, match=r"items.csv, row 3, field 'item': item i1 appears twice"):
        read_csv_dir(root)
    with pytest.raises(ValueError, match="--split must be"):
        read_csv_dir(write_generic(tmp_path / "src3"), split="random")
    with pytest.raises(FileNotFoundError, match="input file not found"):
        formats.read_generic_csv(tmp_path / "nope.csv", tmp_path / "src3" / "items.csv")


def test_csv_fields_longer_than_the_csv_modules_default_limit_are_read(tmp_path: Path):
    """A field over csv's default limit (131072 characters; a long item description) was refused as "bad CSV".
    It is read, in both CSV formats, and the csv module's process-wide limit is left as it was."""
    long = "Long title " * 20_000  # 220,000 characters
    root = write_generic(tmp_path / "src")
    (root / "items.csv").write_text("item,title\n" + "".join(
        f'i{k},"{long if k == 2 else f"Title {k}"}"\n' for k in range(1, 6)))
    limit = csv.field_size_limit()
    assert limit < len(long)
    assert read_csv_dir(root).titles["i2"] == long
    d3 = write_d3(tmp_path / "d3", "Cat", {"1": "One", "2": long}, {"test": [("u", [1], 2, 5)]})
    assert formats.read_d3_csv(d3, ["test"]).titles["2"] == long  # its item_title column holds the long title
    assert csv.field_size_limit() == limit


# --------------------------------------------------------------------------- amazon2023


AMZ23_META = [{"parent_asin": "B1", "title": "Game One"}, {"parent_asin": "B2", "title": "Game Two"},
              {"parent_asin": "B3", "title": "Game Three"}]
AMZ23_REVIEWS = [("u1", "B1", 5.0, 1000), ("u1", "B2", 4.0, 2000), ("u1", "B9", 5.0, 2500),
                 ("u1", "B3", 2.0, 3000), ("u2", "B2", 5.0, 1500), ("u2", "B3", 5.0, 2500),
                 ("u2", "B1", 1.0, 3500), ("u1", "B1", 5.0, 4000)]


def write_amazon2023(root: Path, gz: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    reviews = "".join(json.dumps({"user_id": u, "parent_asin": a, "asin": a + "x", "rating": r, "timestamp": t,
                                  "text": "ok"}) + "\n" for u, a, r, t in AMZ23_REVIEWS)
    meta = "".join(json.dumps(m) + "\n" for m in AMZ23_META)
    for name, text in [("Video_Games.jsonl", reviews), ("meta_Video_Games.jsonl", meta)]:
        if gz:
            with gzip.open(root / f"{name}.gz", "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            (root / name).write_text(text)
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_amazon2023(tmp_path: Path, gz: bool):
    src = write_amazon2023(tmp_path / "src", gz)
    out = tmp_path / "out"
    prepare(formats.read_amazon2023(src, "Video_Games", split="loo"), out)
    assert catalog_of(out) == [(1, "B1", "Game One"), (2, "B2", "Game Two"), (3, "B3", "Game Three")]
    assert rows_of(out, "train") == [("u1", [1], 2, 2000)]
    assert rows_of(out, "valid") == [("u1", [1, 2], 3, 3000), ("u2", [2], 3, 2500)]
    assert rows_of(out, "test") == [("u1", [1, 2, 3], 1, 4000), ("u2", [2, 3], 1, 3500)]
    assert stats_of(out)["skipped"] == {"train_rows_empty_history": 2, "unknown_item_interactions": 1}
    out2 = tmp_path / "rated"
    prepare(formats.read_amazon2023(src, "Video_Games", split="loo", min_rating=3), out2)
    assert rows_of(out2, "train") == [("u2", [2], 3, 2500)]
    assert rows_of(out2, "valid") == [("u1", [1], 2, 2000)]
    assert rows_of(out2, "test") == [("u1", [1, 2], 1, 4000)]
    assert stats_of(out2)["skipped"] == {"below_min_rating": 2, "train_rows_empty_history": 2,
                                         "unknown_item_interactions": 1, "users_too_short_for_leave_one_out": 1}
    with pytest.raises(DataFormatError, match="parent_asin.*no metadata"):
        formats.read_amazon2023(src, "Video_Games", on_unknown="error")


def test_amazon2023_exact_repeats_are_dropped_and_counted(tmp_path: Path):
    root = tmp_path / "amz"
    root.mkdir()
    reviews = [("u1", "B1", 1000), ("u1", "B2", 2000), ("u1", "B3", 3000), ("u1", "B3", 3000), ("u1", "B3", 3500)]
    (root / "VG.jsonl").write_text("".join(json.dumps({"user_id": u, "parent_asin": a, "rating": 5.0, "timestamp": t})
                                           + "\n" for u, a, t in reviews))
    (root / "meta_VG.jsonl").write_text("".join(json.dumps(m) + "\n" for m in AMZ23_META))
    raw = formats.read_amazon2023(root, "VG", split="loo")
    assert raw.sequences["u1"] == {"all": [("B1", 1000), ("B2", 2000), ("B3", 3000), ("B3", 3500)]}
    assert raw.skipped == {"duplicate_interactions_dropped": 1}


def test_amazon2023_time_split(tmp_path: Path):
    src = write_amazon2023(tmp_path / "src", gz=False)
    raw = formats.read_amazon2023(src, "Video_Games", split="time", cutoffs=(2000, 3000))
    assert raw.sequences["u1"] == {"train": [("B1", 1000)], "valid": [("B2", 2000)],
                                   "test": [("B3", 3000), ("B1", 4000)]}
    assert raw.sequences["u2"] == {"train": [("B2", 1500)], "valid": [("B3", 2500)], "test": [("B1", 3500)]}
    # every user's first interaction is in train: no train example is left
    with pytest.raises(ValueError, match=r"split 'train' has no examples after cleaning \(format amazon2023, "
                                         r"category Video_Games; skipped: .*\)"):
        prepare(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    prepare(raw, tmp_path / "out", splits=["valid", "test"])
    assert rows_of(tmp_path / "out", "valid") == [("u1", [1], 2, 2000), ("u2", [2], 3, 2500)]
    assert rows_of(tmp_path / "out", "test") == [("u1", [1, 2], 3, 3000), ("u1", [1, 2, 3], 1, 4000),
                                                 ("u2", [2, 3], 1, 3500)]
    with pytest.raises(FileNotFoundError, match=r"none of Books.jsonl \(or .gz\) found"):
        formats.read_amazon2023(src, "Books")


# --------------------------------------------------------------------------- amazon2018 (D3 protocol)


DAY, HOUR = 86400, 3600
BASE = int(datetime(2018, 1, 1, tzinfo=timezone.utc).timestamp())  # well inside 2017-10 .. 2018-11
OLD = int(datetime(2016, 6, 15, tzinfo=timezone.utc).timestamp())
FUTURE = int(datetime(2019, 2, 1, tzinfo=timezone.utc).timestamp())
CORE_USERS = [f"U{u}" for u in range(1, 6)]


def amazon2018_data() -> tuple[list[dict], list[dict]]:
    """5 users x 12 items (A01..A12) inside the window, plus items every filter must remove."""
    reviews = []

    def rev(user, asin, ts):
        reviews.append({"reviewerID": user, "asin": asin, "unixReviewTime": ts, "overall": 5.0})

    for u in range(1, 6):
        for k in range(1, 13):
            rev(f"U{u}", f"A{k:02d}", BASE + k * 10 * DAY + u * HOUR)
    for u in range(1, 6):  # 5 reviews each, but removed by the title filter or the time window
        for j, asin in enumerate(["H01", "X01", "N01", "W01"]):
            rev(f"U{u}", asin, BASE + (200 + j) * DAY + u * HOUR)
        rev(f"U{u}", "O01", OLD + u * HOUR)
        rev(f"U{u}", "F01", FUTURE + u * HOUR)
    # cascade: G01 has 4 reviews -> dropped; then U6 has 4 -> dropped (needs iterating the 5-core)
    for k in range(1, 5):
        rev("U6", f"A{k:02d}", BASE + k * 10 * DAY + 6 * HOUR)
    for u in (1, 2, 3, 6):
        rev(f"U{u}", "G01", BASE + 150 * DAY + u * HOUR)
    meta = [{"asin": f"A{k:02d}", "title": f"Game {k}"} for k in range(3, 13)]
    meta += [{"asin": "A01", "title": "  &quot;Halo&quot;  "}, {"asin": "A02", "title": "Tetris &amp; Co"},
             {"asin": "H01", "title": '<span id="productTitle">Junk</span>'}, {"asin": "X01", "title": "X"},
             {"asin": "N01", "brand": "none"}, {"asin": "W01", "title": " ".join(["word"] * 21)},
             {"asin": "O01", "title": "Old Game"}, {"asin": "F01", "title": "Future Game"},
             {"asin": "G01", "title": "Gadget"}]
    return reviews, meta


def write_amazon2018(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    reviews, meta = amazon2018_data()
    with gzip.open(root / "Toys_5.json.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in reviews)
    (root / "meta_Toys.json").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return root


def test_amazon2018_d3_protocol(tmp_path: Path):
    src = write_amazon2018(tmp_path / "src")
    raw = formats.read_amazon2018(src, "Toys", min_items=1)
    assert raw.source["window"] == "2017-10-2018-11"
    assert raw.source["raw_reviews"] == 98 and raw.source["raw_meta_items"] == 19
    out = tmp_path / "out"
    prepare(raw, out)
    titles = {k: f"Game {k}" for k in range(3, 13)} | {1: "Halo", 2: "Tetris & Co"}
    assert catalog_of(out) == [(k, f"A{k:02d}", titles[k]) for k in range(1, 13)]
    # one sample per position >= 1, history = previous <= 10 items; all samples sorted by target time
    # (item k of user u at BASE + 10k days + u hours) and cut 80/10/10: 55 samples -> 44 / 5 / 6
    ordered = [(f"U{u}", list(range(max(1, k - 10), k)), k, BASE + k * 10 * DAY + u * HOUR)
               for k in range(2, 13) for u in range(1, 6)]
    assert rows_of(out, "train") == ordered[:44]
    assert rows_of(out, "valid") == ordered[44:49]
    assert rows_of(out, "test") == ordered[49:]
    assert [(r[0], r[2]) for r in ordered[44:49]] == [("U5", 10), ("U1", 11), ("U2", 11), ("U3", 11), ("U4", 11)]
    assert rows_of(out, "test")[-1] == ("U5", [2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 12, BASE + 120 * DAY + 5 * HOUR)
    assert max(len(r[1]) for split in ("train", "valid", "test") for r in rows_of(out, split)) == 10
    st = stats_of(out)
    assert st["rows"] == {"train": 44, "valid": 5, "test": 6}
    # every one of the 98 raw reviews is in the 60 kept or counted: O01/F01 outside the window, H01/X01/N01/W01
    # without a usable title, U6 and G01 removed by the 5-core (these were not counted)
    assert st["skipped"] == {"reviews_outside_window": 10, "reviews_item_without_usable_title": 20, "reviews_removed_by_kcore": 8}
    assert st["raw"]["users"] == 5 and st["raw"]["items"] == 12 and st["raw"]["catalog_items"] == 12


def test_amazon2018_follows_d3_at_ties_titles_and_the_window_end(tmp_path: Path):
    """Review: rows of the same day were ordered by user id, D3 orders them by the user's first review in the file
    (which decides the rows at the split points); the title filter unescaped every entity and counted words with
    split() where D3 replaces &quot;/&amp; only and counts split(" "); a review at the end's midnight was dropped."""
    assert formats._d3_clean_title("Sid Meier&#39;s Civilization IV") == "Sid Meier&#39;s Civilization IV"
    assert formats._d3_clean_title(' &quot;Tetris&quot; &amp; Co ') == "Tetris\" & Co"
    nineteen = "A  " + " ".join(["w"] * 18)  # 19 words and a double space: 20 items in split(" ")
    assert formats._d3_clean_title(nineteen) == nineteen and formats._d3_clean_title(nineteen + " w") is None
    src = tmp_path / "src"
    src.mkdir()
    end = int(datetime(2018, 11, 1, tzinfo=timezone.utc).timestamp())
    reviews = []
    for u in ("Z", "M", "A"):  # file order Z, M, A: every user's reviews on the same days
        reviews += [{"reviewerID": u, "asin": f"B{k}", "unixReviewTime": BASE + k * DAY} for k in range(1, 6)]
    reviews.append({"reviewerID": "Z", "asin": "B1", "unixReviewTime": end})  # at the end's midnight: kept
    (src / "Toys_5.json").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    (src / "meta_Toys.json").write_text("".join(json.dumps({"asin": f"B{k}", "title": f"Game {k}"}) + "\n"
                                                for k in range(1, 6)))
    raw = formats.read_amazon2018(src, "Toys", min_items=1, kcore=1)
    rows = [(r.user, r.target) for split in ("train", "valid", "test") for r in raw.rows[split]]
    assert rows[:3] == [("Z", "B2"), ("M", "B2"), ("A", "B2")]  # first-appearance order among same-day rows
    assert rows[-1] == ("Z", "B1") and raw.rows["test"][-1].timestamp == end


def test_amazon2018_keeps_exact_repeats_as_d3_and_counts_them(tmp_path: Path):
    """D3's process.py keeps a review repeated exactly (the LatentR3 CDs data has rows whose target is the last
    history item's very review): the protocol's rows keep it, stats.json counts it."""
    src = write_amazon2018(tmp_path / "src")
    with gzip.open(src / "Toys_5.json.gz", "at", encoding="utf-8") as f:
        f.write(json.dumps({"reviewerID": "U1", "asin": "A12", "unixReviewTime": BASE + 120 * DAY + HOUR}) + "\n")
    raw = formats.read_amazon2018(src, "Toys", min_items=1)
    assert raw.skipped == {"duplicate_interactions_kept": 1, **{"reviews_outside_window": 10, "reviews_item_without_usable_title": 20, "reviews_removed_by_kcore": 8}}
    last = [r for r in raw.rows["test"] if r.user == "U1"][-1]
    assert (last.history[-1], last.target, last.timestamp) == ("A12", "A12", BASE + 120 * DAY + HOUR)
    assert sum(len(rows) for rows in raw.rows.values()) == 56
    assert "duplicate_interactions_kept" not in formats.read_amazon2018(write_amazon2018(tmp_path / "clean"), "Toys",
                                                                        min_items=1).skipped


def test_amazon2018_max_history(tmp_path: Path):
    src = write_amazon2018(tmp_path / "src")
    longest = {h: max(len(r.history) for rows in formats.read_amazon2018(src, "Toys", min_items=1, max_history=h)
                      .rows.values() for r in rows) for h in (3, 10, 0)}
    assert longest == {3: 3, 10: 10, 0: 11}  # 0 = all (it used to give every row an empty history)
    with pytest.raises(ValueError, match="max_history must be >= 0"):
        formats.read_amazon2018(src, "Toys", min_items=1, max_history=-1)


@pytest.mark.skipif(not hasattr(__import__("time"), "tzset"), reason="needs time.tzset (POSIX)")
def test_amazon2018_window_does_not_depend_on_the_machine_time_zone(tmp_path: Path, monkeypatch):
    """Month boundaries are UTC: a review stamped at midnight UTC on the window's first day is in, wherever this
    runs (in local time, UTC-7 put that day before the window's start)."""
    import time

    src = write_amazon2018(tmp_path / "src")
    reviews = gzip.open(src / "Toys_5.json.gz", "rt").read().splitlines()
    first_day = 1506816000  # 2017-10-01 00:00 UTC
    edge = [json.dumps({"reviewerID": "U7", "asin": f"A{k:02d}", "unixReviewTime": first_day + (k - 3) * DAY})
            for k in range(3, 9)]
    with gzip.open(src / "Toys_5.json.gz", "wt", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in reviews + edge)
    rows = []
    for tz in ("UTC", "America/Los_Angeles", "Asia/Shanghai"):
        monkeypatch.setenv("TZ", tz)
        time.tzset()
        rows.append(formats.read_amazon2018(src, "Toys", min_items=1).rows)
    monkeypatch.delenv("TZ")
    time.tzset()
    assert rows[0] == rows[1] == rows[2]
    u7 = [r for split in rows[0].values() for r in split if r.user == "U7"]
    assert len(u7) == 5  # all six reviews of U7 kept, the one on the first day too


def test_amazon2018_widens_window_back(tmp_path: Path):
    src = write_amazon2018(tmp_path / "src")
    raw = formats.read_amazon2018(src, "Toys", min_items=13)
    # 12 items in 2017-10..2018-11; moving the start back 3 months at a time reaches O01 (2016-06-15)
    assert raw.source["window"] == "2016-4-2018-11"
    assert raw.titles.get("O01") == "Old Game" and len(raw.titles) == 13
    assert "F01" not in raw.titles and "G01" not in raw.titles


def test_amazon2018_missing_field(tmp_path: Path):
    src = write_amazon2018(tmp_path / "src")
    with gzip.open(src / "Toys_5.json.gz", "at", encoding="utf-8") as f:
        f.write(json.dumps({"reviewerID": "U1", "asin": "A01"}) + "\n")
    with pytest.raises(DataFormatError, match=r"row 99, field 'unixReviewTime': missing"):
        formats.read_amazon2018(src, "Toys", min_items=1)


# --------------------------------------------------------------------------- determinism and atomicity


def test_prepare_is_deterministic(d3_dir: Path, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    prepare(formats.read_d3_csv(d3_dir, ["train", "valid", "test"]), a)
    prepare(formats.read_d3_csv(d3_dir, ["train", "valid", "test"]), b)
    first = dir_bytes(a)
    assert first == dir_bytes(b)
    # preparing again into the same directory replaces it with the same bytes
    prepare(formats.read_d3_csv(d3_dir, ["train", "valid", "test"]), a)
    assert dir_bytes(a) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "d3"]


def test_prepare_deterministic_amazon2018(tmp_path: Path):
    src = write_amazon2018(tmp_path / "src")
    prepare(formats.read_amazon2018(src, "Toys", min_items=1), tmp_path / "a")
    prepare(formats.read_amazon2018(src, "Toys", min_items=1), tmp_path / "b")
    assert dir_bytes(tmp_path / "a") == dir_bytes(tmp_path / "b")


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_failing_prepare_leaves_nothing(d3_dir: Path, tmp_path: Path, monkeypatch):
    import llmrec.data.prepare as prep

    raw = formats.read_d3_csv(d3_dir, ["train", "valid", "test"])
    real = prep.write_jsonl
    calls = []

    def failing(path, rows):
        calls.append(path)
        if len(calls) == 2:  # train.jsonl written, valid.jsonl fails half-way
            real(path, list(rows)[:0])
            raise OSError("disk full")
        return real(path, rows)

    monkeypatch.setattr(prep, "write_jsonl", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        prepare(raw, out)
    assert not out.exists() and _leftovers(tmp_path) == []
    # an existing output directory is untouched by a failing run
    monkeypatch.setattr(prep, "write_jsonl", real)
    prepare(raw, out)
    before = dir_bytes(out)
    calls.clear()
    monkeypatch.setattr(prep, "write_jsonl", failing)
    with pytest.raises(OSError):
        prepare(formats.read_seq_txt(write_seq_windows(tmp_path / "seq")), out)
    assert dir_bytes(out) == before and _leftovers(tmp_path) == []


def test_malformed_input_writes_nothing(d3_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    prepare(formats.read_d3_csv(d3_dir, ["train", "valid", "test"]), out)
    before = dir_bytes(out)
    path = d3_dir / "test" / "Toys_5_2017-10-2018-11.csv"
    path.write_text(path.read_text() + 'u9,[],x,"[0, 1",1,[],x,[],5,[],7\n')
    with pytest.raises(DataFormatError):
        prepare(formats.read_d3_csv(d3_dir, ["train", "valid", "test"]), out)
    assert dir_bytes(out) == before and _leftovers(tmp_path) == []


def test_atomic_directory_replaces_and_cleans(tmp_path: Path):
    final = tmp_path / "final"
    with atomic_directory(final) as tmp:
        (tmp / "x").write_text("1")
    assert (final / "x").read_text() == "1"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final) as tmp:
            (tmp / "x").write_text("2")
            raise KeyboardInterrupt
    assert (final / "x").read_text() == "1" and _leftovers(tmp_path) == []
    with atomic_directory(final) as tmp:
        (tmp / "y").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["y"] and _leftovers(tmp_path) == []


def test_atomic_directory_puts_the_old_output_back_when_the_new_one_cannot_take_its_place(tmp_path: Path,
                                                                                        monkeypatch):
    final = tmp_path / "final"
    with atomic_directory(final) as tmp:
        (tmp / "x").write_text("1")
    real_replace = os.replace

    def replace_failing_into_final(src, dst):
        if Path(dst) == final and ".tmp-" in str(src):  # the new output only; putting the old one back works
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_into_final)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_directory(final) as tmp:
            (tmp / "x").write_text("2")
    # the old output was left moved aside (".final.old-*") and the new one in its temporary directory
    assert (final / "x").read_text() == "1" and _leftovers(tmp_path) == []


def test_atomic_outputs_get_the_permissions_of_a_plain_write(tmp_path: Path):
    # tempfile makes files 0600 and directories 0700: a prepared dataset or a results file written through it
    # was unreadable by anyone else on a shared machine. They now get what open()/mkdir() give under the umask.
    import os
    import stat

    from llmrec.data.canonical import atomic_write_text

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "prepared") as tmp:
            atomic_write_text(tmp / "stats.json", "{}")
        atomic_write_text(tmp_path / "results.json", "{}")
        os.umask(0o027)
        atomic_write_text(tmp_path / "private.json", "{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "prepared") == 0o755
    assert mode(tmp_path / "prepared" / "stats.json") == 0o644
    assert mode(tmp_path / "results.json") == 0o644
    assert mode(tmp_path / "private.json") == 0o640


def test_atomic_directory_removes_what_killed_runs_left(tmp_path: Path):
    # A SIGKILLed prepare leaves its full-size temporary (or moved-aside) copy; the next run removes those of
    # dead processes, and never another live process's.
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    final = tmp_path / "final"
    left = [tmp_path / f".final.tmp-{dead_pid}-abc", tmp_path / f".final.old-{dead_pid}"]
    live = tmp_path / f".final.tmp-{os.getppid()}-xyz"  # a process that is alive (this test's parent)
    for d in left + [live]:
        d.mkdir()
        (d / "train.jsonl").write_text("{}\n")
    with atomic_directory(final) as tmp:
        (tmp / "x").write_text("1")
    assert not any(d.exists() for d in left) and live.exists()


def test_duplicate_titles_are_judged_among_the_items_used(tmp_path: Path):
    """Item 9 shares item 1's title but never occurs: duplicate=drop dropped item 1 (and its interactions)."""
    from llmrec.data.catalog import TitlePolicy

    titles = {"1": "Halo", "2": "Tetris", "3": "Zelda", "4": "Mario", "9": "Halo", "5": "Pong"}
    seqs = {"u1": {"all": [(str(k), k) for k in range(1, 6)]}}
    raw = formats.RawData(titles=titles, mode="loo", sequences=seqs)
    drop = PrepareOptions(title_policy=TitlePolicy.parse("duplicate=drop"))
    out = tmp_path / "out"
    stats = prepare(raw, out, drop)
    assert catalog_of(out) == [(1, "1", "Halo"), (2, "2", "Tetris"), (3, "3", "Zelda"), (4, "4", "Mario"),
                               (5, "5", "Pong")]
    assert rows_of(out, "test") == [("u1", [1, 2, 3, 4], 5, 5)]
    assert stats["cleaning"]["found"]["duplicate"] == 0 and stats["cleaning"]["items_sharing_a_title"] == 0
    assert stats["raw"]["catalog_items"] == 6 and "interactions_item_dropped" not in stats["skipped"]
    # two items that both occur and share a title are still duplicates, and both go with duplicate=drop
    seqs["u1"]["all"].append(("9", 6))
    stats = prepare(formats.RawData(titles=titles, mode="loo", sequences=seqs), out, drop)
    assert [c[1] for c in catalog_of(out)] == ["2", "3", "4", "5"]
    assert stats["cleaning"]["found"]["duplicate"] == 1 and stats["cleaning"]["dropped_items"]["duplicate"] == 2
    assert stats["skipped"]["interactions_item_dropped"] == 2


def test_prepare_errors_without_items(tmp_path: Path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "sequential_data.txt").write_text("1 1 2 3\n")
    save_npy_dict(root / "title_maps.npy", {"id2title": {"1": "title_1", "2": "", "3": None}})
    # where the items went (it blamed the title cleaning whatever emptied the data; a review)
    with pytest.raises(ValueError, match=r"no items left, nothing to prepare \(format seq-txt\): 3 items occur in the "
                                         r"rows read, 0 of them with a usable title; skipped while reading: nothing"):
        prepare(formats.read_seq_txt(root), tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- restricted unpickler


class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def test_unsafe_pickle_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "PWNED"
    evil = _Evil()
    evil.marker = str(marker)
    path = tmp_path / "title_maps.npy"
    arr = np.empty(1, dtype=object)
    arr[0] = evil
    np.save(path, arr, allow_pickle=True)
    with pytest.raises(UnsafePickleError) as e:
        load_npy_restricted(path)
    assert str(path) in str(e.value) and "system" in str(e.value)
    assert not marker.exists()
    # through the reader too: a title map is never unpickled blindly
    (tmp_path / "sequential_data.txt").write_text("1 1 2 3\n")
    with pytest.raises(UnsafePickleError, match="title_maps.npy"):
        formats.read_seq_txt(tmp_path)
    assert not marker.exists()
    # a dict holding the payload (as a title) is refused as well
    np.save(path, {"id2title": {"1": _EvalEvil()}}, allow_pickle=True)
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_npy_restricted(path)


def test_safe_npy_loads_plain_data(tmp_path: Path):
    p = tmp_path / "m.npy"
    obj = {"seqid2title": {"1": "A", "2": "B"}, "recid2title": {0: "A", 1: "B"}, "n": [1.5, None, True]}
    np.save(p, obj, allow_pickle=True)
    assert load_npy_restricted(p) == obj
    arr = np.arange(6, dtype=np.int64).reshape(2, 3)
    np.save(p, arr)
    assert np.array_equal(load_npy_restricted(p), arr)
    objs = np.array(["x", 3, None], dtype=object)
    np.save(p, objs, allow_pickle=True)
    assert list(load_npy_restricted(p)) == ["x", 3, None]
    # not a .npy / truncated pickle -> ValueError naming the file
    (tmp_path / "bad.npy").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="bad.npy: not a .npy file"):
        load_npy_restricted(tmp_path / "bad.npy")
    np.save(p, obj, allow_pickle=True)
    (tmp_path / "trunc.npy").write_bytes(p.read_bytes()[:-20])
    with pytest.raises(ValueError, match="trunc.npy: cannot read the pickled array"):
        load_npy_restricted(tmp_path / "trunc.npy")


def test_title_map_with_wrong_shape(tmp_path: Path):
    (tmp_path / "sequential_data.txt").write_text("1 1 2 3\n")
    save_npy_dict(tmp_path / "title_maps.npy", {"other": {}})
    with pytest.raises(DataFormatError, match="no 'seqid2title' or 'id2title'"):
        formats.read_seq_txt(tmp_path)
    np.save(tmp_path / "title_maps.npy", np.array(["a", "b"], dtype=object), allow_pickle=True)
    with pytest.raises(DataFormatError, match="expected a pickled dict"):
        formats.read_seq_txt(tmp_path)


# --------------------------------------------------------------------------- regressions found by the fuzz tests


def test_damaged_gzip_is_a_data_format_error(tmp_path: Path):
    src = write_amazon2023(tmp_path / "src", gz=True)
    gz = src / "Video_Games.jsonl.gz"
    gz.write_bytes(gz.read_bytes()[:-12])  # truncated: no end-of-stream marker
    with pytest.raises(DataFormatError, match=r"Video_Games.jsonl.gz, row \d+: cannot read the file \(EOFError"):
        formats.read_amazon2023(src, "Video_Games")
    gz.write_bytes(b"not gzip at all\n")
    with pytest.raises(DataFormatError, match=r"row 1: cannot read the file \(BadGzipFile"):
        formats.read_amazon2023(src, "Video_Games")


def test_amazon2023_bad_rating(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "V.jsonl").write_text(json.dumps({"user_id": "u", "parent_asin": "B1", "rating": "five",
                                             "timestamp": 1}) + "\n")
    (src / "meta_V.jsonl").write_text(json.dumps({"parent_asin": "B1", "title": "T"}) + "\n")
    with pytest.raises(DataFormatError, match=r"V.jsonl, row 1, field 'rating': expected a finite number, got \"five\""):
        formats.read_amazon2023(src, "V", min_rating=3)
    # NaN passed every threshold (the row was kept) and `true` read as 1.0; null, as before, is refused too.
    for rating in ("null", "NaN", '"nan"', "true", "Infinity"):
        (src / "V.jsonl").write_text(f'{{"user_id": "u", "parent_asin": "B1", "rating": {rating}, "timestamp": 1}}\n')
        with pytest.raises(DataFormatError, match="field 'rating': expected a finite number"):
            formats.read_amazon2023(src, "V", min_rating=3)
    (src / "V.jsonl").write_text(json.dumps({"user_id": "u", "parent_asin": "B1", "rating": "4.0",
                                             "timestamp": 1}) + "\n")
    assert formats.read_amazon2023(src, "V", min_rating=3).skipped == {}  # a number as text: read as before


def test_a_title_with_an_unpaired_surrogate_is_named(tmp_path: Path):
    """`"\\ud83c"` is valid JSON but not Unicode text: prepare failed with a bare UnicodeEncodeError naming no file,
    line or field, and so did loading a catalogue holding one."""
    from llmrec.data.canonical import load_prepared

    src = write_loo(tmp_path / "src", "jsonl")
    items = src / "derived" / "items.jsonl"
    lines = items.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"title": "One"', '"title": "One \\ud83c"')
    items.write_text("".join(lines))
    with pytest.raises(DataFormatError, match=r"items\.jsonl, row 2, field 'title': an unpaired UTF-16 surrogate"):
        formats.read_seq_txt(src)
    out = tmp_path / "out"
    prepare(formats.read_seq_txt(write_loo(tmp_path / "ok", "jsonl")), out)
    catalog = out / "catalog.jsonl"
    rows = catalog.read_text().splitlines(keepends=True)
    rows[0] = rows[0].replace('"Zero"', '"Zero \\udc00"')
    catalog.write_text("".join(rows))
    with pytest.raises(DataFormatError, match=r"catalog\.jsonl, row 1, field 'title': an unpaired UTF-16 surrogate"):
        load_prepared(out)


def test_items_jsonl_line_that_is_not_an_object(tmp_path: Path):
    src = write_loo(tmp_path / "src", "jsonl")
    items = src / "derived" / "items.jsonl"
    items.write_text(items.read_text() + "3\n")
    with pytest.raises(DataFormatError, match=r"items.jsonl, row 6: expected a JSON object"):
        formats.read_seq_txt(src)


def test_bad_npy_files_give_value_errors_naming_the_file(tmp_path: Path):
    (tmp_path / "sequential_data.txt").write_text("1 1 2 3\n")
    save_npy_dict(tmp_path / "title_maps.npy", {"id2title": ["not", "a", "dict"]})
    with pytest.raises(DataFormatError, match=r"title_maps.npy, field 'id2title': expected a dict, got list"):
        formats.read_seq_txt(tmp_path)
    # a header numpy cannot tokenize (it raised tokenize.TokenError before)
    good = (tmp_path / "title_maps.npy").read_bytes()
    broken = good.replace(b"'shape': (), }", b"'shape': (), }}", 1)
    assert broken != good
    (tmp_path / "title_maps.npy").write_bytes(broken)
    with pytest.raises(ValueError, match=r"title_maps.npy: not a .npy file"):
        formats.read_seq_txt(tmp_path)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.arange(100, dtype=np.int64))
    plain.write_bytes(plain.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"plain.npy: cannot read the array"):
        load_npy_restricted(plain)


def test_integer_fields_are_exact_and_conflicting_titles_are_errors(tmp_path: Path):
    from llmrec.data.formats import _int, _set_title

    f = tmp_path / "x.csv"
    assert _int("1700000000123456789", f, 1, "ts") == 1700000000123456789  # a float would round it
    assert _int(1700000000123456789, f, 1, "ts") == 1700000000123456789
    assert _int("12", f, 1, "ts") == _int(12.0, f, 1, "ts") == _int(" 12.0", f, 1, "ts") == 12
    for bad in ("1.5", "x", None, True):
        with pytest.raises(DataFormatError, match="expected an integer"):
            _int(bad, f, 3, "ts")
    titles: dict = {}
    _set_title(titles, "7", "Halo", f, 1, "item_id")
    _set_title(titles, "7", "Halo", f, 2, "item_id")  # the same title again: harmless
    with pytest.raises(DataFormatError, match=r"x.csv.*row 3.*item_id.*item 7 appears twice with different titles"):
        _set_title(titles, "7", "Tetris", f, 3, "item_id")


def test_integer_fields_take_integer_syntax_only(tmp_path: Path):
    """Integer fields went through float(): "1_000" became 1000 and "12345678901234567e3" was rounded."""
    from llmrec.data.formats import _int

    f = tmp_path / "x.csv"
    assert _int("+7", f, 1, "ts") == 7 and _int("-7", f, 1, "ts") == -7
    assert _int("1.0", f, 1, "ts") == _int("1.00", f, 1, "ts") == 1  # a zero fraction: files written through floats
    assert _int("12345678901234567000", f, 1, "ts") == 12345678901234567000
    assert _int(2.0**53, f, 1, "ts") == 2**53
    for bad in ("1_000", "12345678901234567e3", "1e3", "1.2e1", "0x10", "١٢", "1.", ".0", "1.05", "", 2.0**60):
        with pytest.raises(DataFormatError, match=r"row 3, field 'ts': expected an integer"):
            _int(bad, f, 3, "ts")
    # through a reader: the row, not a silently changed timestamp
    root = write_generic(tmp_path / "src", [("a", "i1", 1), ("a", "i2", "1_000")])
    with pytest.raises(DataFormatError, match=r"interactions.csv, row 3, field 'timestamp': expected an integer, "
                                              r"got '1_000'"):
        read_csv_dir(root)


def test_eval_rows_first_never_lets_a_later_interaction_stand_in(tmp_path: Path):
    """A user whose first valid interaction has no history (nothing before it) has no valid row under
    eval_rows=first: the second valid interaction, whose history holds a valid-period item, is not used."""
    raw = formats.RawData(titles={"a": "A game", "b": "B game", "c": "C game"}, mode="windows",
                          sequences={"u": {"train": [], "valid": [("a", 1), ("b", 2)], "test": [("c", 3)]},
                                     "v": {"train": [("a", 1), ("c", 2)], "valid": [("b", 3)], "test": [("c", 4)]}})
    out = tmp_path / "first"
    prepare(raw, out, PrepareOptions(eval_rows="first"))
    assert rows_of(out, "valid") == [("v", [1, 3], 2, 3)]
    assert rows_of(out, "test") == [("u", [1, 2], 3, 3), ("v", [1, 3, 2], 3, 4)]
    assert stats_of(out)["skipped"] == {"train_rows_empty_history": 1, "valid_rows_empty_history": 1,
                                        "valid_rows_not_first": 1}


def test_eval_rows_first_is_refused_where_it_would_be_ignored(tmp_path: Path):
    """Leave-one-out gives one valid/test row per user whatever eval_rows says, and fixed rows are taken as they
    are: eval_rows=first there was silently ignored (while stats.json recorded it)."""
    raw = formats.RawData(titles={"a": "A game", "b": "B game", "c": "C game", "d": "D game"}, mode="loo",
                          sequences={"u": {"all": [("a", 1), ("b", 2), ("c", 3), ("d", 4)]}})
    with pytest.raises(ValueError, match="eval_rows 'first' applies to time-window splits .*'loo'"):
        prepare(raw, tmp_path / "out", PrepareOptions(eval_rows="first"))
    assert not (tmp_path / "out").exists()
    prepare(raw, tmp_path / "out", PrepareOptions(eval_rows="all"))
