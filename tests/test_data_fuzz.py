"""Corrupted inputs never crash a reader with an unexpected exception type (hypothesis).

Every failure on bad data must be a :class:`DataFormatError` (file, row, field), a
``FileNotFoundError``, or one of the few plain ``ValueError`` s of ``prepare`` whose message says
what is wrong (nothing left to prepare). Anything else -- ``TypeError``, ``KeyError``,
``UnicodeDecodeError``, ``IndexError``, an ``EOFError`` from a broken gzip -- is a bug in a reader.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmrec.data import formats
from llmrec.data.canonical import DataFormatError
from llmrec.data.prepare import PrepareOptions, prepare
from llmrec.data.safe_npy import UnsafePickleError

pytestmark = pytest.mark.filterwarnings("ignore::SyntaxWarning")  # ast.literal_eval on odd escapes

# Fixed examples by default (fast, reproducible); LLMREC_FUZZ_EXAMPLES=5000 explores with random seeds.
_EXPLORE = int(os.environ.get("LLMREC_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_EXPLORE or 150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None, derandomize=not _EXPLORE)

# Plain ValueErrors that prepare / the readers raise on purpose, with a message that says what is wrong.
CLEAR_VALUE_ERRORS = re.compile(
    r"no items left, nothing to prepare|has no examples after cleaning|is not in the input|no interactions to split"
    r"|\.npy: not a \.npy file|\.npy: cannot read the (pickled )?array|eval_rows 'first' applies to time-window splits"
)


def run_checked(fn) -> None:
    """Run ``fn``; accept only the documented failure types."""
    try:
        fn()
    except DataFormatError as e:
        assert e.path and str(e).startswith(e.path)
    except FileNotFoundError as e:
        assert str(e)
    except UnsafePickleError as e:
        assert ".npy" in str(e)
    except ValueError as e:
        assert type(e) is ValueError and CLEAR_VALUE_ERRORS.search(str(e)), f"unclear ValueError: {e!r}"


# --------------------------------------------------------------------------- corruption strategies

JUNK_VALUES = [
    "", " ", "[", "]", "[1, 2", "[[1]]", "[None]", "['a']", "[1.5]", "[True]", "[1e400]", "{[1]: 2}", "{{}}",
    "{1, [2]}", "(", "1 if 2 else 3", "nan", "inf", "-inf", "1e400", "-1", "0x10", "1_000", "١٢", "²", "\x00",
    "abc", "[" * 200 + "]" * 200, "'\\N{nope}'", "b'\\xff'", "[1, 2, 3, 4, 5, 6]", "9999999999999999999999",
    "[99999]", "'''", '"', "\\", "𝔘", "\ufeff1", "1.0", "[-1]", "[0]", "lambda: 1", "__import__('os')",
]

junk_text = st.one_of(st.sampled_from(JUNK_VALUES), st.text(max_size=20))


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    """Apply a few random byte-level edits: insert/replace random bytes (non-UTF-8 too), delete, truncate."""
    if draw(st.integers(0, 15)) == 0:
        return draw(st.binary(max_size=200))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["insert", "replace", "delete", "truncate", "dup_line", "drop_line"]))
        pos = draw(st.integers(0, max(0, len(data))))
        if op == "insert":
            data = data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
        elif op == "replace":
            blob = draw(st.one_of(st.binary(min_size=1, max_size=8),
                                  st.sampled_from([b"\xff", b"\xc3", b"\x00", b",", b'"', b"\n", b"\r", b"\t",
                                                   b" ", b"[", b"]", b"'"])))
            data = data[:pos] + blob + data[pos + len(blob):]
        elif op == "delete":
            data = data[:pos] + data[pos + draw(st.integers(1, 20)):]
        elif op == "truncate":
            data = data[:pos]
        else:
            lines = data.split(b"\n")
            i = draw(st.integers(0, max(0, len(lines) - 1)))
            if op == "dup_line":
                lines.insert(i, lines[i])
            else:
                del lines[i]
            data = b"\n".join(lines)
    return data


@st.composite
def csv_cell_mutations(draw, text: str) -> str:
    """Rewrite one or more CSV cells (or the header) with junk, drop columns, add/remove fields."""
    rows = list(csv.reader(io.StringIO(text)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["cell", "cell", "cell", "drop_column", "rename_header", "short_row", "long_row"]))
        r = draw(st.integers(0, len(rows) - 1))
        if op == "cell" and rows[r]:
            c = draw(st.integers(0, len(rows[r]) - 1))
            rows[r][c] = draw(junk_text)
        elif op == "drop_column" and rows[0]:
            c = draw(st.integers(0, len(rows[0]) - 1))
            for row in rows:
                if c < len(row):
                    del row[c]
        elif op == "rename_header" and rows[0]:
            c = draw(st.integers(0, len(rows[0]) - 1))
            rows[0][c] = draw(junk_text)
        elif op == "short_row" and rows[r]:
            rows[r].pop()
        elif op == "long_row":
            rows[r].append(draw(junk_text))
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


@st.composite
def token_mutations(draw, text: str) -> str:
    """Rewrite tokens of a whitespace-separated sequence file: non-numeric ids, unknown items, ..."""
    lines = [line.split(" ") for line in text.split("\n")]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        j = draw(st.integers(0, max(0, len(lines[i]) - 1)))
        tok = draw(st.one_of(junk_text, st.sampled_from(["0", "77", "1.5", "-3", "1e3", "01", "+2"])))
        if lines[i]:
            lines[i][j] = tok
        else:
            lines[i] = [tok]
    return "\n".join(" ".join(t) for t in lines)


def corrupt_text(draw, text: str, structured) -> bytes:
    """Either structure-aware edits (cells/tokens) or raw byte edits, or both."""
    choice = draw(st.sampled_from([0, 0, 1, 2]))
    if choice in (0, 2):
        text = draw(structured(text))
    data = text.encode("utf-8")
    if choice in (1, 2):
        data = draw(byte_mutations(data))
    return data


# --------------------------------------------------------------------------- base files

D3_HEADER = ["user_id", "item_asins", "item_asin", "history_item_id", "item_id", "history_item_title",
             "item_title", "history_rating", "rating", "history_timestamp", "timestamp"]
D3_INFO = {"0": "Alpha", "1": "Beta", "2": "Gamma", "3": "Delta", "4": "Epsilon"}
D3_ROWS = {
    "train": [("u1", [0], 1, 10), ("u2", [1, 2], 3, 11), ("u1", [0, 1], 4, 12)],
    "valid": [("u1", [0, 1, 4], 2, 20), ("u3", [3], 0, 21)],
    "test": [("u2", [1, 2, 3], 4, 30), ("u3", [3, 0], 1, 31)],
}


def d3_split_text(rows) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(D3_HEADER)
    for user, hist, target, ts in rows:
        w.writerow([user, str([f"A{h}" for h in hist]), f"A{target}", str(hist), target,
                    str([D3_INFO[str(h)] for h in hist]), D3_INFO[str(target)], str([4.0] * len(hist)), 4.0,
                    str([ts - 1] * len(hist)), ts])
    return out.getvalue()


D3_INFO_TEXT = "".join(f"{t}\t{i}\n" for i, t in D3_INFO.items())
D3_TEXTS = {s: d3_split_text(r) for s, r in D3_ROWS.items()}

GEN_INTER = "user,item,timestamp\n" + "".join(
    f"{u},i{i},{t}\n" for t, (u, i) in enumerate(
        [("a", 1), ("a", 2), ("b", 1), ("a", 3), ("b", 2), ("c", 3), ("b", 4), ("a", 4), ("c", 1), ("c", 2)], 1))
GEN_ITEMS = "item,title\n" + "".join(f'i{k},"Title {k}, deluxe"\n' for k in range(1, 5))

SEQ_TITLES = {"1": "A game", "2": "B game", "3": "C game", "4": "D game", "5": "E game"}
SEQ_TEXTS = {"train": "1 1 2 3\n2 2 4\n3 5 1 2\n", "valid": "1 4\n2\n3 3\n", "test": "1 5\n2 1\n3\n"}
LOO_TEXT = "1 1 2 3 4\n2 2 4 5\n3 5 1 2 3\n"
ITEMS_JSONL = "".join(json.dumps({"seq_id": int(k), "title": v}) + "\n" for k, v in SEQ_TITLES.items())


def _write(root: Path, files: dict[str, bytes | str]) -> Path:
    for name, content in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return root


# --------------------------------------------------------------------------- sanity: the base files work


def test_base_files_prepare_cleanly(tmp_path: Path):
    d3 = _write(tmp_path / "d3", {"info/Cat.txt": D3_INFO_TEXT} | {f"{s}/Cat.csv": t for s, t in D3_TEXTS.items()})
    assert prepare(formats.read_d3_csv(d3, list(D3_TEXTS)), tmp_path / "o1")["rows"] == {
        "train": 3, "valid": 2, "test": 2}
    gen = _write(tmp_path / "gen", {"interactions.csv": GEN_INTER, "items.csv": GEN_ITEMS})
    for split in ("loo", "time"):
        prepare(formats.read_generic_csv(gen / "interactions.csv", gen / "items.csv", split=split),
                tmp_path / f"o2{split}")
    seq = _write(tmp_path / "seq", {f"sequential_{s}.txt": t for s, t in SEQ_TEXTS.items()}
                 | {"derived/items.jsonl": ITEMS_JSONL})
    prepare(formats.read_seq_txt(seq), tmp_path / "o3")
    loo = _write(tmp_path / "loo", {"sequential_data.txt": LOO_TEXT, "derived/items.jsonl": ITEMS_JSONL})
    prepare(formats.read_seq_txt(loo), tmp_path / "o4")


# --------------------------------------------------------------------------- d3-csv


@st.composite
def corrupted_d3(draw) -> dict[str, bytes | str]:
    files: dict[str, bytes | str] = {"info/Cat.txt": D3_INFO_TEXT}
    files |= {f"{s}/Cat.csv": t for s, t in D3_TEXTS.items()}
    targets = draw(st.lists(st.sampled_from(["train", "valid", "test", "info"]), min_size=1, max_size=2, unique=True))
    for t in targets:
        if t == "info":
            files["info/Cat.txt"] = corrupt_text(draw, D3_INFO_TEXT, token_mutations)
        else:
            files[f"{t}/Cat.csv"] = corrupt_text(draw, D3_TEXTS[t], csv_cell_mutations)
    return files


@FUZZ
@given(files=corrupted_d3(), max_history=st.sampled_from([0, 2, 50]))
def test_fuzz_d3_csv(files, max_history):
    with tempfile.TemporaryDirectory() as tmp:
        root = _write(Path(tmp) / "in", files)
        run_checked(lambda: prepare(formats.read_d3_csv(root, ["train", "valid", "test"]), Path(tmp) / "out",
                                    PrepareOptions(max_history=max_history)))


# --------------------------------------------------------------------------- generic csv


@st.composite
def corrupted_generic(draw) -> dict[str, bytes | str]:
    files: dict[str, bytes | str] = {"interactions.csv": GEN_INTER, "items.csv": GEN_ITEMS}
    for name in draw(st.lists(st.sampled_from(sorted(files)), min_size=1, max_size=2, unique=True)):
        files[name] = corrupt_text(draw, files[name], csv_cell_mutations)
    return files


@FUZZ
@given(files=corrupted_generic(), split=st.sampled_from(["loo", "time"]),
       on_unknown=st.sampled_from(["error", "skip"]), eval_rows=st.sampled_from(["all", "first"]))
def test_fuzz_generic_csv(files, split, on_unknown, eval_rows):
    with tempfile.TemporaryDirectory() as tmp:
        root = _write(Path(tmp) / "in", files)
        run_checked(lambda: prepare(
            formats.read_generic_csv(root / "interactions.csv", root / "items.csv", split=split,
                                     on_unknown=on_unknown),
            Path(tmp) / "out", PrepareOptions(eval_rows=eval_rows)))


# --------------------------------------------------------------------------- sequence files


@st.composite
def corrupted_seq(draw) -> dict[str, bytes | str]:
    loo = draw(st.booleans())
    files: dict[str, bytes | str] = {"derived/items.jsonl": ITEMS_JSONL}
    if loo:
        files["sequential_data.txt"] = LOO_TEXT
    else:
        files |= {f"sequential_{s}.txt": t for s, t in SEQ_TEXTS.items()}
    names = sorted(files)
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True)):
        if name.endswith(".jsonl"):
            files[name] = draw(jsonl_mutations(ITEMS_JSONL))
        else:
            files[name] = corrupt_text(draw, files[name], token_mutations)
    if draw(st.integers(0, 9)) == 0:  # a split file missing altogether
        victim = draw(st.sampled_from(names))
        del files[victim]
    return files


@st.composite
def jsonl_mutations(draw, text: str) -> bytes:
    lines = text.splitlines()
    i = draw(st.integers(0, len(lines) - 1))
    lines[i] = draw(st.one_of(
        st.sampled_from(['{"seq_id": 1}', '{"title": "x"}', "[1, 2]", "3", "null", '"s"', '{"seq_id": [1]}',
                         '{"seq_id": null, "title": 5}', '{"item_id": {"a": 1}, "title": ["t"]}', "{",
                         '{"seq_id": 9, "title": null}', '{"seq_id": "1", "title": "dup"}']),
        st.text(max_size=30),
    ))
    data = "\n".join(lines).encode("utf-8") + b"\n"
    if draw(st.booleans()):
        data = draw(byte_mutations(data))
    return data


@FUZZ
@given(files=corrupted_seq(), on_unknown=st.sampled_from(["error", "skip"]),
       eval_rows=st.sampled_from(["all", "first"]))
def test_fuzz_seq_txt(files, on_unknown, eval_rows):
    with tempfile.TemporaryDirectory() as tmp:
        root = _write(Path(tmp) / "in", files)
        run_checked(lambda: prepare(formats.read_seq_txt(root, "auto", on_unknown), Path(tmp) / "out",
                                    PrepareOptions(eval_rows=eval_rows)))


# --------------------------------------------------------------------------- recbole and amazon2023


REC_INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
    f"u{u}\t{i}\t4\t{t}\n" for t, (u, i) in enumerate([(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (2, 1)], 100))
REC_ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\n1\tOne\t1990\n2\tTwo\t1991\n3\tThree\t1992\n"


@FUZZ
@given(data=st.data())
def test_fuzz_recbole(data):
    files = {"x.inter": REC_INTER, "x.item": REC_ITEM}
    for name in data.draw(st.lists(st.sampled_from(sorted(files)), min_size=1, max_size=2, unique=True)):
        files[name] = corrupt_text(data.draw, files[name], token_mutations)
    with tempfile.TemporaryDirectory() as tmp:
        root = _write(Path(tmp) / "in", files)
        run_checked(lambda: prepare(formats.read_recbole(root), Path(tmp) / "out"))


AMZ_REVIEWS = [{"user_id": u, "parent_asin": a, "rating": 4.0, "timestamp": t}
               for t, (u, a) in enumerate([("u1", "B1"), ("u1", "B2"), ("u1", "B3"), ("u2", "B2"), ("u2", "B3"),
                                           ("u2", "B1")], 1000)]
AMZ_META = [{"parent_asin": a, "title": f"Game {a}"} for a in ("B1", "B2", "B3")]

json_junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
                      st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                           max_size=2))


@FUZZ
@given(data=st.data(), gz=st.booleans(), min_rating=st.sampled_from([None, 3.0]))
def test_fuzz_amazon2023(data, gz, min_rating):
    reviews = [dict(r) for r in AMZ_REVIEWS]
    meta = [dict(m) for m in AMZ_META]
    for _ in range(data.draw(st.integers(1, 3))):
        rows = data.draw(st.sampled_from([reviews, meta]))
        row = rows[data.draw(st.integers(0, len(rows) - 1))]
        if not row:
            continue
        key = data.draw(st.sampled_from(sorted(row)))
        if data.draw(st.booleans()):
            row[key] = data.draw(json_junk)
        else:
            del row[key]
    texts = {"V.jsonl": "".join(json.dumps(r) + "\n" for r in reviews),
             "meta_V.jsonl": "".join(json.dumps(m) + "\n" for m in meta)}
    files: dict[str, bytes] = {}
    for name, text in texts.items():
        raw = text.encode("utf-8")
        if data.draw(st.integers(0, 3)) == 0:
            raw = data.draw(byte_mutations(raw))
        if gz:
            raw = gzip.compress(raw, mtime=0)
            if data.draw(st.integers(0, 4)) == 0:  # a damaged archive
                raw = data.draw(byte_mutations(raw))
            name += ".gz"
        files[name] = raw
    with tempfile.TemporaryDirectory() as tmp:
        root = _write(Path(tmp) / "in", files)
        run_checked(lambda: prepare(formats.read_amazon2023(root, "V", split="loo", min_rating=min_rating),
                                    Path(tmp) / "out"))


# --------------------------------------------------------------------------- title maps (.npy)


@FUZZ
@given(blob=st.data())
def test_fuzz_title_map_npy(blob):
    buf = io.BytesIO()
    np.save(buf, {"id2title": {"1": "One", "2": "Two", "3": "Three"}}, allow_pickle=True)
    data = blob.draw(byte_mutations(buf.getvalue()))
    with tempfile.TemporaryDirectory() as tmp:
        root = _write(Path(tmp) / "in", {"title_maps.npy": data, "sequential_data.txt": "1 1 2 3\n2 3 2 1\n"})
        run_checked(lambda: prepare(formats.read_seq_txt(root), Path(tmp) / "out"))
