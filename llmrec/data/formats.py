"""Readers: each turns one source format into :class:`RawData`, the input of ``prepare``.

Every reader validates as it reads and raises :class:`DataFormatError` naming file, row (1-based
line, header included for CSV) and field. Nothing is cleaned here: cleaning and example forming
happen in :mod:`llmrec.data.prepare`, the same for every format. The one exception: an interaction repeated
exactly (same user, item and timestamp) is dropped by the readers that sort timestamped events (RecBole, CSV,
Amazon 2023) and counted (``duplicate_interactions_dropped``); Amazon 2018 keeps them, as D3's protocol does.

``RawData`` comes in one of three shapes:

* ``windows`` -- per user, interactions already cut into train/valid/test time windows
  (DEALRec Games sequence files; CSV/Amazon data split at global time cutoffs);
* ``loo``     -- per user, one chronological sequence split leave-one-out later;
* ``rows``    -- examples already formed per split (D3/BIGRec/LatentR3 CSV, raw Amazon 2018 via the
  D3 protocol).
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import math
import numbers
import re
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from llmrec.data.canonical import SPLITS, DataFormatError, check_no_lone_surrogates, json_id, loads_json_line

FORMATS = ("d3-csv", "seq-txt", "recbole", "csv", "amazon2018", "amazon2023")


@dataclass
class RawRow:
    user: str
    history: list[str]
    target: str
    timestamp: int | None


@dataclass
class RawData:
    """What a reader found, in source ids, before any cleaning."""

    titles: dict[str, str | None]
    mode: str  # "windows" | "loo" | "rows"
    # windows / loo: user -> split ("train"/"valid"/"test", or "all" for loo) -> [(item, timestamp)]
    sequences: dict[str, dict[str, list[tuple[str, int | None]]]] = field(default_factory=dict)
    rows: dict[str, list[RawRow]] = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    # Which items enter the catalogue: "data", those occurring in the rows/sequences read; "titles", every item of
    # the title source, where it is the protocol's candidate set (d3-csv's info file: D3/BIGRec decode over it)
    catalog_from: str = "data"


# --------------------------------------------------------------------------- helpers


def _lines(path: Path):
    """Yield (line number, text) and turn undecodable bytes into a DataFormatError for that line.

    A UTF-8 byte-order mark at the start (Excel writes one) is dropped: kept, it would glue itself to the
    first column's name and that column would be reported missing."""
    if not path.exists():
        raise FileNotFoundError(f"input file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        lines, n = iter(f), 0
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError, zlib.error) as e:  # a damaged or truncated .gz
                raise DataFormatError(path, n + 1, None, f"cannot read the file ({type(e).__name__}: {e})") from None
            n += 1
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(path, n, None, f"bytes that are not UTF-8 at offset {e.start}") from None


def _lines_ending_in_newlines(path: Path):
    """:func:`_lines` of a file whose lines must end with ``\n`` (or ``\r\n``): a lone ``\r`` inside a line (a file
    with ``\r`` line endings, read as one line) raises naming the file instead of a misleading error about the first
    line's fields (a review: "column named more than once in the header")."""
    for n, line in _lines(path):
        if "\r" in line.rstrip("\r\n"):
            raise DataFormatError(path, n, None, "a line break inside the line (a file with \\r line endings?): "
                                                 "lines must end with \\n or \\r\\n")
        yield n, line


# csv's default field size limit (131072 characters) refused a long field (an item's description) as "bad CSV".
# 2**31 - 1: the largest limit a C long holds on every platform (sys.maxsize overflows where a long is 32 bits).
_CSV_FIELD_LIMIT = 2**31 - 1


def _next_record(reader) -> list[str]:
    """``next(reader)`` with long fields accepted. The limit is process-wide state of the csv module: it is raised
    only for this call and then restored, so that reading a dataset changes nothing for other csv users."""
    old = csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        return next(reader)
    finally:
        csv.field_size_limit(old)


def _csv_rows(path: Path, delimiter: str = ","):
    """Yield (line number, dict row) of a CSV file with a header, with per-row decoding errors.

    The line number is the line where the record starts: a quoted field may span lines, and an unclosed
    quote swallows the lines after it, so the start is where to look. Parsing is strict: an unclosed quote that
    runs to the end of the file, or a closing quote followed by more text, is an error -- the lenient parser
    silently made the rest of the file one field (an unclosed quote in the last column: one title holding every
    later record, whose items vanished).
    """
    text_lines = (line for _, line in _lines(path))
    reader = csv.reader(text_lines, delimiter=delimiter, strict=True)
    try:
        header = _next_record(reader)
    except StopIteration:
        raise DataFormatError(path, 1, None, "empty file (no header)") from None
    except csv.Error as e:
        raise DataFormatError(path, 1, None, f"bad CSV header ({e})") from None
    header = [h.strip() for h in header]
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:  # a dict row would silently keep the last of them
        raise DataFormatError(path, 1, repeated[0], f"column named more than once in the header: {', '.join(repeated)}")
    while True:
        start = reader.line_num + 1  # blank lines are records of their own ([]), so this stays exact
        try:
            values = _next_record(reader)
        except StopIteration:
            return
        except csv.Error as e:
            spans = f"; the record runs to line {reader.line_num}: an unclosed quote?" if reader.line_num > start else ""
            raise DataFormatError(path, start, None, f"bad CSV ({e}{spans})") from None
        except DataFormatError:
            raise
        if not values:
            continue
        if len(values) != len(header):
            spans = f" (the record runs to line {reader.line_num}: an unclosed quote?)" if reader.line_num > start else ""
            raise DataFormatError(path, start, None, f"{len(values)} fields where the header has {len(header)}{spans}")
        yield start, dict(zip(header, values))


def _require(row: dict, key: str, path: Path, n: int) -> str:
    if key not in row:
        raise DataFormatError(path, n, key, "missing column")
    return row[key]


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _check_id(value: str, path: Path, n: int, fld: str) -> str:
    """A user or item id read from a text field: not empty, and no line break or other control character --
    an id read from a CSV field with a newline in it means an unclosed quote merged several records into one.
    Returns ``value`` unchanged."""
    if not value.strip():
        raise DataFormatError(path, n, fld, "empty id")
    if _CONTROL_RE.search(value):
        hint = " (an unclosed quote on this line?)" if "\n" in value else ""
        raise DataFormatError(path, n, fld, f"id {value[:40]!r} contains a line break or control character{hint}")
    return value


_INT_RE = re.compile(r"[+-]?[0-9]+(?:\.0+)?")  # [0-9]: ASCII digits only (int() also takes "١٢")


def _int(value, path: Path, n: int, fld: str) -> int:
    """An integer field: ``12``, ``"12"``, ``"+12"``, or with a zero fraction (``12.0``, ``"12.0"``, as files written
    through floats have them). Exact for integers beyond 2**53 (nanosecond timestamps): a string is never read
    through a float, and a float beyond 2**53 (which may already be rounded) is an error. Anything else is an
    error, ``"1.5"``, ``"1e3"`` and ``"1_000"`` too (``float()`` took the last two, rounding big ones)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, float):
            if not value.is_integer() or abs(value) > 2**53:
                raise ValueError
            return int(value)
        if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
            return int(value.strip().split(".", 1)[0])
        raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise DataFormatError(path, n, fld, f"expected an integer, got {str(value)[:40]!r}") from None


def _timestamp(value, path: Path, n: int, fld: str) -> int:
    """A timestamp field: an integer as :func:`_int` reads it, within the int64 range the prepared files hold
    (``load_prepared`` refuses anything else, and then names the prepared file instead of this input row)."""
    ts = _int(value, path, n, fld)
    if not -(2**63) <= ts < 2**63:
        raise DataFormatError(path, n, fld, f"timestamp {ts} is outside the 64-bit integer range")
    return ts


def _set_title(titles: dict[str, str | None], item: str, title: str | None, path: Path, n: int, fld: str) -> None:
    """Record an item's title; the same id again with another title is an error (which one holds?), with the same
    title it is harmless."""
    if item in titles and titles[item] != title:
        raise DataFormatError(path, n, fld, f"item {item} appears twice with different titles "
                                            f"({titles[item]!r}, {title!r})")
    titles[item] = title


def _json_title(obj: dict, path: Path, n: int, fld: str = "title") -> str | None:
    """The title of a JSON record: a string, or ``None`` when null or absent (a missing title, which ``prepare``
    drops and counts). Anything else is an error: ``str()`` would make ``["A", "B"]`` the title "['A', 'B']"."""
    title = obj.get(fld)
    if title is not None and not isinstance(title, str):
        raise DataFormatError(path, n, fld, f"expected a string or null, got {json.dumps(title)[:40]}")
    return title


def _npy_title(value, path: Path, key: str, item) -> str | None:
    """A title from a pickled title map: a string, or ``None`` for a missing one (``None`` or pandas' NaN). Anything
    else is an error: ``str()`` made NaN the title "nan" and bytes the title "b'...'"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not isinstance(value, str):  # numpy's str_ is a str
        raise DataFormatError(path, None, key, f"the title of item {str(item)[:40]!r} is {type(value).__name__}, "
                                               "not a string")
    try:  # a pickle keeps an unpaired UTF-16 surrogate, which failed writing the catalogue with a bare UnicodeEncodeError
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataFormatError(path, None, key, f"the title of item {str(item)[:40]!r} holds an unpaired UTF-16 "
                                               f"surrogate ({e.object[e.start]!a}): not Unicode text") from None
    return str(value)


def _literal_list(value: str, path: Path, n: int, fld: str) -> list:
    # ast.literal_eval evaluates literals only: never eval() data.
    try:
        out = ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # TypeError: {[1]: 2}
        raise DataFormatError(path, n, fld, f"not a list literal: {value[:60]!r}") from None
    if not isinstance(out, (list, tuple)):
        raise DataFormatError(path, n, fld, f"expected a list literal, got {type(out).__name__}")
    return list(out)


def _one_file(directory: Path, pattern: str, what: str, category: str | None) -> Path:
    files = sorted(directory.glob(pattern))
    if category:
        # A name that is exactly the category wins: "Toys" picks Toys.txt beside Toys_and_Games.txt.
        exact = [f for f in files if f.stem == category or f.name == category]
        files = exact or [f for f in files if f.name.startswith(category)]
    if not files:
        raise FileNotFoundError(f"{directory}: no {what} file matching '{pattern}'" + (f" for '{category}'" if category else ""))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ValueError(f"{directory}: several {what} files ({names}); pick one with --category")
    return files[0]


# --------------------------------------------------------------------------- D3 / BIGRec / LatentR3 CSV


def _check_row_title(title, expected: str | None, item: str, path: Path, n: int, fld: str, info: Path) -> None:
    if str(title).strip() != (expected or "").strip():
        raise DataFormatError(path, n, fld, f"title {str(title)[:60]!r} of item {item} differs from {info.name}'s "
                                            f"{(expected or '')[:60]!r}: the info file is not this data's")


def read_d3_csv(input_dir: Path, splits: list[str], category: str | None = None) -> RawData:
    """D3/BIGRec/LatentR3 layout: ``info/<cat>.txt`` (``title<TAB>id``) + ``<split>/<cat>.csv``."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:  # a dev/ folder was read as a split of that name, which prepare then wrote as dev.jsonl
        raise ValueError(f"unknown split(s) {', '.join(unknown)}: the splits are {', '.join(SPLITS)}")
    info = _one_file(input_dir / "info", "*.txt", "info", category)
    titles: dict[str, str | None] = {}
    for n, line in _lines_ending_in_newlines(info):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataFormatError(info, n, None, "expected 'title<TAB>item_id'")
        title, item = line.rsplit("\t", 1)
        # as an integer, the way the rows' ids are read below: "01" kept as text never matched a row's 1
        item = str(_int(item, info, n, "item_id"))
        if item in titles:
            raise DataFormatError(info, n, "item_id", f"item id {item} appears twice")
        titles[item] = title
    # the split files carry the info file's name: --category may be only a prefix of it
    cat = info.stem
    # The info file is the item universe D3/BIGRec/LatentR3 decode over: its items are the catalogue whichever splits
    # are read (from valid,test alone, the ~5% of the CDs items that occur only in train were missing)
    raw = RawData(titles=titles, mode="rows", source={"format": "d3-csv", "info": str(info)}, catalog_from="titles")
    for split in splits:
        path = input_dir / split / f"{cat}.csv"
        if not path.exists():
            raise FileNotFoundError(
                f"{input_dir}: split '{split}' is missing ({path} not found); "
                "name the splits that exist with --splits (e.g. --splits valid,test)"
            )
        rows = []
        for n, row in _csv_rows(path):
            # stripped, as the item ids beside it (read as integers) and the other CSV readers' user ids are: " u1"
            # after a ", " separator was another user than "u1"
            user = _check_id(_require(row, "user_id", path, n), path, n, "user_id").strip()
            hist = [str(_int(x, path, n, "history_item_id")) for x in _literal_list(_require(row, "history_item_id", path, n), path, n, "history_item_id")]
            target = str(_int(_require(row, "item_id", path, n), path, n, "item_id"))
            ts = _timestamp(_require(row, "timestamp", path, n), path, n, "timestamp")
            for item, fld in [(i, "history_item_id") for i in hist] + [(target, "item_id")]:
                if item not in titles:
                    raise DataFormatError(path, n, fld, f"item {item} is not in {info.name}")
            # The rows' own titles must be the info file's for the same ids: an info file from another
            # preprocessing run maps every id to another item's title, which nothing else would notice.
            if "history_item_title" in row:
                htitles = _literal_list(row["history_item_title"], path, n, "history_item_title")
                if len(htitles) != len(hist):
                    raise DataFormatError(path, n, "history_item_title", "length differs from history_item_id")
                for pos, (item, t) in enumerate(zip(hist, htitles)):
                    _check_row_title(t, titles[item], item, path, n, f"history_item_title[{pos}]", info)
            if "item_title" in row:
                _check_row_title(row["item_title"], titles[target], target, path, n, "item_title", info)
            rows.append(RawRow(user, hist, target, ts))
        raw.rows[split] = rows
    return raw


# --------------------------------------------------------------------------- sequence text + title map


# Characters str.split() and str.splitlines() take for line breaks, besides the "\n" (or "\r\n") that ends a line.
_INNER_BREAK_RE = re.compile(r"[\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def _seq_file(path: Path, split: str, known: dict, seqs: dict, on_unknown: str, skipped: dict) -> None:
    for n, line in _lines(path):
        # str.split() splits at a "\r" too: a file with "\r" line endings was read as one line, every other user
        # (and its id) merged into the first user's sequence
        if _INNER_BREAK_RE.search(line.rstrip("\r\n")):
            raise DataFormatError(path, n, None, "a line break inside the line (a file with \\r line endings?): "
                                                 "lines must end with \\n or \\r\\n")
        parts = line.split()
        if not parts:
            continue
        # as an integer: "1.0" or "01" kept as text would be another user than the "1" of the other files
        user = str(_int(parts[0], path, n, "user_id"))
        items = []
        for pos, tok in enumerate(parts[1:], start=1):
            _int(tok, path, n, f"item {pos}")
            if tok not in known:
                if on_unknown == "skip":
                    skipped["unknown_item_interactions"] = skipped.get("unknown_item_interactions", 0) + 1
                    continue
                raise DataFormatError(path, n, f"item {pos}", f"item {tok} has no title in the title map")
            items.append((tok, None))
        entry = seqs.setdefault(user, {})
        if split in entry:
            raise DataFormatError(path, n, "user_id", f"user {user} appears twice")
        entry[split] = items


def read_seq_titles(input_dir: Path, titles_from: str = "auto") -> dict[str, str | None]:
    """Title map of a DEALRec/TransRec folder: ``title_maps.npy`` (restricted unpickler) or
    ``derived/items.jsonl``. Keys are the ids used in the sequence files."""
    npy = input_dir / "title_maps.npy"
    jsonl = input_dir / "derived" / "items.jsonl"
    if titles_from == "auto":
        titles_from = "npy" if npy.exists() else "jsonl"
    if titles_from == "npy":
        from llmrec.data.safe_npy import load_npy_restricted

        maps = load_npy_restricted(npy) if npy.exists() else None
        if maps is None:
            raise FileNotFoundError(f"title map not found: {npy}")
        if not isinstance(maps, dict):
            raise DataFormatError(npy, None, None, "expected a pickled dict of title maps")
        for key in ("seqid2title", "id2title"):
            if key in maps:
                if not isinstance(maps[key], dict):
                    raise DataFormatError(npy, None, key, f"expected a dict, got {type(maps[key]).__name__}")
                titles: dict[str, str | None] = {}
                for k, v in maps[key].items():  # _set_title: the keys 1 and "1" are one id once made strings
                    _set_title(titles, str(k), _npy_title(v, npy, key, k), npy, None, key)
                return titles
        raise DataFormatError(npy, None, None, f"no 'seqid2title' or 'id2title' map (keys: {list(maps)})")
    if titles_from == "jsonl":
        titles: dict[str, str | None] = {}
        for n, obj in _jsonl_objects(jsonl):
            key = "seq_id" if "seq_id" in obj else "item_id"
            if key not in obj:
                raise DataFormatError(jsonl, n, "item_id", "missing (expected seq_id or item_id)")
            _set_title(titles, json_id(obj[key], jsonl, n, key), _json_title(obj, jsonl, n), jsonl, n, key)
        return titles
    raise ValueError(f"--titles-from must be auto, npy or jsonl, got {titles_from!r}")


def read_seq_txt(input_dir: Path, titles_from: str = "auto", on_unknown: str = "error", splits: list[str] | None = None) -> RawData:
    """DEALRec time-split (``sequential_{train,valid,test}.txt``) or TransRec leave-one-out
    (``sequential_data.txt``) sequence files, with their title map."""
    titles = read_seq_titles(input_dir, titles_from)
    seqs: dict[str, dict] = {}
    skipped: dict[str, int] = {}
    if (input_dir / "sequential_data.txt").exists():
        _seq_file(input_dir / "sequential_data.txt", "all", titles, seqs, on_unknown, skipped)
        mode = "loo"
    else:
        mode = "windows"
        named = splits or list(SPLITS)
        unknown = [s for s in named if s not in SPLITS]
        if unknown:
            raise ValueError(f"unknown split(s) {', '.join(unknown)}: the splits are {', '.join(SPLITS)}")
        # A split's histories hold every earlier window: reading only the named files (--splits valid,test) made
        # the valid and test histories silently lose the user's train items. So every window up to the last
        # named one is read; only the named splits are written (prepare's `splits`).
        last = max(SPLITS.index(s) for s in named)
        for split in SPLITS[: last + 1]:
            path = input_dir / f"sequential_{split}.txt"
            if not path.exists():
                why = "" if split in named else f" (its items begin the histories of the '{SPLITS[last]}' rows)"
                raise FileNotFoundError(
                    f"{input_dir}: split '{split}' is missing ({path.name} not found){why}; "
                    "name the splits that exist with --splits"
                )
            _seq_file(path, split, titles, seqs, on_unknown, skipped)
    return RawData(titles=titles, mode=mode, sequences=seqs, skipped=skipped, source={"format": "seq-txt"})


# --------------------------------------------------------------------------- RecBole atomic files


def _recbole_header(path: Path, header_line: str) -> dict[str, int]:
    cols: dict[str, int] = {}
    for i, h in enumerate(header_line.rstrip("\r\n").split("\t")):
        name = h.split(":", 1)[0].strip()
        # as the CSV readers: a name given twice kept only its last column, and every row was then blamed for
        # having one field more than the header ("4 fields where the header has 3")
        if name in cols:
            raise DataFormatError(path, 1, name, "column named more than once in the header")
        cols[name] = i
    return cols


def read_recbole(input_dir: Path, name: str | None = None, on_unknown: str = "error") -> RawData:
    """RecBole atomic ``<name>.inter`` + ``<name>.item`` (tab-separated, typed header)."""
    inter = _one_file(input_dir, "*.inter", ".inter", name)
    item = inter.with_suffix(".item")
    if not item.exists():
        raise FileNotFoundError(f"item file not found: {item}")
    titles: dict[str, str | None] = {}
    lines = _lines_ending_in_newlines(item)
    try:
        _, header = next(lines)
    except StopIteration:
        raise DataFormatError(item, 1, None, "empty file (no header)") from None
    cols = _recbole_header(item, header)
    if "item_id" not in cols:
        raise DataFormatError(item, 1, "item_id", "missing column")
    # "title" itself, else one name ending in "_title" (movie_title): a first column merely containing
    # "title" (title_len, subtitle) was taken before, its values becoming every item's title.
    title_cols = [c for c in cols if c == "title"] or [c for c in cols if c.endswith("_title")]
    if not title_cols:
        raise DataFormatError(item, 1, "title", "no title column (expected 'title' or a name ending in '_title', "
                                                "e.g. movie_title:token_seq)")
    if len(title_cols) > 1:
        raise DataFormatError(item, 1, "title", f"several title columns ({', '.join(title_cols)}): keep one")
    title_col = title_cols[0]
    for n, line in lines:
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        # as in the .inter file: a tab inside a title made an extra field and cut the title at it, silently
        if len(parts) != len(cols):
            raise DataFormatError(item, n, None, f"{len(parts)} fields where the header has {len(cols)}")
        it = _check_id(parts[cols["item_id"]], item, n, "item_id").strip()
        _set_title(titles, it, parts[cols[title_col]], item, n, "item_id")
    seqs: dict[str, dict] = {}
    skipped: dict[str, int] = {}
    lines = _lines_ending_in_newlines(inter)
    try:
        _, header = next(lines)
    except StopIteration:
        raise DataFormatError(inter, 1, None, "empty file (no header)") from None
    cols = _recbole_header(inter, header)
    for key in ("user_id", "item_id", "timestamp"):
        if key not in cols:
            raise DataFormatError(inter, 1, key, "missing column")
    events: dict[str, list] = defaultdict(list)
    for n, line in lines:
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != len(cols):
            raise DataFormatError(inter, n, None, f"{len(parts)} fields where the header has {len(cols)}")
        # an empty id would become the user "" / item "": one user for every such row
        user = _check_id(parts[cols["user_id"]], inter, n, "user_id").strip()
        it = _check_id(parts[cols["item_id"]], inter, n, "item_id").strip()
        ts = _timestamp(parts[cols["timestamp"]], inter, n, "timestamp")
        if it not in titles:
            if on_unknown == "skip":
                skipped["unknown_item_interactions"] = skipped.get("unknown_item_interactions", 0) + 1
                continue
            raise DataFormatError(inter, n, "item_id", f"item {it} is not in {item.name}")
        events[user].append((ts, n, it))
    _drop_repeated_events(events, skipped)
    for user, ev in events.items():
        ev.sort(key=lambda e: (e[0], e[1]))  # by time; ties keep file order (stable, fixed)
        seqs[user] = {"all": [(it, ts) for ts, _, it in ev]}
    return RawData(titles=titles, mode="loo", sequences=seqs, skipped=skipped, source={"format": "recbole", "inter": str(inter)})


# --------------------------------------------------------------------------- generic CSV and Amazon 2023


def _drop_repeated_events(events: dict[str, list[tuple[int, int, str]]], skipped: dict[str, int]) -> None:
    """Drop, in place, every ``(timestamp, line, item)`` event that repeats an earlier one of the same user exactly
    (the same item at the same timestamp), keeping the first in file order, and count them in
    ``skipped["duplicate_interactions_dropped"]`` (only when there are some, as the other skip counts). Kept, such a
    repeat made a leave-one-out test target the very event that ends its own history. The same item at another
    timestamp is another interaction and stays."""
    dropped = 0
    for user, ev in events.items():
        seen: set[tuple[int, str]] = set()
        kept = []
        for e in ev:
            key = (e[0], e[2])
            if key in seen:
                dropped += 1
                continue
            seen.add(key)
            kept.append(e)
        events[user] = kept
    if dropped:
        skipped["duplicate_interactions_dropped"] = skipped.get("duplicate_interactions_dropped", 0) + dropped


def skip_counts_text(skipped: dict[str, int]) -> str:
    """``"reason n, ..."`` of the non-zero skip counts, for error messages (``"nothing"`` if none)."""
    return ", ".join(f"{k} {v:,}" for k, v in sorted(skipped.items()) if v) or "nothing"


def _events_to_sequences(
    events: dict[str, list[tuple[int, int, str]]], split: str, valid_ratio: float, test_ratio: float,
    cutoffs: tuple[int, int] | None, source: Path | None = None, skipped: dict[str, int] | None = None,
) -> tuple[str, dict]:
    """Order each user's events by (time, file order); split leave-one-out or at global time cutoffs.

    For ``time``: the cutoffs are the timestamps at the (1 - valid - test) and (1 - test) quantiles of
    all interactions (or the given absolute ``cutoffs``); an interaction goes to train if
    ts < t1, valid if t1 <= ts < t2, test if ts >= t2.
    """
    for ev in events.values():
        ev.sort(key=lambda e: (e[0], e[1]))
    if split == "loo":
        return "loo", {u: {"all": [(it, ts) for ts, _, it in ev]} for u, ev in events.items()}
    if split != "time":
        raise ValueError(f"--split must be 'loo' or 'time', got {split!r}")
    if cutoffs is None:
        if not (valid_ratio >= 0 and test_ratio >= 0 and valid_ratio + test_ratio < 1):
            raise ValueError(f"--valid-ratio {valid_ratio} and --test-ratio {test_ratio}: each must be >= 0 and "
                             "their sum < 1")
        all_ts = sorted(ts for ev in events.values() for ts, _, _ in ev)
        if not all_ts:  # say why: the readers' skip counts (the bare message named neither file nor cause)
            raise ValueError(f"{source or 'the input'}: no interactions to split"
                             + (f" (skipped while reading: {skip_counts_text(skipped)})" if skipped else " (no rows)"))

        def cutoff(train_share: float) -> float:
            # The timestamp of the first interaction after the first `train_share` of them (+1e-9: 30 * 0.9 is
            # 26.999999999999996 in floats); none left (a ratio of 0): nothing goes past it.
            i = math.floor(len(all_ts) * train_share + 1e-9)
            return all_ts[i] if i < len(all_ts) else math.inf

        t1, t2 = cutoff(1 - valid_ratio - test_ratio), cutoff(1 - test_ratio)
    else:
        t1, t2 = cutoffs
    seqs = {}
    for u, ev in events.items():
        w = {"train": [], "valid": [], "test": []}
        for ts, _, it in ev:
            w["train" if ts < t1 else "valid" if ts < t2 else "test"].append((it, ts))
        seqs[u] = w
    return "windows", seqs


def read_generic_csv(
    interactions: Path, items: Path, split: str = "loo", valid_ratio: float = 0.1, test_ratio: float = 0.1,
    cutoffs: tuple[int, int] | None = None, on_unknown: str = "error",
    columns: tuple[str, str, str, str, str] = ("user", "item", "timestamp", "item", "title"),
) -> RawData:
    """A pair of CSV files: interactions (user, item, timestamp) and items (item, title)."""
    u_col, i_col, t_col, item_col, title_col = columns
    titles: dict[str, str | None] = {}
    for n, row in _csv_rows(items):
        it = _check_id(_require(row, item_col, items, n), items, n, item_col).strip()
        if it in titles:
            raise DataFormatError(items, n, item_col, f"item {it} appears twice")
        titles[it] = _require(row, title_col, items, n)
    events: dict[str, list] = defaultdict(list)
    skipped: dict[str, int] = {}
    for n, row in _csv_rows(interactions):
        user = _check_id(_require(row, u_col, interactions, n), interactions, n, u_col).strip()
        it = _check_id(_require(row, i_col, interactions, n), interactions, n, i_col).strip()
        ts = _timestamp(_require(row, t_col, interactions, n), interactions, n, t_col)
        if it not in titles:
            if on_unknown == "skip":
                skipped["unknown_item_interactions"] = skipped.get("unknown_item_interactions", 0) + 1
                continue
            raise DataFormatError(interactions, n, i_col, f"item {it!r} is not in {items.name}")
        events[user].append((ts, n, it))
    _drop_repeated_events(events, skipped)
    mode, seqs = _events_to_sequences(events, split, valid_ratio, test_ratio, cutoffs, interactions, skipped)
    return RawData(titles=titles, mode=mode, sequences=seqs, skipped=skipped, source={"format": "csv", "split": split})


def _jsonl_objects(path: Path):
    for n, line in _lines(path):
        if not line.strip():
            continue
        obj = loads_json_line(line, path, n)
        if not isinstance(obj, dict):
            raise DataFormatError(path, n, None, "expected a JSON object")
        check_no_lone_surrogates(line, obj, path, n)
        yield n, obj


def _find(directory: Path, stems: list[str]) -> Path:
    for stem in stems:
        for suffix in ("", ".gz"):
            p = directory / f"{stem}{suffix}"
            if p.exists():
                return p
    raise FileNotFoundError(f"{directory}: none of {', '.join(stems)} (or .gz) found")


def read_amazon2023(
    input_dir: Path, category: str, split: str = "time", valid_ratio: float = 0.1, test_ratio: float = 0.1,
    cutoffs: tuple[int, int] | None = None, min_rating: float | None = None, on_unknown: str = "skip",
) -> RawData:
    """Amazon Reviews 2023: ``<Category>.jsonl`` (user_id, parent_asin, rating, timestamp in ms) and
    ``meta_<Category>.jsonl`` (parent_asin, title). Items without metadata are skipped by this function's default
    (counted), as ReaRec requires items to have a title; ``llmrec data prepare`` passes its ``--on-unknown-item``,
    whose default is ``error`` for every format (pass ``skip`` there for ReaRec's behaviour)."""
    reviews = _find(input_dir, [f"{category}.jsonl"])
    meta = _find(input_dir, [f"meta_{category}.jsonl"])
    titles: dict[str, str | None] = {}
    for n, obj in _jsonl_objects(meta):
        if "parent_asin" not in obj:
            raise DataFormatError(meta, n, "parent_asin", "missing")
        _set_title(titles, json_id(obj["parent_asin"], meta, n, "parent_asin"), _json_title(obj, meta, n), meta, n,
                   "parent_asin")
    events: dict[str, list] = defaultdict(list)
    skipped: dict[str, int] = {}
    for n, obj in _jsonl_objects(reviews):
        for key in ("user_id", "parent_asin", "timestamp"):
            if key not in obj:
                raise DataFormatError(reviews, n, key, "missing")
        # json_id, not str(): str(None) would make every null id one item (or user) "None"
        user = json_id(obj["user_id"], reviews, n, "user_id")
        it = json_id(obj["parent_asin"], reviews, n, "parent_asin")
        if min_rating is not None:
            if "rating" not in obj:
                raise DataFormatError(reviews, n, "rating", "missing")
            value = obj["rating"]
            # float() took `true` as 1.0, and NaN (JSON's NaN or "nan") is a rating no threshold removes
            try:
                rating = math.nan if isinstance(value, bool) else float(value)
            except (TypeError, ValueError):
                rating = math.nan
            if not math.isfinite(rating):
                raise DataFormatError(reviews, n, "rating", f"expected a finite number, got {json.dumps(value)[:40]}")
            if rating < min_rating:
                skipped["below_min_rating"] = skipped.get("below_min_rating", 0) + 1
                continue
        if it not in titles:
            if on_unknown == "skip":
                skipped["unknown_item_interactions"] = skipped.get("unknown_item_interactions", 0) + 1
                continue
            raise DataFormatError(reviews, n, "parent_asin", f"item {it} has no metadata in {meta.name}")
        events[user].append((_timestamp(obj["timestamp"], reviews, n, "timestamp"), n, it))
    _drop_repeated_events(events, skipped)
    mode, seqs = _events_to_sequences(events, split, valid_ratio, test_ratio, cutoffs, reviews, skipped)
    return RawData(titles=titles, mode=mode, sequences=seqs, skipped=skipped, source={"format": "amazon2023", "category": category})


# --------------------------------------------------------------------------- raw Amazon 2018 (D3 protocol)


def _d3_clean_title(title) -> str | None:
    """D3's title filter, as its ``process.py`` has it: drop missing and ``<span id`` titles; replace ``&quot;``
    and ``&amp;`` (no other entity: ``&#39;`` stays, as in D3's item set); strip spaces, then double quotes; keep
    2+ characters and at most 20 space-separated words (``split(" ")``: a double space counts an empty word).
    A fuller clean-up would keep or drop other titles than D3, and so change the k-core and every row."""
    if not isinstance(title, str) or "<span id" in title:
        return None
    t = title.replace("&quot;", '"').replace("&amp;", "&").strip(" ").strip('"')
    if len(t) <= 1 or len(t.split(" ")) > 20:
        return None
    return t


def _kcore(events: list[tuple[str, str, int, int]], k: int) -> list:
    while True:
        uc: dict[str, int] = defaultdict(int)
        ic: dict[str, int] = defaultdict(int)
        for u, i, _, _ in events:
            uc[u] += 1
            ic[i] += 1
        kept = [e for e in events if uc[e[0]] >= k and ic[e[1]] >= k]
        if len(kept) == len(events):
            return kept
        events = kept


def read_amazon2018(
    input_dir: Path, category: str, start: str = "2017-10", end: str = "2018-11", min_items: int = 5000,
    widen_months: int = 3, kcore: int = 5, max_history: int = 10, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> RawData:
    """Raw Amazon Reviews 2018 json/json.gz + meta, processed as D3/LatentR3's ``process.py``:
    time window [start, end] in UTC (D3 drops only reviews after the end), title filter, iterative k-core, widen the window back by
    ``widen_months`` until there are ``min_items`` items (or the data runs out), one example per
    position with the previous <= ``max_history`` items (D3: 10; 0 = all), global 80/10/10 by target time.

    Reviews repeated exactly (same reviewer, item and time; the 2018 files have some) are kept, as D3 keeps them
    (the LatentR3 CDs data has rows whose target is the last history item's very review): dropping them would
    change the k-core and so every row of the protocol. They are counted in ``skipped`` as
    ``duplicate_interactions_kept``; the other readers drop them."""
    if max_history < 0:  # ev[pos - max_history:pos] would silently be another window
        raise ValueError(f"max_history must be >= 0 (0 = all), got {max_history}")
    reviews = _find(input_dir, [f"{category}_5.json", f"{category}.json"])
    meta = _find(input_dir, [f"meta_{category}.json"])
    raw_titles: dict[str, str | None] = {}
    usable: dict[str, str] = {}  # asin -> its last usable title
    unusable: set[str] = set()  # asins with an entry whose title D3 drops
    conflicts = 0
    for n, obj in _jsonl_objects(meta):
        if "asin" not in obj:
            raise DataFormatError(meta, n, "asin", "missing")
        asin = json_id(obj["asin"], meta, n, "asin")
        # The 2018 meta files repeat asins. D3 reads them in order: an entry with an unusable title puts the asin
        # on its removal list for good (a later good entry does not take it off), and of the usable titles the last
        # wins. So do we (the protocol's items and titles), counting the repeats whose title differs.
        conflicts += asin in raw_titles and raw_titles[asin] != obj.get("title")
        raw_titles[asin] = obj.get("title")
        if (clean := _d3_clean_title(obj.get("title"))) is None:
            unusable.add(asin)
        else:
            usable[asin] = clean
    titles = {a: t for a, t in usable.items() if a not in unusable}
    all_events = []
    for n, obj in _jsonl_objects(reviews):
        for key in ("reviewerID", "asin", "unixReviewTime"):
            if key not in obj:
                raise DataFormatError(reviews, n, key, "missing")
        all_events.append((json_id(obj["reviewerID"], reviews, n, "reviewerID"), json_id(obj["asin"], reviews, n, "asin"),
                           _int(obj["unixReviewTime"], reviews, n, "unixReviewTime"), n))

    def month_ts(ym: tuple[int, int]) -> int:
        # UTC (Amazon's unixReviewTime values are midnight-UTC day stamps): D3's code uses the local time of the
        # machine it runs on, which would make the window, and so the splits, depend on where this runs.
        return int(datetime(ym[0], ym[1], 1, tzinfo=timezone.utc).timestamp())

    sy, sm = (int(x) for x in start.split("-"))
    ey, em = (int(x) for x in end.split("-"))
    earliest = min((e[2] for e in all_events), default=0)
    while True:
        lo, hi = month_ts((sy, sm)), month_ts((ey, em))
        # D3 drops only reviews after the end (ts > end): one at exactly the end's midnight is kept
        in_window = [e for e in all_events if lo <= e[2] <= hi]
        titled = [e for e in in_window if titles.get(e[1])]
        events = _kcore(titled, kcore)
        n_items = len({e[1] for e in events})
        if n_items >= min_items or lo <= earliest:
            break
        sm -= widen_months
        while sm <= 0:
            sm += 12
            sy -= 1
    items = sorted({e[1] for e in events})  # D3 numbers items in a seeded shuffle; the catalogue keeps raw-id order
    # Users in the order of their first review in the file (D3 builds a dict of them): the stable sort by target
    # time below keeps that order among rows of the same day, which decides the rows at the split points.
    by_user: dict[str, list] = defaultdict(list)
    for u, i, ts, n in sorted(events, key=lambda e: e[3]):
        by_user[u].append((ts, n, i))
    samples = []
    for u in by_user:
        ev = sorted(by_user[u], key=lambda e: (e[0], e[1]))
        for pos in range(1, len(ev)):
            hist = [i for _, _, i in ev[max(0, pos - max_history) if max_history > 0 else 0:pos]]
            samples.append(RawRow(u, hist, ev[pos][2], ev[pos][0]))
    samples.sort(key=lambda r: r.timestamp)  # stable: ties keep user/position order
    n = len(samples)
    a, b = int(n * ratios[0]), int(n * (ratios[0] + ratios[1]))
    rows = {"train": samples[:a], "valid": samples[a:b], "test": samples[b:]}
    kept_titles = {i: titles[i] for i in items}
    window = f"{sy}-{sm}-{ey}-{em}"
    skipped = {"meta_asin_title_conflicts_last_kept": conflicts} if conflicts else {}
    if usable.keys() & unusable:  # their reviews are in reviews_item_without_usable_title
        skipped["meta_asin_dropped_for_an_unusable_entry"] = len(usable.keys() & unusable)
    # The protocol's filters, counted for stats.json (the final window's): every raw review is in a row or here.
    for key, n_dropped in (("reviews_outside_window", len(all_events) - len(in_window)),
                           ("reviews_item_without_usable_title", len(in_window) - len(titled)),
                           ("reviews_removed_by_kcore", len(titled) - len(events))):
        if n_dropped:
            skipped[key] = n_dropped
    repeats = len(events) - len({(u, i, ts) for u, i, ts, _ in events})
    if repeats:
        skipped["duplicate_interactions_kept"] = repeats
    return RawData(
        titles=kept_titles, mode="rows", rows=rows, skipped=skipped,
        source={"format": "amazon2018", "category": category, "window": window, "raw_reviews": len(all_events),
                "raw_meta_items": len(raw_titles)},
    )
