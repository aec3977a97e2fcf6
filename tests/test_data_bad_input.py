"""Bad input to the readers and to a prepared directory: a DataFormatError naming the file, the 1-based LINE
and the field -- never a merged id, a silently changed value, or a bare TypeError / ArrowTypeError /
UnicodeDecodeError / JSONDecodeError. Tiny hand-written files only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmrec.cli import main
from llmrec.data import formats
from llmrec.data.canonical import DataFormatError, load_prepared
from llmrec.data.catalog import ItemCatalog, TitlePolicy
from llmrec.data.prepare import PrepareOptions, prepare


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def err_of(fn) -> str:
    with pytest.raises(DataFormatError) as e:
        fn()
    return str(e.value)


# --------------------------------------------------------------------------- raw readers: missing / empty ids


def write_amazon2023(root: Path, reviews: list[dict], meta: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "VG.jsonl").write_text(jsonl(reviews))
    (root / "meta_VG.jsonl").write_text(jsonl(meta))
    return root


AMZ_META = [{"parent_asin": "B1", "title": "One"}, {"parent_asin": "B2", "title": "Two"}]


def amz_review(user, item, ts: int) -> dict:
    return {"user_id": user, "parent_asin": item, "timestamp": ts, "rating": 5}


@pytest.mark.parametrize("where, value, field", [("review", "user_id", "user_id"), ("review", "parent_asin", "parent_asin"),
                                                  ("meta", "parent_asin", "parent_asin")])
def test_amazon2023_null_id_is_an_error_not_the_id_none(tmp_path: Path, where, value, field):
    reviews = [amz_review("u1", "B1", 1), amz_review("u1", "B2", 2), amz_review("u2", "B1", 3)]
    meta = [dict(m) for m in AMZ_META]
    if where == "review":
        reviews[2][value] = None  # str(None) made every such row the user (item) "None"
    else:
        meta[1][value] = None
    src = write_amazon2023(tmp_path / "a", reviews, meta)
    name = "VG.jsonl" if where == "review" else "meta_VG.jsonl"
    line = 3 if where == "review" else 2
    msg = err_of(lambda: formats.read_amazon2023(src, "VG", split="loo"))
    assert msg.startswith(f"{src / name}, row {line}, field '{field}'") and "null" in msg


def test_amazon2023_review_giving_a_key_twice_is_an_error(tmp_path: Path):
    src = write_amazon2023(tmp_path / "a", [amz_review("u1", "B1", 1), amz_review("u1", "B2", 2)], AMZ_META)
    lines = (src / "VG.jsonl").read_text().splitlines()
    (src / "VG.jsonl").write_text(lines[0] + "\n" + lines[1][:-1] + ', "parent_asin": "B1"}\n')
    msg = err_of(lambda: formats.read_amazon2023(src, "VG", split="loo"))
    assert msg == f"{src / 'VG.jsonl'}, row 2, field 'parent_asin': given twice in one JSON object (which value is meant?)"
    # a repeat inside a nested object no reader reads (an item's details) is not the record's field: left alone
    (src / "VG.jsonl").write_text(jsonl([amz_review("u1", "B1", 1), amz_review("u1", "B2", 2)]))
    meta = (src / "meta_VG.jsonl").read_text().splitlines()
    (src / "meta_VG.jsonl").write_text(meta[0][:-1] + ', "details": {"Brand": "A", "Brand": "B"}}\n' + meta[1] + "\n")
    assert formats.read_amazon2023(src, "VG", split="loo").titles == {"B1": "One", "B2": "Two"}


def write_amazon2018(root: Path, reviews: list[dict], meta: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "VG.json").write_text(jsonl(reviews))
    (root / "meta_VG.json").write_text(jsonl(meta))
    return root


def test_amazon2018_null_ids_and_conflicting_meta_titles(tmp_path: Path):
    reviews = [{"reviewerID": "U1", "asin": "A1", "unixReviewTime": 1}, {"reviewerID": None, "asin": "A1",
                                                                         "unixReviewTime": 2}]
    src = write_amazon2018(tmp_path / "a", reviews, [{"asin": "A1", "title": "Game"}])
    assert err_of(lambda: formats.read_amazon2018(src, "VG", min_items=1)).startswith(
        f"{src / 'VG.json'}, row 2, field 'reviewerID'")
    # the same asin twice with another title: the last one wins, as in D3's process.py (the protocol), and
    # the conflict is counted in stats.json's skips (it used to pass silently)
    meta = [{"asin": "A1", "title": "Game"}, {"asin": "A2", "title": "Other"}, {"asin": "A1", "title": "Not Game"}]
    src = write_amazon2018(tmp_path / "b", reviews[:1], meta)
    raw = formats.read_amazon2018(src, "VG", min_items=1)
    assert raw.skipped == {"meta_asin_title_conflicts_last_kept": 1, "reviews_removed_by_kcore": 1}  # 1 review < 5
    # the same record twice (real meta files repeat some) is harmless
    src = write_amazon2018(tmp_path / "c", reviews[:1], meta[:2] + meta[:1])
    same = formats.read_amazon2018(src, "VG", min_items=1)
    assert same.source["raw_meta_items"] == 2 and same.skipped == {"reviews_removed_by_kcore": 1}  # no conflict
    # An entry with an unusable title (none, or too short) drops the asin for good, as D3's removal list does,
    # whether a usable entry comes before or after it; of two usable titles the last wins.
    five = [{"reviewerID": f"U{u}", "asin": a, "unixReviewTime": 10 * u + k}
            for u in range(5) for k, a in enumerate(("A1", "A2", "A3", "A4", "A5"))]
    meta = [{"asin": "A1"}, {"asin": "A1", "title": "Titled Later"}, {"asin": "A2", "title": "Titled First"},
            {"asin": "A2", "title": "x"}, {"asin": "A3", "title": "Old"}, {"asin": "A3", "title": "New"},
            {"asin": "A4", "title": "Four"}, {"asin": "A5", "title": "Five"}]
    src = write_amazon2018(tmp_path / "d", five, meta)
    raw = formats.read_amazon2018(src, "VG", min_items=1, kcore=1)
    assert raw.titles == {"A3": "New", "A4": "Four", "A5": "Five"}
    assert raw.skipped["meta_asin_dropped_for_an_unusable_entry"] == 2
    assert raw.skipped["reviews_item_without_usable_title"] == 10


def test_recbole_empty_user_id_is_an_error_like_csv(tmp_path: Path):
    src = tmp_path / "rb"
    src.mkdir()
    (src / "x.item").write_text("item_id:token\ttitle:token_seq\n1\tOne\n2\tTwo\n")
    (src / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\t1\t1\n\n \t2\t2\n")
    assert err_of(lambda: formats.read_recbole(src)) == f"{src / 'x.inter'}, row 4, field 'user_id': empty id"
    (src / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\t1\t1\n")
    (src / "x.item").write_text("item_id:token\ttitle:token_seq\n1\tOne\n\tNo id\n")
    assert err_of(lambda: formats.read_recbole(src)) == f"{src / 'x.item'}, row 3, field 'item_id': empty id"


def test_recbole_files_with_cr_line_endings_are_named_as_such(tmp_path: Path):
    """"\r"-only files were read as one line: "column named more than once in the header" (a review)."""
    src = tmp_path / "rb"
    src.mkdir()
    (src / "x.item").write_bytes(b"item_id:token\ttitle:token_seq\r1\tOne\r2\tTwo\r")
    (src / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\t1\t1\nu1\t2\t2\n")
    assert err_of(lambda: formats.read_recbole(src)) == (
        f"{src / 'x.item'}, row 1: a line break inside the line (a file with \\r line endings?): "
        "lines must end with \\n or \\r\\n")
    (src / "x.item").write_bytes(b"item_id:token\ttitle:token_seq\r\n1\tOne\r\n2\tTwo\r\n")  # \r\n is fine
    assert formats.read_recbole(src).titles == {"1": "One", "2": "Two"}


# --------------------------------------------------------------------------- raw CSV: quotes, BOM


def write_csv(root: Path, items: str, interactions: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "items.csv").write_bytes(items.encode("utf-8"))
    (root / "interactions.csv").write_bytes(interactions.encode("utf-8"))
    return root


INTERACTIONS = "user,item,timestamp\n" + "".join(f"u{u},{i},{10 * u + i}\n" for u in (1, 2) for i in (1, 2, 3))


def test_unclosed_quote_in_items_csv_is_blamed_on_its_line(tmp_path: Path):
    # line 4 opens a quote that line 6 closes: three records used to become one item whose id has newlines,
    # and the error then blamed interactions.csv
    items = 'item,title\n1,One\n2,Two\n"99,Unclosed title\n3,Three\n4",Four\n'
    src = write_csv(tmp_path / "c", items, INTERACTIONS)
    msg = err_of(lambda: formats.read_generic_csv(src / "interactions.csv", src / "items.csv"))
    assert msg.startswith(f"{src / 'items.csv'}, row 4, field 'item': id '99,Unclosed title\\n3,Three")
    assert "line break" in msg
    # merged up to a quote that text follows (strict parsing): the line it starts on, and where it ends
    (src / "items.csv").write_text('item,title\n1,One\n2,Two\n"99,Unclosed title\n3,Three\n4,"Four"\n')
    assert err_of(lambda: formats.read_generic_csv(src / "interactions.csv", src / "items.csv")) == (
        f"{src / 'items.csv'}, row 4: bad CSV (',' expected after '\"'; the record runs to line 6: an unclosed quote?)")
    # merged into a record of the wrong width: the line it starts on, and where it ends
    (src / "items.csv").write_text('item,title\n1,One\n2,Two\n"99,Unclosed title\n3,Three\n4",Four,x\n')
    assert err_of(lambda: formats.read_generic_csv(src / "interactions.csv", src / "items.csv")) == (
        f"{src / 'items.csv'}, row 4: 3 fields where the header has 2 (the record runs to line 6: an unclosed quote?)")


def test_unclosed_quote_in_the_last_column_is_an_error_not_one_long_title(tmp_path: Path):
    # the lenient parser made '2,"Tetris' swallow the rest of the file: one item titled "Tetris\n3,Zelda\n4,Mario",
    # items 3 and 4 gone without a word
    inter = "user,item,timestamp\nu1,1,1\nu1,2,2\nu1,1,3\n"
    src = write_csv(tmp_path / "c", 'item,title\n1,Halo\n2,"Tetris\n3,Zelda\n4,Mario\n', inter)
    assert err_of(lambda: formats.read_generic_csv(src / "interactions.csv", src / "items.csv")) == (
        f"{src / 'items.csv'}, row 3: bad CSV (unexpected end of data; the record runs to line 5: an unclosed quote?)")
    # a quote closed in the middle of a field, text after it: was read as "Tetris" plus the rest, silently
    (src / "items.csv").write_text('item,title\n1,Halo\n2,"Tet"ris\n')
    assert err_of(lambda: formats.read_generic_csv(src / "interactions.csv", src / "items.csv")) == (
        f"{src / 'items.csv'}, row 3: bad CSV (',' expected after '\"')")
    # a quoted title that spans lines and is closed stays a title
    (src / "items.csv").write_text('item,title\n1,Halo\n2,"Tetris\nDeluxe"\n')
    raw = formats.read_generic_csv(src / "interactions.csv", src / "items.csv")
    assert raw.titles == {"1": "Halo", "2": "Tetris\nDeluxe"}


def test_csv_record_lines_count_blank_lines_and_multiline_titles(tmp_path: Path):
    items = 'item,title\n1,"One,\nwith a newline"\n\n2,Two\n3,Three\n'
    bad = "user,item,timestamp\nu1,1,1\n\n\nu1,2,x\n"
    src = write_csv(tmp_path / "c", items, bad)
    assert err_of(lambda: formats.read_generic_csv(src / "interactions.csv", src / "items.csv")).startswith(
        f"{src / 'interactions.csv'}, row 5, field 'timestamp'")
    (src / "items.csv").write_text(items + "3,Three again\n")  # the 5th record, on line 7
    assert "row 7, field 'item': item 3 appears twice" in err_of(
        lambda: formats.read_generic_csv(src / "interactions.csv", src / "items.csv"))


def test_csv_column_named_twice_is_an_error(tmp_path: Path):
    # A dict row kept the last of the two: the timestamps silently came from the second column.
    src = write_csv(tmp_path / "c", "item,title\n1,One\n2,Two\n3,Three\n",
                    "user,item,timestamp,timestamp\n" + "".join(f"u{u},{i},{i},0\n" for u in (1, 2) for i in (1, 2, 3)))
    assert err_of(lambda: formats.read_generic_csv(src / "interactions.csv", src / "items.csv")) == (
        f"{src / 'interactions.csv'}, row 1, field 'timestamp': column named more than once in the header: timestamp")


def test_utf8_bom_at_the_start_of_a_csv_is_ignored(tmp_path: Path):
    src = write_csv(tmp_path / "c", "\ufeffitem,title\n1,One\n2,Two\n3,Three\n", "\ufeff" + INTERACTIONS)
    raw = formats.read_generic_csv(src / "interactions.csv", src / "items.csv")
    assert sorted(raw.titles) == ["1", "2", "3"] and sorted(raw.sequences) == ["u1", "u2"]


# --------------------------------------------------------------------------- prepared directory


CATALOG = [{"item_id": k, "raw_id": f"r{k}", "title": f"Title {k}"} for k in (1, 2, 3)]
ROWS = [{"user_id": "u1", "history_item_ids": [1, 2], "target_item_id": 3, "timestamp": 30},
        {"user_id": "u2", "history_item_ids": [2], "target_item_id": 1, "timestamp": None}]


def write_prepared(root: Path, rows_text: str | None = None, catalog_text: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "catalog.jsonl").write_text(jsonl(CATALOG) if catalog_text is None else catalog_text)
    (root / "test.jsonl").write_text(jsonl(ROWS) if rows_text is None else rows_text)
    (root / "stats.json").write_text('{"rows": {"test": 2}}\n')
    return root


def test_a_good_prepared_dir_loads(tmp_path: Path):
    data = load_prepared(write_prepared(tmp_path / "d"))
    assert data.splits["test"]["timestamp"] == [30, None] and data.stats == {"rows": {"test": 2}}


def bad_row(**change) -> str:
    return jsonl([ROWS[0], {**ROWS[1], **change}])  # the changed row is line 2


@pytest.mark.parametrize("text, where", [
    (jsonl(ROWS[:1]) + "5\n", "row 2: expected a JSON object, got 5"),
    (jsonl(ROWS[:1]) + "null\n", "row 2: expected a JSON object, got null"),
    (bad_row(history_item_ids=[True]), "row 2, field 'history_item_ids': expected an integer item id, got true"),
    (bad_row(target_item_id=True), "row 2, field 'target_item_id': expected an integer item id, got true"),
    (bad_row(timestamp=1.5), "row 2, field 'timestamp': expected an integer or null, got 1.5"),
    (bad_row(timestamp="abc"), "row 2, field 'timestamp': expected an integer or null, got \"abc\""),
    (bad_row(user_id=None), "row 2, field 'user_id': expected a string or integer id, got null"),
    (bad_row(user_id=""), "row 2, field 'user_id': empty id"),
    # json.loads keeps the last of a key given twice: the row read as target 1, silently (a review)
    (jsonl(ROWS[:1]) + json.dumps(ROWS[1])[:-1] + ', "target_item_id": 1}\n',
     "row 2, field 'target_item_id': given twice in one JSON object (which value is meant?)"),
])
def test_bad_split_rows_name_file_line_field(tmp_path: Path, text: str, where: str):
    d = write_prepared(tmp_path / "d", rows_text=text)
    assert err_of(lambda: load_prepared(d)) == f"{d / 'test.jsonl'}, {where}"


def test_split_errors_give_the_file_line_not_the_record_number(tmp_path: Path):
    # blank lines are skipped but still lines: the bad id is on line 5, in the second record
    rows = jsonl(ROWS[:1]) + "\n  \n\n" + jsonl([{**ROWS[1], "history_item_ids": [9]}])
    d = write_prepared(tmp_path / "d", rows_text=rows)
    assert err_of(lambda: load_prepared(d)).startswith(f"{d / 'test.jsonl'}, row 5, field 'history_item_ids': item 9")


@pytest.mark.parametrize("change, where", [
    ({"title": 12}, "row 2, field 'title': expected a string, got 12"),
    ({"title": None}, "row 2, field 'title': expected a string, got null"),
    ({"title": " "}, "row 2, field 'title': empty title"),
    ({"raw_id": "r1"}, "row 2, field 'raw_id': raw id 'r1' is also on line 1"),
    ({"raw_id": None}, "row 2, field 'raw_id': expected a string or integer id, got null"),
])
def test_bad_catalogue_rows_name_file_line_field(tmp_path: Path, change: dict, where: str):
    cat = jsonl([CATALOG[0], {**CATALOG[1], **change}, CATALOG[2]])
    d = write_prepared(tmp_path / "d", catalog_text=cat)
    assert err_of(lambda: load_prepared(d)).startswith(f"{d / 'catalog.jsonl'}, {where}")


def test_catalogue_ids_stay_contiguous_across_blank_lines(tmp_path: Path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n" + jsonl(CATALOG[:1]) + "\n" + jsonl(CATALOG[1:]))
    assert ItemCatalog.load(p).titles == ["Title 1", "Title 2", "Title 3"]
    p.write_text(jsonl([{**CATALOG[0], "item_id": True}]))  # True == 1 in Python
    assert err_of(lambda: ItemCatalog.load(p)) == f"{p}, row 1, field 'item_id': expected 1 (ids must be contiguous from 1)"
    p.write_text("\n" + jsonl(CATALOG[:1]) + "7\n")
    assert err_of(lambda: ItemCatalog.load(p)) == f"{p}, row 3: expected a JSON object, got 7"


def test_non_utf8_split_and_damaged_stats_name_the_file(tmp_path: Path, capsys):
    d = write_prepared(tmp_path / "d")
    (d / "test.jsonl").write_bytes(jsonl(ROWS).encode() + b'{"user_id": "\xff"}\n')
    assert err_of(lambda: load_prepared(d)).startswith(f"{d / 'test.jsonl'}, row 3: bytes that are not UTF-8")
    d = write_prepared(tmp_path / "e")
    (d / "stats.json").write_text('{\n  "rows": {"te')
    assert err_of(lambda: load_prepared(d)).startswith(f"{d / 'stats.json'}, row 2: not valid JSON")
    assert main(["data", "stats", str(d)]) == 1
    assert f"{d / 'stats.json'}, row 2: not valid JSON" in capsys.readouterr().err
    (d / "stats.json").write_text("[1]\n")
    assert err_of(lambda: load_prepared(d)) == f"{d / 'stats.json'}: expected a JSON object, got [1]"


# --------------------------------------------------------------------------- prepare options


def test_prepare_refuses_empty_titles_kept_and_negative_max_history(tmp_path: Path):
    inter = "user,item,timestamp\n" + "".join(f"u1,{i},{i}\n" for i in (1, 2, 3, 4, 5))
    src = write_csv(tmp_path / "c", "item,title\n1,One\n2,\n3,Three\n4,Four\n5,Five\n", inter)
    raw = formats.read_generic_csv(src / "interactions.csv", src / "items.csv")
    # kept, item 2 would get the title "" that load_prepared rejects
    with pytest.raises(ValueError, match="empty=keep is not allowed"):
        prepare(raw, tmp_path / "out", PrepareOptions(title_policy=TitlePolicy.parse("empty=keep")))
    with pytest.raises(ValueError, match="max_history must be >= 0"):
        prepare(raw, tmp_path / "out", PrepareOptions(max_history=-5))
    assert not (tmp_path / "out").exists()
    stats = prepare(raw, tmp_path / "out")  # the default drops item 2 and counts it
    assert stats["cleaning"]["dropped_items"]["empty"] == 1
    assert load_prepared(tmp_path / "out").num_items == 4


def test_cli_rejects_negative_max_history(tmp_path: Path, capsys):
    src = write_csv(tmp_path / "c", "item,title\n1,One\n2,Two\n3,Three\n", INTERACTIONS)
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", "--format", "csv", "--input", str(src), "--output", str(tmp_path / "o"),
              "--max-history", "-5"])
    assert e.value.code == 2
    assert "argument --max-history: must be >= 0 (0 = all), got -5" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", [0, -1])
def test_load_prepared_refuses_a_history_cap_below_one(prepared_dir, bad):
    # 0 and -1 used to mean "the whole history" without a word; None is the one way to ask for it.
    with pytest.raises(ValueError, match="max_history must be"):
        load_prepared(prepared_dir, max_history=bad)
    assert all(len(h) == 1 for h in load_prepared(prepared_dir, max_history=1).splits["test"]["history_item_ids"])


# --------------------------------------------------------------------------- review: titles that are not strings


def test_json_titles_that_are_not_strings_are_errors(tmp_path: Path):
    # str() made the list ["A", "B"] the title "['A', 'B']" and 5 the title "5", silently
    reviews = [amz_review("u1", "B1", 1), amz_review("u1", "B2", 2)]
    for k, (title, shown) in enumerate(((["A", "B"], '["A", "B"]'), (5, "5"), ({"t": 1}, '{"t": 1}'))):
        src = write_amazon2023(tmp_path / f"a{k}", reviews, [AMZ_META[0], {"parent_asin": "B2", "title": title}])
        assert err_of(lambda src=src: formats.read_amazon2023(src, "VG", split="loo")) == (
            f"{src / 'meta_VG.jsonl'}, row 2, field 'title': expected a string or null, got {shown}")
    src = tmp_path / "seq"
    (src / "derived").mkdir(parents=True)
    (src / "derived" / "items.jsonl").write_text(jsonl([{"seq_id": 1, "title": "A"}, {"seq_id": 2, "title": 7}]))
    assert err_of(lambda: formats.read_seq_titles(src, "jsonl")) == (
        f"{src / 'derived' / 'items.jsonl'}, row 2, field 'title': expected a string or null, got 7")
    # null is a missing title: kept as None, then dropped and counted as "empty" by prepare (as before)
    (src / "derived" / "items.jsonl").write_text(jsonl([{"seq_id": 1, "title": "A"}, {"seq_id": 2, "title": None}]))
    assert formats.read_seq_titles(src, "jsonl") == {"1": "A", "2": None}


def test_npy_titles_that_are_not_strings_are_errors_and_nan_is_missing(tmp_path: Path):
    import numpy as np

    src = tmp_path / "seq"
    src.mkdir()
    (src / "sequential_data.txt").write_text("1 1 2 3 4 1 3 1\n")
    npy = src / "title_maps.npy"
    # NaN (pandas' missing value) became the title "nan", and bytes the title "b'C'"
    np.save(npy, {"seqid2title": {"1": "A", "2": float("nan"), "3": "C", "4": None}}, allow_pickle=True)
    assert formats.read_seq_titles(src, "npy") == {"1": "A", "2": None, "3": "C", "4": None}
    stats = prepare(formats.read_seq_txt(src), tmp_path / "out")
    assert stats["cleaning"]["dropped_items"]["empty"] == 2
    assert [json.loads(x)["title"] for x in (tmp_path / "out" / "catalog.jsonl").read_text().splitlines()] == ["A", "C"]
    np.save(npy, {"seqid2title": {"1": "A", "2": b"C"}}, allow_pickle=True)
    assert err_of(lambda: formats.read_seq_titles(src, "npy")) == (
        f"{npy}, field 'seqid2title': the title of item '2' is bytes, not a string")
    # keys 1 and "1" are one id once made strings: the second title silently replaced the first
    np.save(npy, {"seqid2title": {1: "A", "1": "Other", "2": "B"}}, allow_pickle=True)
    assert err_of(lambda: formats.read_seq_titles(src, "npy")) == (
        f"{npy}, field 'seqid2title': item 1 appears twice with different titles ('A', 'Other')")


# --------------------------------------------------------------------------- review: rows and ids


def test_recbole_item_row_with_extra_fields_is_an_error(tmp_path: Path):
    # a tab inside a title split it: the title was silently cut to its first part ("Two")
    src = tmp_path / "rb"
    src.mkdir()
    (src / "x.item").write_text("item_id:token\ttitle:token_seq\tyear:token\n1\tOne\t1990\n2\tTwo\tPart\t1991\n")
    (src / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\t1\t1\nu1\t2\t2\n")
    assert err_of(lambda: formats.read_recbole(src)) == f"{src / 'x.item'}, row 3: 4 fields where the header has 3"
    (src / "x.item").write_text("item_id:token\ttitle:token_seq\tyear:token\n1\tOne\t1990\n2\tTwo\n")
    assert err_of(lambda: formats.read_recbole(src)) == f"{src / 'x.item'}, row 3: 2 fields where the header has 3"


def test_seq_txt_user_ids_are_compared_as_integers(tmp_path: Path):
    # "1.0" passed the integer check but stayed its own user: user 1's valid row lost its train history
    src = tmp_path / "seq"
    src.mkdir()
    (src / "derived").mkdir()
    (src / "derived" / "items.jsonl").write_text(jsonl([{"seq_id": k, "title": f"T{k}"} for k in (1, 2, 3, 4)]))
    (src / "sequential_train.txt").write_text("1 1 2\n2 3 4\n")
    (src / "sequential_valid.txt").write_text("1.0 3\n2 1\n")
    (src / "sequential_test.txt").write_text("01 4\n2 2\n")
    raw = formats.read_seq_txt(src)
    assert raw.sequences["1"] == {"train": [("1", None), ("2", None)], "valid": [("3", None)], "test": [("4", None)]}
    assert sorted(raw.sequences) == ["1", "2"]
    (src / "sequential_train.txt").write_text("1 1 2\n2 3 4\n01 3\n")
    assert err_of(lambda: formats.read_seq_txt(src)) == (
        f"{src / 'sequential_train.txt'}, row 3, field 'user_id': user 1 appears twice")


def test_d3_info_ids_are_compared_as_integers_and_category_may_be_a_prefix(tmp_path: Path):
    root = tmp_path / "d3"
    (root / "info").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "info" / "Toys_5_2017.txt").write_text("One\t01\nTwo\t2\n")
    (root / "test" / "Toys_5_2017.csv").write_text('user_id,history_item_id,item_id,timestamp\nu1,"[1]",2,5\n')
    # the info id "01" and the row's 1 are one item (rows were already read as integers): it used to be
    # "item 1 is not in Toys_5_2017.txt"
    raw = formats.read_d3_csv(root, ["test"])
    assert raw.titles == {"1": "One", "2": "Two"} and raw.rows["test"] == [formats.RawRow("u1", ["1"], "2", 5)]
    # --category picks the info file by prefix; the split files are named after that file, not the prefix
    # (it used to look for test/Toys.csv and report the split missing)
    assert formats.read_d3_csv(root, ["test"], category="Toys").rows == raw.rows
    (root / "info" / "Toys_5_2017.txt").write_text("One\t01\nTwo\t2\nUno\t1\n")
    assert err_of(lambda: formats.read_d3_csv(root, ["test"])) == (
        f"{root / 'info' / 'Toys_5_2017.txt'}, row 3, field 'item_id': item id 1 appears twice")


# --------------------------------------------------------------------------- review: an --output that exists


def test_output_that_is_not_a_prepared_directory_is_refused(tmp_path: Path, capsys):
    # items seen again later (not exact repeats of an interaction, which are dropped)
    inter = "user,item,timestamp\n" + "".join(f"u{u},{i},{10 * u + k}\n" for u in (1, 2)
                                              for k, i in enumerate((1, 2, 3, 1, 2)))
    src = write_csv(tmp_path / "c", "item,title\n1,One\n2,Two\n3,Three\n", inter)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    # --output = --input (or a folder holding it, or any other folder): it was replaced as a whole, which
    # deleted the raw files
    for out in (src, tmp_path):
        assert main(["data", "prepare", "--format", "csv", "--input", str(src), "--output", str(out)]) == 1
        assert "exists and is not a prepared directory" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    # a file: it was replaced by the directory, and a moved-aside copy ".afile.old-<pid>" was left behind
    (tmp_path / "afile").write_text("keep me")
    assert main(["data", "prepare", "--format", "csv", "--input", str(src), "--output", str(tmp_path / "afile")]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "c"]
    # an empty directory and a previous output (even of fewer splits) are fine: the latter is replaced
    (tmp_path / "empty").mkdir()
    raw = formats.read_generic_csv(src / "interactions.csv", src / "items.csv")
    prepare(raw, tmp_path / "empty")
    prepare(raw, tmp_path / "empty", splits=["test"])
    prepare(raw, tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "catalog.jsonl", "stats.json", "test.jsonl", "train.jsonl", "valid.jsonl"]


def test_seq_txt_with_cr_line_endings_is_an_error_and_crlf_is_fine(tmp_path: Path):
    src = tmp_path / "seq"
    (src / "derived").mkdir(parents=True)
    (src / "derived" / "items.jsonl").write_text(jsonl([{"seq_id": k, "title": f"T{k}"} for k in range(1, 6)]))
    # "\r" only: read as one line, users 2 and 3 (ids included) became items of user 1, silently
    (src / "sequential_data.txt").write_bytes(b"1 1 2 3\r2 3 4 5\r3 1 5 2\r")
    assert err_of(lambda: formats.read_seq_txt(src)) == (
        f"{src / 'sequential_data.txt'}, row 1: a line break inside the line (a file with \\r line endings?): "
        "lines must end with \\n or \\r\\n")
    (src / "sequential_data.txt").write_bytes(b"1 1 2 3\r\n2 3 4 5\r\n3 1 5 2")
    assert formats.read_seq_txt(src).sequences["3"] == {"all": [("1", None), ("5", None), ("2", None)]}


def test_seq_txt_named_later_splits_keep_the_earlier_windows_in_their_histories(tmp_path: Path):
    src = tmp_path / "seq"
    (src / "derived").mkdir(parents=True)
    (src / "derived" / "items.jsonl").write_text(jsonl([{"seq_id": k, "title": f"T{k}"} for k in range(1, 6)]))
    (src / "sequential_train.txt").write_text("1 1 2\n2 3 4\n")
    (src / "sequential_valid.txt").write_text("1 3 5\n2 1 5\n")
    (src / "sequential_test.txt").write_text("1 4\n2 2\n")
    prepare(formats.read_seq_txt(src), tmp_path / "all")
    # --splits valid,test read only those files: the histories silently lost the train items ([3] for [1, 2, 3])
    prepare(formats.read_seq_txt(src, splits=["valid", "test"]), tmp_path / "vt", splits=["valid", "test"])
    for split in ("valid", "test"):
        assert (tmp_path / "vt" / f"{split}.jsonl").read_bytes() == (tmp_path / "all" / f"{split}.jsonl").read_bytes()
    assert not (tmp_path / "vt" / "train.jsonl").exists()
    # without the train file there are no such histories: an error naming it, not shorter histories
    (src / "sequential_train.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"split 'train' is missing \(sequential_train.txt not found\) "
                                                r"\(its items begin the histories of the 'test' rows\)"):
        formats.read_seq_txt(src, splits=["valid", "test"])
    with pytest.raises(ValueError, match="unknown split"):
        formats.read_seq_txt(src, splits=["tran"])


# --------------------------------------------------------------------------- review 2026-12-06


def _d3_source(root: Path, info: str, rows: str, cat: str = "Toys") -> Path:
    (root / "info").mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(exist_ok=True)
    (root / "info" / f"{cat}.txt").write_text(info)
    (root / "test" / f"{cat}.csv").write_text(rows)
    return root


def test_d3_row_titles_that_are_not_the_info_files_are_an_error(tmp_path: Path):
    head = "user_id,history_item_id,item_id,history_item_title,item_title,timestamp\n"
    root = _d3_source(tmp_path / "d3", "Alpha\t0\nBeta\t1\nGamma\t2\n",
                      head + "u1,\"[0, 1]\",2,\"['Alpha', 'Beta ']\",Gamma,5\n")
    # the same titles (up to surrounding spaces): read as before
    assert formats.read_d3_csv(root, ["test"]).rows["test"] == [formats.RawRow("u1", ["0", "1"], "2", 5)]
    csv_path = root / "test" / "Toys.csv"
    # an info file of another preprocessing run: every id named another item's title, silently
    csv_path.write_text(head + "u1,\"[0, 1]\",2,\"['Gamma', 'Beta']\",Alpha,5\n")
    assert err_of(lambda: formats.read_d3_csv(root, ["test"])) == (
        f"{csv_path}, row 2, field 'history_item_title[0]': title 'Gamma' of item 0 differs from Toys.txt's 'Alpha': "
        "the info file is not this data's")
    csv_path.write_text(head + "u1,\"[0, 1]\",2,\"['Alpha', 'Beta']\",Alpha,5\n")
    assert "field 'item_title': title 'Alpha' of item 2 differs from Toys.txt's 'Gamma'" in err_of(
        lambda: formats.read_d3_csv(root, ["test"]))


def test_d3_category_that_is_a_whole_name_beats_a_longer_name_it_starts(tmp_path: Path):
    rows = "user_id,history_item_id,item_id,timestamp\nu1,\"[0]\",1,5\n"
    root = _d3_source(tmp_path / "d3", "Alpha\t0\nBeta\t1\n", rows, cat="Toys")
    _d3_source(root, "Uno\t0\nDos\t1\n", rows, cat="Toys_and_Games")
    # "Toys" was "several info files (Toys.txt, Toys_and_Games.txt); pick one with --category"
    assert formats.read_d3_csv(root, ["test"], category="Toys").titles == {"0": "Alpha", "1": "Beta"}
    assert formats.read_d3_csv(root, ["test"], category="Toys_and").titles == {"0": "Uno", "1": "Dos"}
    with pytest.raises(ValueError, match="several info files"):
        formats.read_d3_csv(root, ["test"], category="To")


def test_recbole_title_column_is_title_or_one_ending_in_title(tmp_path: Path):
    src = tmp_path / "rb"
    src.mkdir()
    (src / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\t1\t1\nu1\t2\t2\n")
    # the first column merely containing "title" was taken: every title became a number
    (src / "x.item").write_text("item_id:token\ttitle_len:float\tmovie_title:token_seq\n1\t9\tToy Story\n2\t7\tHeat\n")
    assert formats.read_recbole(src).titles == {"1": "Toy Story", "2": "Heat"}
    (src / "x.item").write_text("item_id:token\tmovie_title:token_seq\ttitle:token_seq\n1\tA\tToy Story\n2\tB\tHeat\n")
    assert formats.read_recbole(src).titles == {"1": "Toy Story", "2": "Heat"}
    (src / "x.item").write_text("item_id:token\tmovie_title:token_seq\tbook_title:token_seq\n1\tA\tB\n")
    assert err_of(lambda: formats.read_recbole(src)) == (
        f"{src / 'x.item'}, row 1, field 'title': several title columns (movie_title, book_title): keep one")
    (src / "x.item").write_text("item_id:token\tsubtitle:token_seq\n1\tA\n")
    assert "no title column" in err_of(lambda: formats.read_recbole(src))


def test_a_timestamp_beyond_int64_is_an_error_of_the_input_row(tmp_path: Path):
    src = tmp_path / "c"
    src.mkdir()
    (src / "items.csv").write_text("item,title\n1,One\n2,Two\n")
    (src / "interactions.csv").write_text("user,item,timestamp\nu1,1,1\nu1,2,99999999999999999999\n")
    # prepare used to succeed and load_prepared to fail later, naming test.jsonl instead of this row
    assert err_of(lambda: formats.read_generic_csv(src / "interactions.csv", src / "items.csv")) == (
        f"{src / 'interactions.csv'}, row 3, field 'timestamp': timestamp 99999999999999999999 is outside the "
        "64-bit integer range")
    (src / "interactions.csv").write_text(f"user,item,timestamp\nu1,1,1\nu1,2,{2**63 - 1}\n")
    assert formats.read_generic_csv(src / "interactions.csv", src / "items.csv").sequences


def test_output_dot_is_refused_before_any_work_and_a_symlinked_output_updates_its_target(
        tmp_path: Path, monkeypatch, capsys):
    src = tmp_path / "c"
    src.mkdir()
    (src / "items.csv").write_text("item,title\n1,One\n2,Two\n3,Three\n")
    (src / "interactions.csv").write_text("user,item,timestamp\n" + "".join(
        f"u{u},{i},{10 * u + k}\n" for u in (1, 2) for k, i in enumerate((1, 2, 3, 1, 2))))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # "." crashed in the rename and left a complete "..tmp-*" copy inside, which then blocked every rerun
    for out in (".", str(tmp_path)):
        assert main(["data", "prepare", "--format", "csv", "--input", str(src), "--output", out]) == 1
        assert "is the current directory or holds it" in capsys.readouterr().err
        assert list(work.iterdir()) == []
    # a symlink: the directory it points to gets the output (the link itself was replaced, leaving that
    # directory stale and a ".link.old-*" link behind)
    (work / "real").mkdir()
    (work / "link").symlink_to("real")
    assert main(["data", "prepare", "--format", "csv", "--input", str(src), "--output", "link"]) == 0
    assert (work / "link").is_symlink() and sorted(p.name for p in work.iterdir()) == ["link", "real"]
    assert sorted(p.name for p in (work / "real").iterdir()) == [
        "catalog.jsonl", "stats.json", "test.jsonl", "train.jsonl", "valid.jsonl"]


# --------------------------------------------------------------------------- review: split names, npy text, headers


def test_a_split_name_other_than_train_valid_test_is_refused(tmp_path: Path, capsys):
    rows = "user_id,history_item_id,item_id,timestamp\nu1,\"[0]\",1,5\n"
    root = _d3_source(tmp_path / "d3", "Alpha\t0\nBeta\t1\n", rows)
    (root / "test").rename(root / "dev")
    # dev/Toys.csv was read as a split "dev" and written as dev.jsonl: a file load_prepared never reads, which made
    # the next prepare into that directory refuse it as "not a prepared directory (it holds dev.jsonl)"
    with pytest.raises(ValueError, match=r"unknown split\(s\) dev: the splits are train, valid, test"):
        formats.read_d3_csv(root, ["dev"])
    raw = formats.RawData(titles={"0": "Alpha", "1": "Beta"}, mode="rows",
                          rows={"dev": [formats.RawRow("u1", ["0"], "1", 5)]})
    with pytest.raises(ValueError, match=r"unknown split 'dev' in the splits to prepare \(dev\)"):
        prepare(raw, tmp_path / "out", splits=["dev"])
    assert not (tmp_path / "out").exists()
    assert main(["data", "prepare", "--format", "d3-csv", "--input", str(root), "--output", str(tmp_path / "out"),
                 "--splits", "dev"]) == 1
    assert "unknown split 'dev'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_npy_title_with_an_unpaired_surrogate_is_named(tmp_path: Path):
    import numpy as np

    src = tmp_path / "seq"
    src.mkdir()
    (src / "sequential_data.txt").write_text("1 1 2 3 1\n2 2 3 1 2\n")
    npy = src / "title_maps.npy"
    # a pickle keeps the lone surrogate (items.jsonl is checked for them): prepare then failed writing the catalogue
    # with a bare UnicodeEncodeError naming no file or item
    np.save(npy, {"seqid2title": {"1": "One \ud83c", "2": "Two", "3": "Three"}}, allow_pickle=True)
    assert err_of(lambda: formats.read_seq_txt(src)) == (
        f"{npy}, field 'seqid2title': the title of item '1' holds an unpaired UTF-16 surrogate ('\\ud83c'): "
        "not Unicode text")


def test_recbole_column_named_twice_in_a_header_is_an_error(tmp_path: Path):
    src = tmp_path / "rb"
    src.mkdir()
    (src / "x.item").write_text("item_id:token\ttitle:token_seq\n1\tA\n2\tB\n")
    (src / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\ttimestamp:float\nu1\t1\t1\t2\n")
    # the last of the two was kept: every row was then blamed for "4 fields where the header has 3"
    assert err_of(lambda: formats.read_recbole(src)) == (
        f"{src / 'x.inter'}, row 1, field 'timestamp': column named more than once in the header")
    (src / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\t1\t1\nu1\t2\t2\n")
    (src / "x.item").write_text("item_id:token\ttitle:token_seq\ttitle:token\n1\tA\tB\n")
    assert err_of(lambda: formats.read_recbole(src)) == (
        f"{src / 'x.item'}, row 1, field 'title': column named more than once in the header")


def test_a_title_kind_named_twice_in_the_title_policy_is_refused():
    # "html=keep,html=drop" silently meant the last one
    with pytest.raises(ValueError, match="title kind 'html' is named more than once in title policy"):
        TitlePolicy.parse("html=keep,placeholder=drop,html=drop")
    assert TitlePolicy.parse("html=keep,placeholder=keep").as_dict() == {
        "html": "keep", "placeholder": "keep", "empty": "drop", "duplicate": "keep"}
