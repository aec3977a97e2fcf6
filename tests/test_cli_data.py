"""``llmrec data prepare`` / ``llmrec data stats`` through ``llmrec.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmrec.cli import main

EVENTS = [("a", "i1", 1), ("a", "i2", 2), ("a", "i3", 3), ("b", "i1", 4), ("b", "i3", 5), ("a", "i4", 6),
          ("b", "i2", 7), ("c", "i2", 8), ("a", "i5", 9), ("b", "i4", 10)]


def write_csv_source(root: Path, events=EVENTS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "interactions.csv").write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in events))
    (root / "items.csv").write_text("item,title\n" + "".join(f"i{k},Title {k}\n" for k in range(1, 6)))
    return root


def write_d3_source(root: Path, with_train: bool = False) -> Path:
    (root / "info").mkdir(parents=True)
    (root / "info" / "Music_5.txt").write_text("One\t0\nTwo\t1\nThree\t2\n")
    header = ("user_id,item_asins,item_asin,history_item_id,item_id,history_item_title,item_title,history_rating,"
              "rating,history_timestamp,timestamp\n")
    splits = ["valid", "test"] + (["train"] if with_train else [])
    for k, split in enumerate(splits):
        (root / split).mkdir()
        (root / split / "Music_5.csv").write_text(
            header + f"""u{k},"['A0', 'A1']",A2,"[0, 1]",2,"['One', 'Two']",Three,"[5.0, 4.0]",5.0,"[1, 2]",{10 + k}\n""")
    return root


def prepare_args(fmt: str, src: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "prepare", "--format", fmt, "--input", str(src), "--output", str(out), *extra]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prepare_csv_writes_files(tmp_path: Path, capsys):
    src, out = write_csv_source(tmp_path / "src"), tmp_path / "out"
    assert main(prepare_args("csv", src, out, "--split", "time", "--time-cutoffs", "5,8", "--max-history", "2")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["catalog.jsonl", "stats.json", "test.jsonl", "train.jsonl",
                                                      "valid.jsonl"]
    test_rows = read_rows(out / "test.jsonl")
    assert [(r["user_id"], r["history_item_ids"], r["target_item_id"]) for r in test_rows] == [
        ("a", [3, 4], 5), ("b", [3, 2], 4)]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["options"]["max_history"] == 2 and stats["rows"] == {"train": 2, "valid": 3, "test": 2}
    printed = capsys.readouterr().out
    assert "rows:    train 2  valid 3  test 2" in printed
    assert "raw:     users 3  items 5  interactions 10" in printed


def test_prepare_seq_txt_and_d3_with_named_splits(tmp_path: Path, capsys):
    seq = tmp_path / "seq"
    (seq / "derived").mkdir(parents=True)
    (seq / "derived" / "items.jsonl").write_text(
        "".join(json.dumps({"seq_id": k, "title": f"Game {k}"}) + "\n" for k in range(1, 5)))
    (seq / "sequential_train.txt").write_text("1 1 2\n2 3 4\n")
    (seq / "sequential_valid.txt").write_text("1 3\n2 1\n")
    assert main(prepare_args("seq-txt", seq, tmp_path / "o1", "--splits", "train,valid",
                             "--titles-from", "jsonl", "--eval-rows", "first")) == 0
    assert sorted(p.name for p in (tmp_path / "o1").iterdir()) == ["catalog.jsonl", "stats.json", "train.jsonl",
                                                                   "valid.jsonl"]
    d3 = write_d3_source(tmp_path / "d3")
    assert main(prepare_args("d3-csv", d3, tmp_path / "o2", "--splits", "valid,test")) == 0
    assert read_rows(tmp_path / "o2" / "test.jsonl") == [
        {"user_id": "u1", "history_item_ids": [1, 2], "target_item_id": 3, "timestamp": 11}]
    capsys.readouterr()
    # without --splits the missing train split is a clear error, not a traceback
    assert main(prepare_args("d3-csv", d3, tmp_path / "o3")) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmrec: error:") and "split 'train' is missing" in err and "--splits" in err
    assert "Traceback" not in err and not (tmp_path / "o3").exists()


def test_wrong_format_is_an_argparse_error(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as e:
        main(prepare_args("parquet", tmp_path, tmp_path / "out"))
    assert e.value.code == 2
    assert "invalid choice: 'parquet'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["data"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(prepare_args("csv", tmp_path, tmp_path / "out", "--frobnicate"))
    assert e.value.code == 2


def test_malformed_input_returns_1_and_names_file_row_field(tmp_path: Path, capsys):
    src = write_csv_source(tmp_path / "src", EVENTS[:3] + [("b", "i2", "yesterday")] + EVENTS[3:])
    out = tmp_path / "out"
    assert main(prepare_args("csv", src, out)) == 1
    err = capsys.readouterr().err
    assert f"{src / 'interactions.csv'}, row 5, field 'timestamp': expected an integer, got 'yesterday'" in err
    assert "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_failing_run_keeps_existing_output(tmp_path: Path, capsys):
    src, out = write_csv_source(tmp_path / "src"), tmp_path / "out"
    assert main(prepare_args("csv", src, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (src / "items.csv").write_bytes(b"item,title\ni1,\xff\xfe\n")
    assert main(prepare_args("csv", src, out)) == 1
    assert "items.csv, row 2: bytes that are not UTF-8" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--split", "time", "--time-cutoffs", "5"], "--time-cutoffs takes two timestamps"),
        (["--title-policy", "html=sometimes"], "title policy for 'html'"),
        (["--split", "time", "--time-cutoffs", "5,x"], "--time-cutoffs takes two timestamps VALID_START,TEST_START"),
        (["--split", "time", "--time-cutoffs", "8,5"], "with VALID_START <= TEST_START, got '8,5'"),
        (["--split", "time", "--time-cutoffs", "5,nan"], "--time-cutoffs takes two timestamps"),
        # Ignored before: a leave-one-out split has no cutoffs.
        (["--time-cutoffs", "5,8"], "applies to --format csv or amazon2023 with --split time"),
    ],
)
def test_bad_options_return_1(tmp_path: Path, capsys, extra, message):
    src = write_csv_source(tmp_path / "src")
    assert main(prepare_args("csv", src, tmp_path / "out", *extra)) == 1
    assert message in capsys.readouterr().err


def test_time_cutoffs_accept_fractional_timestamps(tmp_path: Path):
    src, out = write_csv_source(tmp_path / "src"), tmp_path / "out"
    assert main(prepare_args("csv", src, out, "--split", "time", "--time-cutoffs", "4.5,7.5", "--max-history", "2")) == 0
    ref = tmp_path / "ref"
    assert main(prepare_args("csv", src, ref, "--split", "time", "--time-cutoffs", "5,8", "--max-history", "2")) == 0
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):  # integer timestamps: t < 4.5 iff t < 5
        assert (out / name).read_bytes() == (ref / name).read_bytes()


def test_missing_input_and_category(tmp_path: Path, capsys):
    assert main(prepare_args("csv", tmp_path / "nope", tmp_path / "out")) == 1
    assert "input not found" in capsys.readouterr().err
    assert main(prepare_args("amazon2023", tmp_path, tmp_path / "out")) == 1
    assert "needs --category" in capsys.readouterr().err


def test_prepare_amazon2023(tmp_path: Path, capsys):
    src = tmp_path / "amz"
    src.mkdir()
    reviews = [("u1", "B1", 1), ("u1", "B2", 2), ("u1", "B3", 3), ("u1", "B4", 4), ("u2", "B2", 5), ("u2", "B3", 6),
               ("u2", "B1", 7)]
    (src / "Toys.jsonl").write_text("".join(
        json.dumps({"user_id": u, "parent_asin": a, "rating": 5.0, "timestamp": t}) + "\n" for u, a, t in reviews))
    (src / "meta_Toys.jsonl").write_text("".join(
        json.dumps({"parent_asin": f"B{k}", "title": f"Toy {k}"}) + "\n" for k in range(1, 5)))
    out = tmp_path / "out"
    assert main(prepare_args("amazon2023", src, out, "--category", "Toys")) == 0
    assert [r["target_item_id"] for r in read_rows(out / "test.jsonl")] == [4, 1]


def test_stats_prints(tmp_path: Path, capsys):
    src, out = write_csv_source(tmp_path / "src"), tmp_path / "out"
    assert main(prepare_args("csv", src, out)) == 0
    capsys.readouterr()
    assert main(["data", "stats", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("source: ")
    assert "rows:    train 3  valid 2  test 2" in printed
    assert "titles:  " in printed and "html 0 found/0 dropped (drop)" in printed
    assert "skipped: train_rows_empty_history 3  users_too_short_for_leave_one_out 1" in printed
    assert main(["data", "stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((out / "stats.json").read_text())
    # A reader that goes away (`llmrec data stats DIR | head`) ends the command quietly, not with a traceback
    import subprocess
    import sys

    done = subprocess.run(f"{sys.executable} -m llmrec.cli data stats {out} | true", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert main(["data", "stats", str(tmp_path / "nope")]) == 1
    assert "prepared dataset directory not found" in capsys.readouterr().err
    assert main(["data", "stats", str(src)]) == 1
    assert "not a prepared directory" in capsys.readouterr().err


def test_prepare_normalizes_title_text_when_asked(tmp_path: Path, capsys):
    src = write_csv_source(tmp_path / "src")
    titles = ["Orcs &amp; Humans", "Don&#39;t Starve", "Halo\t3", "Orcs & Humans", "Tetris"]
    (src / "items.csv").write_text("item,title\n" + "".join(f"i{k},{t}\n" for k, t in enumerate(titles, 1)))
    assert main(prepare_args("csv", src, tmp_path / "kept")) == 0
    assert main(prepare_args("csv", src, tmp_path / "norm", "--title-policy", "text=normalize")) == 0
    capsys.readouterr()
    catalog = {m: [json.loads(line)["title"] for line in (tmp_path / m / "catalog.jsonl").read_text().splitlines()]
               for m in ("kept", "norm")}
    assert catalog["kept"] == titles  # the default: as the source has them
    assert catalog["norm"] == ["Orcs & Humans", "Don't Starve", "Halo 3", "Orcs & Humans", "Tetris"]
    stats = json.loads((tmp_path / "norm" / "stats.json").read_text())["cleaning"]
    assert stats["text"] == {"policy": "normalize", "with_char_refs": 2, "with_irregular_whitespace": 1,
                             "normalized": 3}
    assert stats["found"]["duplicate"] == 1  # "Orcs &amp; Humans" decoded is item 4's title
    assert main(["data", "stats", str(tmp_path / "kept")]) == 0
    assert ("text (keep): 2 with HTML character references, 1 with tabs/line breaks/repeated spaces, 0 normalized"
            in capsys.readouterr().out)


@pytest.mark.parametrize("edit,field,problem", [
    (lambda s: s.clear(), "raw", "missing"),  # was KeyError: 'raw'
    (lambda s: s["raw"].update(users="x"), "raw.users", 'expected a count (a number), got "x"'),  # was "Cannot
    (lambda s: s["cleaned"].update(examples=None), "cleaned.examples", "got null"),  # specify ',' with 's'."
    (lambda s: s.update(rows=[3, 2, 2]), "rows", "expected a JSON object"),
    (lambda s: s["rows"].update(train=True), "rows.train", "got true"),
    (lambda s: s["cleaning"]["dropped_items"].pop("html"), "cleaning.dropped_items.html", "missing"),
    (lambda s: s["cleaning"]["text"].update(normalized="2"), "cleaning.text.normalized", 'got "2"'),
    (lambda s: s["cleaning"]["text"].pop("policy"), "cleaning.text.policy", "missing"),
    (lambda s: s["raw"]["per_split"].update(train={"rows": "3"}), "raw.per_split.train.rows", 'got "3"'),
    (lambda s: s.update(skipped={"train_rows_empty_history": "3"}), "skipped.train_rows_empty_history", 'got "3"'),
])
def test_stats_of_a_hand_edited_stats_json_names_the_file_and_field(tmp_path: Path, capsys, edit, field, problem):
    src, out = write_csv_source(tmp_path / "src"), tmp_path / "out"
    assert main(prepare_args("csv", src, out)) == 0
    stats = json.loads((out / "stats.json").read_text())
    stats["raw"]["per_split"] = {"train": {"rows": 3}}
    edit(stats)
    (out / "stats.json").write_text(json.dumps(stats))
    capsys.readouterr()
    assert main(["data", "stats", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"llmrec: error: {out / 'stats.json'}, field '{field}': ") and problem in err, err
    assert main(["data", "stats", str(out), "--json"]) == 0  # the raw file is still shown as it is


def write_amazon2018_source(root: Path, base: int = 1514764800) -> Path:
    """5 reviewers x 12 items inside D3's default window (``base``: 2018-01-01 UTC): every user and item passes the
    5-core."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "Toys.json").write_text("".join(
        json.dumps({"reviewerID": f"U{u}", "asin": f"A{k:02d}", "unixReviewTime": base + k * 864000 + u * 3600}) + "\n"
        for u in range(1, 6) for k in range(1, 13)))
    (root / "meta_Toys.json").write_text("".join(
        json.dumps({"asin": f"A{k:02d}", "title": f"Toy {k}"}) + "\n" for k in range(1, 13)))
    return root


@pytest.mark.parametrize("extra, longest, recorded", [([], 10, 10), (["--max-history", "3"], 3, 3),
                                                      (["--max-history", "0"], 11, 0)])
def test_amazon2018_max_history_reaches_the_reader(tmp_path: Path, extra, longest, recorded):
    # --max-history was not passed to the reader (always D3's 10) while stats.json recorded the value given (50)
    src, out = write_amazon2018_source(tmp_path / "src"), tmp_path / "out"
    assert main(prepare_args("amazon2018", src, out, "--category", "Toys", "--min-items", "1", *extra)) == 0
    rows = [r for split in ("train", "valid", "test") for r in read_rows(out / f"{split}.jsonl")]
    assert max(len(r["history_item_ids"]) for r in rows) == longest
    assert json.loads((out / "stats.json").read_text())["options"]["max_history"] == recorded


def test_amazon2018_end_before_the_default_start_widens_back_as_before(tmp_path: Path):
    """--end alone, before the default --start (2017-10): the reader widens the window back; the check that refuses
    an inverted --start/--end must not refuse the start the user never gave (a review)."""
    src, out = write_amazon2018_source(tmp_path / "src", base=1488326400), tmp_path / "out"  # 2017-03-01
    assert main(prepare_args("amazon2018", src, out, "--category", "Toys", "--min-items", "1", "--end", "2017-06")) == 0
    assert json.loads((out / "stats.json").read_text())["source"]["window"].endswith("-2017-6")


def test_max_history_default_of_the_other_formats_is_50(tmp_path: Path):
    src, out = write_csv_source(tmp_path / "src"), tmp_path / "out"
    assert main(prepare_args("csv", src, out)) == 0
    assert json.loads((out / "stats.json").read_text())["options"]["max_history"] == 50


@pytest.mark.parametrize("fmt", ["recbole", "seq-txt", "d3-csv", "amazon2018"])
@pytest.mark.parametrize("extra, option", [(["--split", "time"], "--split"), (["--valid-ratio", "0.2"], "--valid-ratio"),
                                           (["--test-ratio", "0.05"], "--test-ratio")])
def test_split_options_are_refused_where_the_input_fixes_the_splits(tmp_path: Path, capsys, fmt, extra, option):
    # they were silently ignored (as --time-cutoffs was, which is refused already); refused before any reading
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    assert main(prepare_args(fmt, src, out, "--category", "Toys", *extra)) == 1
    err = capsys.readouterr().err
    assert f"{option} applies to --format csv or amazon2023" in err and "it would be ignored" in err
    assert f"--format {fmt}" in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("extra", [["--valid-ratio", "0.3"], ["--split", "time", "--time-cutoffs", "5,8",
                                                                 "--test-ratio", "0.3"]])
def test_ratios_are_refused_where_a_csv_split_ignores_them(tmp_path: Path, capsys, extra):
    src, out = write_csv_source(tmp_path / "src"), tmp_path / "out"
    assert main(prepare_args("csv", src, out, *extra)) == 1
    err = capsys.readouterr().err
    assert "applies to --format csv or amazon2023 with --split time and no --time-cutoffs" in err
    assert "it would be ignored" in err and not out.exists()


@pytest.mark.parametrize(("fmt", "extra", "option"), [
    ("recbole", ["--min-rating", "4"], "--min-rating applies to --format amazon2023"),
    ("recbole", ["--interactions", "x.csv"], "--interactions applies to --format csv"),
    ("recbole", ["--titles-from", "npy"], "--titles-from applies to --format seq-txt"),
    ("recbole", ["--start", "2030-01"], "--start applies to --format amazon2018"),
    ("recbole", ["--min-items", "99"], "--min-items applies to --format amazon2018"),
    ("seq-txt", ["--category", "Toys"], "--category applies to --format d3-csv or recbole"),
    ("d3-csv", ["--on-unknown-item", "skip"], "--on-unknown-item applies to --format seq-txt"),
    ("amazon2023", ["--category", "V", "--min-rating", "nan"], "--min-rating must be a finite number"),
    ("amazon2018", ["--category", "V", "--end", "2018-11-01"], "--end takes a month as YYYY-MM"),
    ("amazon2018", ["--category", "V", "--start", "2018-13"], "--start takes a month as YYYY-MM"),
    # an inverted window was silently widened back; year 0 failed naming no flag (a review)
    ("amazon2018", ["--category", "V", "--start", "2019-01", "--end", "2018-11"], "--start 2019-01 is after --end"),
    ("amazon2018", ["--category", "V", "--start", "0000-01"], "--start takes a month as YYYY-MM"),
    ("amazon2018", ["--category", "V", "--end", "99999-01"], "--end takes a month as YYYY-MM"),
    ("amazon2018", ["--category", "V", "--start", "2017-10", "--end", "2017-06"], "--start 2017-10 is after --end"),
])
def test_options_the_format_does_not_read_are_refused(tmp_path: Path, capsys, fmt, extra, option):
    """`--format recbole --min-rating 4` prepared every rating (the option is amazon2023's), and the other
    format-specific options were ignored as silently; amazon2018's months failed with "too many values to unpack"."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    assert main(prepare_args(fmt, src, out, *extra)) == 1
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err and not out.exists()


def test_data_emptied_by_skipped_rows_says_which_file_and_what_was_skipped(tmp_path: Path, capsys):
    """Every interaction naming an item the items file lacks, skipped: the error blamed the title cleaning and named
    no file or count (a review)."""
    src = write_csv_source(tmp_path / "src", events=[("u1", "x1", 1), ("u1", "x2", 2)])
    assert main(prepare_args("csv", src, tmp_path / "out", "--on-unknown-item", "skip", "--split", "time")) == 1
    err = capsys.readouterr().err
    assert f"{src / 'interactions.csv'}: no interactions to split (skipped while reading: unknown_item_interactions 2)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_an_input_file_where_the_format_reads_a_directory_is_refused(tmp_path: Path, capsys):
    """`--input ml-100k.inter` said "no .inter file matching '*.inter'" (a review)."""
    src = write_csv_source(tmp_path / "src")
    assert main(prepare_args("csv", src / "interactions.csv", tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "interactions.csv is a file: give the directory that holds the csv files" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_history_length_beyond_the_prepared_one_is_warned_about(tmp_path: Path, caplog):
    from llmrec.data.canonical import load_prepared

    src, out = write_csv_source(tmp_path / "src"), tmp_path / "out"
    assert main(prepare_args("csv", src, out, "--max-history", "2")) == 0
    with caplog.at_level("WARNING", logger="llmrec.data.canonical"):
        load_prepared(out, max_history=2)
        assert not caplog.records
        load_prepared(out, max_history=5)
    assert "prepared with --max-history 2: histories hold at most 2 items, not the 5 asked" in caplog.text


def test_split_options_at_their_defaults_are_accepted_everywhere(tmp_path: Path):
    d3 = write_d3_source(tmp_path / "d3")
    assert main(prepare_args("d3-csv", d3, tmp_path / "o1", "--splits", "valid,test", "--split", "loo",
                             "--valid-ratio", "0.1", "--test-ratio", "0.1")) == 0
    src = write_csv_source(tmp_path / "src")
    assert main(prepare_args("csv", src, tmp_path / "o2", "--split", "time", "--valid-ratio", "0.2",
                             "--test-ratio", "0.2")) == 0


def test_a_zero_ratio_leaves_its_split_out(tmp_path: Path):
    """README: a ratio of 0 writes no such split (it failed: "split 'test' has no examples after cleaning")."""
    src = write_csv_source(tmp_path / "src")
    assert main(prepare_args("csv", src, tmp_path / "o", "--split", "time", "--valid-ratio", "0.3",
                             "--test-ratio", "0")) == 0
    assert {p.name for p in (tmp_path / "o").glob("*.jsonl")} == {"catalog.jsonl", "train.jsonl", "valid.jsonl"}
    assert main(prepare_args("csv", src, tmp_path / "o0", "--split", "time", "--valid-ratio", "0",
                             "--test-ratio", "0.3")) == 0
    assert not (tmp_path / "o0" / "valid.jsonl").exists() and (tmp_path / "o0" / "test.jsonl").exists()


def test_a_split_named_twice_is_refused(tmp_path: Path, capsys):
    # --splits test,test wrote test.jsonl twice and counted its rows twice in cleaned.examples
    src, out = write_csv_source(tmp_path / "src"), tmp_path / "out"
    assert main(prepare_args("csv", src, out, "--splits", "test,valid,test")) == 1
    err = capsys.readouterr().err
    assert "split 'test' is named more than once in the splits to prepare (test, valid, test)" in err
    assert not out.exists()
    from llmrec.data.formats import read_generic_csv
    from llmrec.data.prepare import prepare

    raw = read_generic_csv(src / "interactions.csv", src / "items.csv")
    with pytest.raises(ValueError, match="split 'test' is named more than once"):
        prepare(raw, out, splits=["test", "test"])
    assert not out.exists()
    assert prepare(raw, out, splits=["test"])["cleaned"]["examples"] == 2


def test_an_output_under_a_file_is_refused(tmp_path: Path, capsys):
    src = write_csv_source(tmp_path / "src")
    (tmp_path / "afile").write_text("x")
    assert main(prepare_args("csv", src, tmp_path / "afile" / "sub")) == 1
    assert "afile, which is a file, not a directory" in capsys.readouterr().err


def test_concurrent_first_uses_of_the_sample_prepare_it_once(tmp_path, monkeypatch):
    """Two processes starting together (accelerate launch) both prepared it; the second's copy replaced the first
    in two renames, between which the directory was missing for a process already reading it."""
    import time

    import llmrec.data.prepare as prepare_module
    from llmrec.data.samples import resolve_dataset_dir, sample_cache_dir
    from tests.conftest import call_concurrently

    monkeypatch.setenv("LLMREC_CACHE", str(tmp_path / "cache"))
    real, calls = prepare_module.prepare, []

    def slow_prepare(raw, out, *a, **kw):
        calls.append(out)
        time.sleep(0.5)  # the other caller arrives while this one prepares
        return real(raw, out, *a, **kw)

    monkeypatch.setattr(prepare_module, "prepare", slow_prepare)
    results, errors = call_concurrently(lambda: resolve_dataset_dir("games-sample"))
    assert errors == [] and len(calls) == 1
    assert results == [sample_cache_dir("games-sample")] * 2 and (results[0] / "stats.json").exists()


def test_samples_and_models_share_one_cache_root(monkeypatch, tmp_path):
    """The prepared samples' cache ignored XDG_CACHE_HOME and did not expand ~ (models did), so data and models
    could land in different roots; an empty LLMREC_CACHE meant the working directory."""
    from llmrec.data.samples import cache_root, sample_cache_dir
    from llmrec.models.backbone import default_cache_dir

    monkeypatch.delenv("LLMREC_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "llmrec" == default_cache_dir().parent
    assert sample_cache_dir("games").parent.parent == cache_root()
    monkeypatch.setenv("LLMREC_CACHE", "")
    assert cache_root() == tmp_path / "xdg" / "llmrec"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMREC_CACHE", "~/c")
    assert cache_root() == tmp_path / "home" / "c" == default_cache_dir().parent


@pytest.mark.parametrize("library", ["huggingface_hub", "datasets"])
def test_a_library_warning_is_printed_once_by_the_cli_logging(library):
    # huggingface_hub and datasets print through a handler of their own and propagate to the root logger too, so
    # under the CLI's root handler each hub retry warning came out twice. A fresh interpreter: pytest's own
    # logging handlers on the root logger would hide the difference.
    import subprocess
    import sys

    code = (
        "import logging\n"
        "from llmrec.cli import configure_logging\n"
        "configure_logging('%(levelname)s %(name)s: %(message)s')\n"
        f"import {library}.utils.logging as lib_logging\n"
        f"lib_logging.get_logger('{library}.some_module').warning('marker-7f3a')\n"
        "logging.getLogger('llmrec.anything').info('ours-9c1e')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("marker-7f3a") == 1, done.stderr
    assert "INFO llmrec.anything: ours-9c1e" in done.stderr
