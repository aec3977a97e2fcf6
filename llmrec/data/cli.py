"""``llmrec data prepare`` and ``llmrec data stats``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from llmrec.config import int_at_least
from llmrec.data.canonical import SPLITS
from llmrec.data.formats import FORMATS


def _split_list(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


# Defaults of the split options: a value other than these is refused where the option would be ignored.
DEFAULT_SPLIT = "loo"
DEFAULT_RATIO = 0.1
# --max-history when not given: the history cap of prepare, and for amazon2018 D3's protocol (10 previous items).
DEFAULT_MAX_HISTORY = 50
D3_MAX_HISTORY = 10


def _parse_time_cutoffs(text: str, fmt: str, split: str) -> tuple[float, float]:
    """``--time-cutoffs VALID_START,TEST_START`` -> two timestamps (ints where they are integers)."""
    usage = f"--time-cutoffs takes two timestamps VALID_START,TEST_START with VALID_START <= TEST_START, got {text!r}"
    if fmt not in ("csv", "amazon2023") or split != "time":
        raise ValueError(f"--time-cutoffs applies to --format csv or amazon2023 with --split time (got --format {fmt} "
                         f"--split {split}); it would be ignored")
    parts = [x.strip() for x in text.split(",")]
    if len(parts) != 2:
        raise ValueError(usage)
    try:
        values = tuple(int(x) if x.lstrip("+-").isdigit() else float(x) for x in parts)
    except ValueError:
        raise ValueError(usage) from None
    if not all(math.isfinite(v) for v in values) or values[0] > values[1]:
        raise ValueError(usage)
    return values


def _check_split_options(args: argparse.Namespace) -> None:
    """Refuse ``--split`` and the ratio options where they would be silently ignored (as ``--time-cutoffs`` is):
    ``--split`` for the formats whose splits the input (or D3's protocol, for amazon2018) fixes, the ratios
    everywhere but a csv/amazon2023 ratio time split. Only values other than the defaults are refused: argparse
    cannot tell a default given on the command line from one left out."""
    ratio_format = args.format in ("csv", "amazon2023")
    if args.split != DEFAULT_SPLIT and not ratio_format:
        fixed_by = "D3's protocol" if args.format == "amazon2018" else "the input"
        raise ValueError(f"--split applies to --format csv or amazon2023 (got --format {args.format}, whose splits "
                         f"are fixed by {fixed_by}); it would be ignored")
    for name, value in (("--valid-ratio", args.valid_ratio), ("--test-ratio", args.test_ratio)):
        if value != DEFAULT_RATIO and not (ratio_format and args.split == "time" and not args.time_cutoffs):
            raise ValueError(f"{name} applies to --format csv or amazon2023 with --split time and no --time-cutoffs "
                             f"(got --format {args.format} --split {args.split}"
                             f"{' --time-cutoffs ' + args.time_cutoffs if args.time_cutoffs else ''}); "
                             "it would be ignored")


# Options read by some formats only: (flag, attribute, formats that read it, default). Given to another format they
# were ignored without a word (`--format recbole --min-rating 4` prepared every rating).
_FORMAT_OPTIONS = (
    ("--min-rating", "min_rating", ("amazon2023",), None),
    ("--interactions", "interactions", ("csv",), None),
    ("--items", "items", ("csv",), None),
    ("--titles-from", "titles_from", ("seq-txt",), "auto"),
    ("--category", "category", ("d3-csv", "recbole", "amazon2023", "amazon2018"), None),
    ("--on-unknown-item", "on_unknown_item", ("seq-txt", "recbole", "csv", "amazon2023"), "error"),
    ("--start", "start", ("amazon2018",), None),
    ("--end", "end", ("amazon2018",), "2018-11"),
    ("--min-items", "min_items", ("amazon2018",), 5000),
)


def _check_format_options(args: argparse.Namespace) -> None:
    """Refuse an option the chosen format does not read (only values other than the default: argparse cannot tell
    a default given on the command line from one left out)."""
    for flag, attr, formats, default in _FORMAT_OPTIONS:
        if getattr(args, attr) != default and args.format not in formats:
            raise ValueError(f"{flag} applies to --format {' or '.join(formats)} (got --format {args.format}); "
                             "it would be ignored")
    if args.min_rating is not None and not math.isfinite(args.min_rating):
        raise ValueError(f"--min-rating must be a finite number, got {args.min_rating}")
    if args.format == "amazon2018":
        for flag, text in (("--start", args.start), ("--end", args.end)):
            if text is None:  # --start left out: D3's 2017-10, widened back as needed (also past an earlier --end)
                continue
            parts = text.split("-")
            if (len(parts) != 2 or not all(x.isdigit() for x in parts) or not 1 <= int(parts[1]) <= 12
                    or not 1 <= int(parts[0]) <= 9999):  # datetime's years
                raise ValueError(f"{flag} takes a month as YYYY-MM (e.g. 2018-11), got {text!r}")
        if args.start is not None:
            start, end = (tuple(int(x) for x in t.split("-")) for t in (args.start, args.end))
            if start > end:  # an inverted window was silently widened back from the start instead (a review)
                raise ValueError(f"--start {args.start} is after --end {args.end}")


def _splits_to_prepare(args: argparse.Namespace) -> list[str] | None:
    """``--splits``; without it, a ratio time split leaves out the split whose ratio is 0 (it has no rows), else
    None (all the input has)."""
    splits = _split_list(args.splits)
    if splits is None and args.format in ("csv", "amazon2023") and args.split == "time" and not args.time_cutoffs:
        zero = {name for name, ratio in (("valid", args.valid_ratio), ("test", args.test_ratio)) if ratio == 0}
        if zero:
            return [s for s in ("train", "valid", "test") if s not in zero]
    return splits


def max_history_of(args: argparse.Namespace) -> int:
    """``--max-history``, or when not given the format's default: D3's 10 for amazon2018, 50 otherwise."""
    if args.max_history is not None:
        return args.max_history
    return D3_MAX_HISTORY if args.format == "amazon2018" else DEFAULT_MAX_HISTORY


def read_source(args: argparse.Namespace):
    """Dispatch to the reader of ``args.format``."""
    from llmrec.data import formats
    from llmrec.data.prepare import check_split_names

    inp = Path(args.input)
    if not inp.exists():
        raise FileNotFoundError(f"input not found: {inp}")
    if not inp.is_dir() and not (args.format == "csv" and args.interactions and args.items):  # every reader looks for its files in a directory ("no .inter file matching" named the file)
        raise ValueError(f"--input {inp} is a file: give the directory that holds the {args.format} files"
                         + (" (or --interactions/--items for csv files elsewhere)" if args.format == "csv" else ""))
    splits = _split_list(args.splits)
    check_split_names(splits)  # before reading, which may take long
    _check_split_options(args)
    _check_format_options(args)
    cutoffs = _parse_time_cutoffs(args.time_cutoffs, args.format, args.split) if args.time_cutoffs else None
    if args.format == "d3-csv":
        return formats.read_d3_csv(inp, splits or ["train", "valid", "test"], args.category)
    if args.format == "seq-txt":
        return formats.read_seq_txt(inp, args.titles_from, args.on_unknown_item, splits)
    if args.format == "recbole":
        return formats.read_recbole(inp, args.category, args.on_unknown_item)
    if args.format == "csv":
        inter = Path(args.interactions) if args.interactions else inp / "interactions.csv"
        items = Path(args.items) if args.items else inp / "items.csv"
        return formats.read_generic_csv(inter, items, args.split, args.valid_ratio, args.test_ratio, cutoffs, args.on_unknown_item)
    if args.format == "amazon2023":
        if not args.category:
            raise ValueError("--format amazon2023 needs --category (e.g. Video_Games)")
        return formats.read_amazon2023(inp, args.category, args.split, args.valid_ratio, args.test_ratio, cutoffs,
                                       args.min_rating, args.on_unknown_item)
    if args.format == "amazon2018":
        if not args.category:
            raise ValueError("--format amazon2018 needs --category (e.g. Video_Games)")
        return formats.read_amazon2018(inp, args.category, start=args.start or "2017-10", end=args.end, min_items=args.min_items,
                                       max_history=max_history_of(args))
    raise ValueError(f"unknown format {args.format!r}; known: {', '.join(FORMATS)}")


def cmd_prepare(args: argparse.Namespace) -> int:
    from llmrec.data.catalog import TitlePolicy
    from llmrec.data.prepare import PrepareOptions, prepare

    opts = PrepareOptions(max_history=max_history_of(args), eval_rows=args.eval_rows,
                          title_policy=TitlePolicy.parse(args.title_policy))
    raw = read_source(args)
    stats = prepare(raw, args.output, opts, _splits_to_prepare(args))
    print(format_stats(stats, Path(args.output) / "stats.json"))
    return 0


def _in_split_order(d: dict) -> list:
    # stats.json is written with sorted keys: print train, valid, test in their natural order
    return sorted(d.items(), key=lambda kv: SPLITS.index(kv[0]) if kv[0] in SPLITS else len(SPLITS))


def _stats_field(parent: dict, key: str, where: str, path: str | Path, kind: str) -> Any:
    """``parent[key]`` of a stats.json, checked to be ``kind`` ("object" or "count"); else an error naming the file
    and the field (``where``: its dotted name). A hand-edited or foreign file gave a bare KeyError or a format error
    ("Cannot specify ',' with 's'") naming neither."""
    from llmrec.data.canonical import DataFormatError

    if key not in parent:
        raise DataFormatError(path, None, where, "missing (not a stats.json written by `llmrec data prepare`?)")
    value = parent[key]
    ok = isinstance(value, dict) if kind == "object" else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
    if not ok:
        expected = "a JSON object" if kind == "object" else "a count (a number)"
        raise DataFormatError(path, None, where, f"expected {expected}, got {json.dumps(value)[:40]}")
    return value


def _counts(parent: dict, key: str, where: str, path: str | Path) -> dict:
    """An object of counts (``rows``, ``skipped``, a ``per_split`` entry), each checked as :func:`_stats_field`."""
    d = _stats_field(parent, key, where, path, "object")
    for k in d:
        _stats_field(d, k, f"{where}.{k}", path, "count")
    return d


def format_stats(stats: dict, path: str | Path = "stats.json") -> str:
    """A short human-readable summary of a stats.json (``path``: the file, for the errors).

    Raises:
        DataFormatError: a field the summary shows is missing or of another type (names ``path`` and the field).
    """
    from llmrec.data.canonical import DataFormatError

    raw = _stats_field(stats, "raw", "raw", path, "object")
    clean = _stats_field(stats, "cleaned", "cleaned", path, "object")
    n = {f"raw.{k}": _stats_field(raw, k, f"raw.{k}", path, "count")
         for k in ("users", "items", "interactions", "catalog_items")}
    n |= {f"cleaned.{k}": _stats_field(clean, k, f"cleaned.{k}", path, "count")
          for k in ("users", "items_in_examples", "catalog_items", "examples")}
    lines = [
        f"source: {json.dumps(stats.get('source', {}), sort_keys=True)}",
        f"raw:     users {n['raw.users']:,}  items {n['raw.items']:,}  interactions {n['raw.interactions']:,}  "
        f"(catalogue titles {n['raw.catalog_items']:,})",
    ]
    per_split = _stats_field(raw, "per_split", "raw.per_split", path, "object") if "per_split" in raw else {}
    for split in per_split:
        _counts(per_split, split, f"raw.per_split.{split}", path)
    for split, c in _in_split_order(per_split):
        lines.append(f"  raw {split}: " + "  ".join(f"{k} {v:,}" for k, v in c.items()))
    lines.append(f"cleaned: users {n['cleaned.users']:,}  items {n['cleaned.items_in_examples']:,}  "
                 f"catalogue {n['cleaned.catalog_items']:,}  examples {n['cleaned.examples']:,}")
    rows = _counts(stats, "rows", "rows", path)
    lines.append("rows:    " + "  ".join(f"{s} {count:,}" for s, count in _in_split_order(rows)))
    c = _stats_field(stats, "cleaning", "cleaning", path, "object")
    found, dropped, policy = (_stats_field(c, k, f"cleaning.{k}", path, "object")
                              for k in ("found", "dropped_items", "policy"))
    for k in found:  # every title kind found has its dropped count and policy
        _stats_field(dropped, k, f"cleaning.dropped_items.{k}", path, "count")
        if k not in policy:
            raise DataFormatError(path, None, f"cleaning.policy.{k}", "missing")
    lines.append("titles:  " + "  ".join(f"{k} {found[k]} found/{dropped[k]} dropped ({policy[k]})" for k in found))
    if "text" in c:  # prepared before the title text was counted: no line
        text = _stats_field(c, "text", "cleaning.text", path, "object")
        t = {k: _stats_field(text, k, f"cleaning.text.{k}", path, "count")
             for k in ("with_char_refs", "with_irregular_whitespace", "normalized")}
        if "policy" not in text:
            raise DataFormatError(path, None, "cleaning.text.policy", "missing")
        lines.append(f"  text ({text['policy']}): {t['with_char_refs']:,} with HTML character references, "
                     f"{t['with_irregular_whitespace']:,} with tabs/line breaks/repeated spaces, "
                     f"{t['normalized']:,} normalized")
    skipped = _counts(stats, "skipped", "skipped", path) if stats.get("skipped") else {}
    if skipped:
        lines.append("skipped: " + "  ".join(f"{k} {v:,}" for k, v in skipped.items()))
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    from llmrec.data.canonical import read_stats
    from llmrec.data.samples import resolve_dataset_dir

    path = resolve_dataset_dir(args.directory) / "stats.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a prepared directory")
    stats = read_stats(path)  # a damaged file: an error naming it, not a bare JSONDecodeError
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats, path))
    return 0


def register_cli(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare datasets into the canonical form, show their stats")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = sub.add_parser("prepare", help="convert a source dataset into DIR/{train,valid,test}.jsonl + catalog + stats",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--format", required=True, choices=FORMATS, help="source format")
    p.add_argument("--input", required=True, help="directory of the source files (the format's names in it)")
    p.add_argument("--output", required=True, help="output directory (written atomically; an existing one must be empty or a previous output, "
                   "which is replaced)")
    p.add_argument("--splits", default=None, help="comma-separated splits to prepare (default: all three; "
                   "a missing split is an error unless named here, e.g. valid,test)")
    p.add_argument("--max-history", type=int_at_least(0, " (0 = all)"), default=None,  # -5 meant "all"
                   help=f"keep the last N history items (0 = all); when not given {DEFAULT_MAX_HISTORY}, and for amazon2018 "
                   f"{D3_MAX_HISTORY} (D3's protocol), whose reader forms the histories")
    p.add_argument("--eval-rows", choices=("all", "first"), default="all",
                   help="time splits: one row per valid/test interaction (all) or only the user's first")
    p.add_argument("--title-policy", default=None,
                   help="keep/drop per title kind, e.g. 'html=drop,placeholder=drop,empty=drop,duplicate=keep' (the default; "
                   "empty titles are always dropped); 'text=normalize' also decodes HTML character references (&amp; "
                   "&#39; &ndash;) and makes whitespace runs one space (default text=keep: as the source has them)")
    p.add_argument("--category", default=None, help="category / file-name stem when a folder holds several")
    p.add_argument("--titles-from", choices=("auto", "npy", "jsonl"), default="auto", help="seq-txt: title map source")
    p.add_argument("--on-unknown-item", choices=("error", "skip"), default="error",
                   help="an interaction with an item that has no title: error, or skip and count it")
    p.add_argument("--split", choices=("loo", "time"), default=DEFAULT_SPLIT,
                   help="csv/amazon2023: leave-one-out or global time split (other formats: refused, the input fixes it)")
    p.add_argument("--valid-ratio", type=float, default=DEFAULT_RATIO, help="time split: share of interactions in valid")
    p.add_argument("--test-ratio", type=float, default=DEFAULT_RATIO, help="time split: share of interactions in test")
    p.add_argument("--time-cutoffs", default=None, help="time split: absolute cutoffs VALID_START,TEST_START instead of ratios")
    p.add_argument("--min-rating", type=float, default=None, help="amazon2023: keep interactions rated at least this")
    p.add_argument("--interactions", default=None, help="csv: interactions file (default INPUT/interactions.csv)")
    p.add_argument("--items", default=None, help="csv: items file (default INPUT/items.csv)")
    p.add_argument("--start", default=None, help="amazon2018: window start YYYY-MM (default 2017-10; widened back as "
                   "D3 does)")
    p.add_argument("--end", default="2018-11", help="amazon2018: window end YYYY-MM (reviews up to the first "
                   "day of that month, that day included, as D3 keeps them)")
    p.add_argument("--min-items", type=int, default=5000, help="amazon2018: widen the window until this many items")
    p.set_defaults(func=cmd_prepare)
    s = sub.add_parser("stats", help="print the stats of a prepared directory")
    s.add_argument("directory", help="prepared directory or embedded sample name")
    s.add_argument("--json", action="store_true", help="print the raw stats.json")
    s.set_defaults(func=cmd_stats)
