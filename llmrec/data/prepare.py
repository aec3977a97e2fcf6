"""``llmrec data prepare``: any source format -> the canonical prepared directory.

Steps, the same for every format:

1. read (``llmrec.data.formats``) and count the raw input: users, items, interactions, before any
   cleaning (``stats.json: raw``);
2. clean the titles of the items that occur in the data with the :class:`~llmrec.data.catalog.TitlePolicy`
   (a duplicate shares its title with another such item) -- a dropped item disappears from every sequence and
   history, as if never seen;
3. number the kept items 1..N in source-id order (0 is padding) -> ``catalog.jsonl``;
4. form examples:

   * ``windows`` (time split): one row per interaction of a split's window, its history all earlier
     interactions of the user (earlier windows included), as ReaRec does; ``eval_rows="first"`` keeps
     only each user's first valid/test interaction (DEALRec's validation protocol);
   * ``loo``: per user, the last interaction is the test target, the second-to-last the valid target,
     and every earlier position a train row (users with fewer than 3 interactions give train rows
     only, counted);
   * ``rows``: as the source formed them;

   an example whose history is empty (a user's first interaction) is skipped and counted;
   histories keep their last ``max_history`` items;
5. write everything into a temporary directory and rename it into place: nothing half-written. An
   existing output is replaced only if it is empty or a previous prepared directory (:func:`check_output`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llmrec.data.canonical import (
    CATALOG_FILE,
    SPLITS,
    STATS_FILE,
    atomic_directory,
    atomic_write_json,
    check_directory_path,
    replaceable_directory,
    write_jsonl,
)
from llmrec.data.catalog import ItemCatalog, TitlePolicy, clean_titles
from llmrec.data.formats import RawData, skip_counts_text

logger = logging.getLogger(__name__)


@dataclass
class PrepareOptions:
    max_history: int = 50
    eval_rows: str = "all"  # "all" | "first"
    title_policy: TitlePolicy | None = None


PREPARED_FILES = frozenset({CATALOG_FILE, STATS_FILE, *(f"{s}.jsonl" for s in SPLITS)})


def check_output(output: str | Path) -> None:
    """Refuse an ``output`` that exists and is not a directory ``prepare`` wrote (or an empty one).

    The output is replaced as a whole, so pointing it at the input folder, a folder holding it, or any other
    folder used to delete that folder with everything in it; a file was replaced and its moved-aside copy
    left behind. A previous prepared directory holds only the files ``prepare`` writes and is replaced.
    """
    replaceable_directory(output)  # "." (or a folder holding the current one) is refused here, before any work
    output = Path(output)
    if not output.exists():
        check_directory_path(output, "--output")  # a parent that is a file: said now, not as a traceback
        return
    if not output.is_dir():
        raise ValueError(f"output {output} exists and is not a directory: choose another --output")
    foreign = sorted(p.name for p in output.iterdir() if p.name not in PREPARED_FILES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ValueError(f"output {output} exists and is not a prepared directory (it holds {shown}); it would be "
                         "replaced as a whole: choose a new or empty directory, or remove it first")


def check_split_names(splits: list[str] | None) -> None:
    """Refuse a split named twice (``--splits test,test``): its file was written twice and its rows counted twice
    in ``cleaned.examples``. Refuse a name other than train/valid/test too: the d3-csv reader read ``dev/<cat>.csv``
    for ``--splits dev`` and ``prepare`` wrote ``dev.jsonl``, which ``load_prepared`` never reads and which made the
    next ``prepare`` into that directory refuse it as "not a prepared directory"."""
    seen: set[str] = set()
    for s in splits or []:
        if s not in SPLITS:
            raise ValueError(f"unknown split '{s}' in the splits to prepare ({', '.join(splits)}): the splits are "
                             f"{', '.join(SPLITS)}")
        if s in seen:
            raise ValueError(f"split '{s}' is named more than once in the splits to prepare ({', '.join(splits)}): "
                             "name each once")
        seen.add(s)


def raw_counts(raw: RawData) -> dict:
    """Users, items and interactions of the input before any cleaning (overall and per split)."""
    per: dict[str, dict] = {}
    if raw.mode in ("windows", "loo"):
        users_all, items_all, n_all = set(), set(), 0
        splits: dict[str, tuple[set, set, int]] = {}
        for user, windows in raw.sequences.items():
            for split, seq in windows.items():
                if not seq:
                    continue
                u, i, n = splits.get(split, (set(), set(), 0))
                u.add(user)
                i.update(it for it, _ in seq)
                splits[split] = (u, i, n + len(seq))
                users_all.add(user)
                items_all.update(it for it, _ in seq)
                n_all += len(seq)
        if raw.mode == "windows":
            per = {s: {"users": len(u), "items": len(i), "interactions": n} for s, (u, i, n) in splits.items()}
        return {"users": len(users_all), "items": len(items_all), "interactions": n_all,
                "catalog_items": len(raw.titles), "per_split": per}
    users_all, items_all, n_all = set(), set(), 0
    for split, rows in raw.rows.items():
        users = {r.user for r in rows}
        targets = {r.target for r in rows}
        items = targets | {i for r in rows for i in r.history}
        per[split] = {"rows": len(rows), "users": len(users), "distinct_targets": len(targets), "items": len(items)}
        users_all |= users
        items_all |= items
        n_all += len(rows)
    return {"users": len(users_all), "items": len(items_all), "interactions": n_all,
            "catalog_items": len(raw.titles), "per_split": per}


def _rows_from_sequences(raw: RawData, to_id: dict[str, int], opts: PrepareOptions, skips: Counter) -> dict[str, list]:
    out: dict[str, list] = {s: [] for s in SPLITS}
    h = opts.max_history
    for user, windows in raw.sequences.items():
        if raw.mode == "loo":
            seq = [(to_id[it], ts) for it, ts in windows.get("all", []) if it in to_id]
            if len(seq) < len(windows.get("all", [])):  # items the title policy dropped: counted, not silent
                skips["interactions_item_dropped"] += len(windows.get("all", [])) - len(seq)
            n = len(seq)
            if n < 3:
                skips["users_too_short_for_leave_one_out"] += 1
            labels = ["train"] * n if n < 3 else ["train"] * (n - 2) + ["valid", "test"]
        else:
            seq, labels = [], []
            for split in SPLITS:
                for it, ts in windows.get(split, []):
                    if it in to_id:
                        seq.append((to_id[it], ts))
                        labels.append(split)
                    else:  # an item the title policy dropped: counted, not silent
                        skips[f"{split}_interactions_item_dropped"] += 1
        seen_eval: set[str] = set()
        for pos, ((item, ts), split) in enumerate(zip(seq, labels)):
            # eval_rows "first": the user's first interaction of the split, even when it has no history (then the
            # user has no row there), never a later one standing in for it.
            if opts.eval_rows == "first" and split != "train":
                if split in seen_eval:
                    skips[f"{split}_rows_not_first"] += 1
                    continue
                seen_eval.add(split)
            if pos == 0:
                skips[f"{split}_rows_empty_history"] += 1
                continue
            hist = [i for i, _ in seq[max(0, pos - h) if h > 0 else 0:pos]]
            out[split].append({"user_id": user, "history_item_ids": hist, "target_item_id": item, "timestamp": ts})
    return out


def _rows_from_rows(raw: RawData, to_id: dict[str, int], opts: PrepareOptions, skips: Counter) -> dict[str, list]:
    out: dict[str, list] = {}
    h = opts.max_history
    for split, rows in raw.rows.items():
        kept = []
        for r in rows:
            if r.target not in to_id:
                skips[f"{split}_rows_target_dropped"] += 1
                continue
            hist = [to_id[i] for i in r.history if i in to_id]
            if len(hist) < len(r.history):
                skips[f"{split}_history_items_dropped"] += len(r.history) - len(hist)
            if not hist:
                skips[f"{split}_rows_empty_history"] += 1
                continue
            kept.append({"user_id": r.user, "history_item_ids": hist[-h:] if h > 0 else hist,
                         "target_item_id": to_id[r.target], "timestamp": r.timestamp})
        out[split] = kept
    return out


def _source_text(raw: RawData) -> str:
    return ", ".join(f"{k} {v}" for k, v in raw.source.items()) or "the input"


def prepare(raw: RawData, output: str | Path, opts: PrepareOptions | None = None, splits: list[str] | None = None) -> dict:
    """Clean, number, form examples and write the prepared directory atomically; return the stats."""
    opts = opts or PrepareOptions()
    check_output(output)
    if opts.eval_rows not in ("all", "first"):
        raise ValueError(f"eval_rows must be 'all' or 'first', got {opts.eval_rows!r}")
    if opts.max_history < 0:  # would silently mean "all" (0)
        raise ValueError(f"max_history must be >= 0 (0 = all), got {opts.max_history}")
    if opts.title_policy is not None and opts.title_policy.empty == "keep":
        # A prepared catalogue has a title for every item (the loader rejects an empty one): an item without a
        # title cannot be recommended by its title, so it is dropped and counted.
        raise ValueError("title policy empty=keep is not allowed: a prepared catalogue has a title for every item")
    check_split_names(splits)
    if opts.eval_rows == "first" and raw.mode != "windows":
        # leave-one-out has one valid/test row per user anyway; fixed rows (d3-csv, amazon2018) are taken as they are
        raise ValueError(f"eval_rows 'first' applies to time-window splits (this input's split mode is "
                         f"{raw.mode!r}); it would be ignored")
    raw_stats = raw_counts(raw)
    # Only items that occur somewhere in the data enter the catalogue (as every reader's id space; d3-csv: every item
    # of its info file, the candidate set of that protocol), and titles are
    # judged among them: a title shared only with an item that never occurs is no duplicate (duplicate=drop
    # dropped such an item), and the title-kind counts describe the items of the data.
    used: set[str] = set()
    if raw.catalog_from == "titles":  # the source's item list is the protocol's candidate set (d3-csv)
        used.update(raw.titles)
    elif raw.mode == "rows":
        for rows in raw.rows.values():
            for r in rows:
                used.add(r.target)
                used.update(r.history)
    else:
        for windows in raw.sequences.values():
            for seq in windows.values():
                used.update(it for it, _ in seq)
    kept, report = clean_titles({r: t for r, t in raw.titles.items() if r in used}, opts.title_policy)
    catalog = ItemCatalog.from_titles(kept)
    if len(catalog) == 0:  # say where the items went (it blamed the title cleaning whatever emptied the data)
        raise ValueError(f"no items left, nothing to prepare ({_source_text(raw)}): {len(used):,} items occur in "
                         f"the rows read, {len(kept):,} of them with a usable title; skipped while reading: "
                         f"{skip_counts_text(raw.skipped)}")
    to_id = {r: i + 1 for i, r in enumerate(catalog.raw_ids)}
    skips: Counter = Counter(raw.skipped)
    if raw.mode == "rows":
        rows = _rows_from_rows(raw, to_id, opts, skips)
    else:
        rows = _rows_from_sequences(raw, to_id, opts, skips)
    wanted = splits or [s for s in SPLITS if s in rows and (raw.mode != "rows" or s in raw.rows)]
    for s in wanted:
        if s not in rows:
            raise ValueError(f"split '{s}' is not in the input")
        if not rows[s]:
            raise ValueError(f"split '{s}' has no examples after cleaning ({_source_text(raw)}; skipped: "
                             f"{skip_counts_text(skips)})")
    users, items, inter = set(), set(), 0
    for s in wanted:
        for r in rows[s]:
            users.add(r["user_id"])
            items.add(r["target_item_id"])
            items.update(r["history_item_ids"])
            inter += 1
    stats = {
        "source": raw.source,
        "raw": raw_stats,
        "cleaned": {"users": len(users), "items_in_examples": len(items), "catalog_items": len(catalog),
                    "examples": inter},
        "rows": {s: len(rows[s]) for s in wanted},
        "cleaning": report.as_dict(),
        "skipped": dict(sorted(skips.items())),
        "options": {"max_history": opts.max_history, "eval_rows": opts.eval_rows, "split_mode": raw.mode,
                    "splits": wanted},
    }
    with atomic_directory(output) as tmp:
        catalog.save(tmp / "catalog.jsonl")
        for s in wanted:
            write_jsonl(tmp / f"{s}.jsonl", rows[s])
        atomic_write_json(tmp / "stats.json", stats)
    logger.info("prepared %s: %s", output, stats["rows"])
    return stats
