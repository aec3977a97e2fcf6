"""Item catalogue and title cleaning (llmrec.data.catalog)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmrec.data.canonical import DataFormatError
from llmrec.data.catalog import (
    ItemCatalog,
    TitlePolicy,
    classify_title,
    clean_titles,
    has_char_refs,
    normalize_title_text,
)


@pytest.mark.parametrize(
    "title, kind",
    [
        ('<span class="a-size-medium a-color-secondary a-text-normal', "html"),
        ('<span id="x">Junk</span>', "html"),
        ("<b>Bold</b> game", "html"),
        ("Best of <br/> hits", "html"),
        ("</div>", "html"),
        ("title_17", "placeholder"),
        ("  title_0  ", "placeholder"),
        ("", "empty"),
        ("   \t", "empty"),
        (None, "empty"),
        ("Anno 2070", None),
        ("X: Beyond the Frontier - PC", None),
        ("title_17 deluxe", None),  # only the bare generated form is a placeholder
        ("Title_17", None),
        ("a < b > c", None),  # angle brackets that are no tag
        ("5 <3 you", None),
        ("Tom & Jerry", None),
        ("{Braces} [and] 'quotes'", None),
    ],
)
def test_classify_title(title, kind):
    assert classify_title(title) == kind


def test_title_policy_parse():
    assert TitlePolicy.parse(None).as_dict() == {"html": "drop", "placeholder": "drop", "empty": "drop",
                                                 "duplicate": "keep"}
    assert TitlePolicy.parse("").as_dict() == TitlePolicy().as_dict()
    p = TitlePolicy.parse("html=keep, duplicate = drop")
    assert p.as_dict() == {"html": "keep", "placeholder": "drop", "empty": "drop", "duplicate": "drop"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("html", "expected kind=keep|drop"),
        ("html=maybe", "must be one of"),
        ("junk=drop", "unknown title kind 'junk'"),
        ("html=drop,,", "bad title policy"),
        ("text=drop", "'text' must be one of"),
        ("text=normalize,text=keep", "named more than once"),
    ],
)
def test_title_policy_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        TitlePolicy.parse(spec)


def test_title_policy_text_choice():
    assert TitlePolicy.parse(None).text == "keep"
    p = TitlePolicy.parse("text=normalize,duplicate=drop")
    assert p.text == "normalize" and p.duplicate == "drop" and p.html == "drop"
    assert "text" not in p.as_dict()  # the keep/drop choices per kind only


@pytest.mark.parametrize(
    "raw, normalized, refs",
    [
        ("Orcs &amp; Humans", "Orcs & Humans", True),
        ("Mouse &ndash; 11 Buttons", "Mouse \u2013 11 Buttons", True),
        ("Don&#39;t Starve", "Don't Starve", True),
        ("Caf&#xE9; &#X41;", "Caf\u00e9 A", True),
        ("Star&nbsp;Fox", "Star Fox", True),  # the no-break space becomes a plain one
        ("&lt;Disc 2&gt;", "<Disc 2>", True),
        ("AT&T", "AT&T", False),  # no reference
        ("Tom & Jerry", "Tom & Jerry", False),
        ("&copy 2010", "&copy 2010", False),  # no ";": html.unescape of the whole title would decode it
        ("R&D;", "R&D;", False),  # "&D;" is no entity: left as it is, and not counted
        ("&amp;amp;", "&amp;", True),  # decoded once, as the source escaped it once more
        # unknown names whose start is an entity HTML5 allows without ";": html.unescape would decode that start
        ("&copyright; &ampersand; I &lt3; NY", "&copyright; &ampersand; I &lt3; NY", False),
        ("&notes; &amp;", "&notes; &", True),
        ("Halo\t3  -\n Xbox", "Halo 3 - Xbox", False),
    ],
)
def test_normalize_title_text(raw, normalized, refs):
    assert normalize_title_text(raw) == normalized
    assert has_char_refs(raw) is refs


def test_clean_titles_normalize_text_before_judging_kinds():
    raw = {"1": "Orcs &amp; Humans", "2": "Orcs & Humans", "3": "&lt;b&gt;x&lt;/b&gt;", "4": "&nbsp;",
           "5": "Halo\t3", "6": "Tetris"}
    kept, report = clean_titles(raw)  # text=keep: as the source has them, counted
    assert kept == {"1": "Orcs &amp; Humans", "2": "Orcs & Humans", "3": "&lt;b&gt;x&lt;/b&gt;", "4": "&nbsp;",
                    "5": "Halo\t3", "6": "Tetris"}
    assert report.found == {"html": 0, "placeholder": 0, "empty": 0, "duplicate": 0}
    assert report.as_dict()["text"] == {"policy": "keep", "with_char_refs": 3, "with_irregular_whitespace": 1,
                                        "normalized": 0}
    kept, report = clean_titles(raw, TitlePolicy.parse("text=normalize"))
    # the decoded markup is html and "&nbsp;" is empty (both dropped); items 1 and 2 now share a title
    assert kept == {"1": "Orcs & Humans", "2": "Orcs & Humans", "5": "Halo 3", "6": "Tetris"}
    assert report.found == {"html": 1, "placeholder": 0, "empty": 1, "duplicate": 1}
    assert report.dropped_raw_ids == ["3", "4"] and report.items_sharing_a_title == 2
    assert report.as_dict()["text"] == {"policy": "normalize", "with_char_refs": 3, "with_irregular_whitespace": 1,
                                        "normalized": 4}
    json.dumps(report.as_dict())


def test_title_policy_constructor_validates():
    with pytest.raises(ValueError, match="'empty'"):
        TitlePolicy(empty="remove")


RAW = {
    "1": "Halo",
    "2": '<span class="a-size-medium">',
    "3": "title_3",
    "4": "  ",
    "5": None,
    "6": "Halo ",  # the same title as item 1 once stripped
    "7": "Tetris",
    "8": "Halo",
    "9": "Zelda",
    "10": "Zelda",
}


def test_clean_titles_default_policy():
    kept, report = clean_titles(RAW)
    assert kept == {"1": "Halo", "6": "Halo", "7": "Tetris", "8": "Halo", "9": "Zelda", "10": "Zelda"}
    assert report.found == {"html": 1, "placeholder": 1, "empty": 2, "duplicate": 3}
    assert report.dropped == {"html": 1, "placeholder": 1, "empty": 2, "duplicate": 0}
    assert report.items_sharing_a_title == 5
    assert report.dropped_raw_ids == ["2", "3", "4", "5"]
    d = report.as_dict()
    assert d["found"] == report.found and d["dropped_items"] == report.dropped
    assert d["policy"] == TitlePolicy().as_dict() and d["items_sharing_a_title"] == 5
    json.dumps(d)  # stats.json material


def test_clean_titles_drop_duplicates_and_keep_bad_titles():
    kept, report = clean_titles(RAW, TitlePolicy.parse("duplicate=drop"))
    assert kept == {"7": "Tetris"}  # every item of a shared title goes
    assert report.dropped["duplicate"] == 5 and report.found["duplicate"] == 3
    kept, report = clean_titles(RAW, TitlePolicy.parse("html=keep,placeholder=keep,empty=keep"))
    assert kept["2"] == '<span class="a-size-medium">' and kept["3"] == "title_3"
    assert kept["4"] == "" and kept["5"] == ""  # two kept empty titles: a duplicate pair
    assert report.found == {"html": 1, "placeholder": 1, "empty": 2, "duplicate": 4}
    assert report.dropped == {"html": 0, "placeholder": 0, "empty": 0, "duplicate": 0}
    assert report.dropped_raw_ids == []


def test_clean_titles_duplicates_counted_after_drops():
    # both html items share a title, but they are dropped first: no duplicate is left
    kept, report = clean_titles({"1": "<b>x</b>", "2": "<b>x</b>", "3": "A", "4": "B"})
    assert kept == {"3": "A", "4": "B"}
    assert report.found["html"] == 2 and report.found["duplicate"] == 0


def test_catalog_from_titles_numbers_in_source_order():
    cat = ItemCatalog.from_titles({"10": "Ten", "2": "Two", "1": "One", "b": "Bee", "a": "Ay", "02": "Zero-two"})
    # numeric ids by value (leading zeros compare by value), then the others as strings
    assert cat.raw_ids == ["1", "2", "02", "10", "a", "b"]
    assert [cat.title(i) for i in cat.item_ids] == ["One", "Two", "Zero-two", "Ten", "Ay", "Bee"]
    assert len(cat) == 6 and list(cat.item_ids) == [1, 2, 3, 4, 5, 6]
    assert cat.id_for_raw("10") == 4 and cat.id_for_raw(10) == 4 and cat.id_for_raw("zz") is None
    assert cat.raw_id(5) == "a"
    with pytest.raises(KeyError, match="ids 1..6"):
        cat.title(0)
    with pytest.raises(KeyError):
        cat.title(7)


def test_catalog_odd_digit_ids_do_not_crash():
    # "²".isdigit() is True but int("²") fails: such ids sort as strings
    cat = ItemCatalog.from_titles({"²": "Squared", "1": "One", "١٢": "Arabic twelve", "3": "Three"})
    assert cat.raw_ids == ["1", "3", "١٢", "²"]


def test_item_ids_for_title_and_unique_titles():
    cat = ItemCatalog(["a", "b", "c", "d"], ["Halo", "Tetris", "Halo", "Zelda"])
    assert cat.item_ids_for_title("Halo") == [1, 3]
    assert cat.item_ids_for_title("Zelda") == [4]
    assert cat.item_ids_for_title("Nope") == []
    got = cat.item_ids_for_title("Halo")
    got.append(99)  # a copy: the catalogue is not changed
    assert cat.item_ids_for_title("Halo") == [1, 3]
    assert cat.unique_titles() == ["Halo", "Tetris", "Zelda"]


def test_catalog_constructor_errors():
    with pytest.raises(ValueError, match="differ in length"):
        ItemCatalog(["1", "2"], ["A"])
    with pytest.raises(ValueError, match="duplicate raw item ids"):
        ItemCatalog(["1", "1"], ["A", "B"])


def test_catalog_save_load_round_trip(tmp_path: Path):
    titles = ["Halo", 'Zelda: "Breath" {of} the Wild', "Pokémon ★", "Halo", "tab\there"]
    cat = ItemCatalog(["7", "b", "3", "x y", "5"], titles)
    path = tmp_path / "catalog.jsonl"
    cat.save(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"item_id": 1, "raw_id": "7", "title": "Halo"}
    assert lines[2] == '{"item_id":3,"raw_id":"3","title":"Pokémon ★"}'  # sorted keys, UTF-8 kept
    back = ItemCatalog.load(path)
    assert back.raw_ids == cat.raw_ids and back.titles == cat.titles
    assert back.item_ids_for_title("Halo") == [1, 4]
    # a directory is accepted too; saving again gives the same bytes
    assert ItemCatalog.load(tmp_path).titles == titles
    back.save(tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()


def test_catalog_load_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="catalogue file not found"):
        ItemCatalog.load(tmp_path / "nope.jsonl")
    p = tmp_path / "c.jsonl"
    p.write_text('{"item_id": 1, "raw_id": "a", "title": "A"}\n{"item_id": 3, "raw_id": "b", "title": "B"}\n')
    with pytest.raises(DataFormatError, match=r"row 2, field 'item_id': expected 2"):
        ItemCatalog.load(p)
    p.write_text('{"item_id": 1, "title": "A"}\n')
    with pytest.raises(DataFormatError, match=r"row 1, field 'raw_id': missing"):
        ItemCatalog.load(p)
    p.write_text('{"item_id": 1, "raw_id": "a", "title": "A"}\n{oops\n')
    with pytest.raises(DataFormatError, match=r"row 2: not valid JSON"):
        ItemCatalog.load(p)
    p.write_text("\n")
    with pytest.raises(DataFormatError, match="the catalogue is empty"):
        ItemCatalog.load(p)
