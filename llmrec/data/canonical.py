"""The canonical prepared-dataset layout that every reader writes and every model reads.

A prepared directory ``DIR`` holds:

* ``catalog.jsonl`` -- one item per line, ``{"item_id": int, "raw_id": str, "title": str}``, ids
  contiguous from 1 (0 is reserved for padding), in the order of the source's own ids;
* ``train.jsonl`` / ``valid.jsonl`` / ``test.jsonl`` -- one example per line,
  ``{"user_id": str, "history_item_ids": [int, ...], "target_item_id": int, "timestamp": int | null}``,
  histories oldest first and already cut to the ``max_history`` used at preparation;
* ``stats.json`` -- raw and cleaned counts, rows per split, cleaning and skip counts, options used.

The split files store item ids only (titles would repeat every history many times over);
:func:`load_prepared` adds ``history_titles`` and ``target_title`` from the catalogue, which gives the
canonical row: user id, history item ids, history titles, target item id, target title, timestamp.
JSON lines are written with sorted keys and fixed separators, so the same input gives the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
CATALOG_FILE = "catalog.jsonl"
STATS_FILE = "stats.json"
PAD_ITEM_ID = 0

ROW_FIELDS = ("user_id", "history_item_ids", "target_item_id", "timestamp")


class DataFormatError(ValueError):
    """A malformed input file: the message names the file, the row (1-based line) and the field."""

    def __init__(self, path: str | os.PathLike, row: int | None, field: str | None, problem: str):
        self.path, self.row, self.field, self.problem = str(path), row, field, problem
        where = str(path)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")


def dumps_line(obj: Any) -> str:
    """One deterministic JSON line (sorted keys, no spaces, UTF-8 kept)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(dumps_line(row))
            n += 1
    return n


class _RepeatedKeyObject(dict):
    """A JSON object that gave ``repeated`` twice (``json.loads`` keeps the last value, without a word)."""

    repeated: str


def _object_noting_repeated_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    noted = _RepeatedKeyObject(obj)
    noted.repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
    return noted


def loads_json_line(line: str, path: Path, n: int) -> Any:
    """``json.loads(line)``, but an invalid line, or a record giving one of its fields twice (read as the last
    value by ``json.loads``), raises :class:`DataFormatError` naming ``path``, line ``n`` and the field. Repeats
    inside nested objects (e.g. an Amazon item's ``details``, which no reader reads) are left alone."""
    try:
        obj = json.loads(line, object_pairs_hook=_object_noting_repeated_keys)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, n, None, f"not valid JSON ({e.msg})") from None
    if isinstance(obj, _RepeatedKeyObject):
        raise DataFormatError(path, n, obj.repeated, "given twice in one JSON object (which value is meant?)")
    return obj


def _jsonl_records(lines: Iterable[str], path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, record) of ``lines``: blank lines are skipped but still counted, so the number
    is the file's line, not the record's position; a line that is not a JSON object, or that gives a key twice,
    raises naming it."""
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        obj = loads_json_line(line, path, i)
        if not isinstance(obj, dict):  # `5`, `null`, `[1, 2]`: valid JSON, but no fields to read
            raise DataFormatError(path, i, None, f"expected a JSON object, got {json.dumps(obj)[:40]}")
        check_no_lone_surrogates(line, obj, path, i)
        yield i, obj


def check_no_lone_surrogates(line: str, obj: dict, path: Path, n: int) -> None:
    """Refuse a JSON record whose strings hold an unpaired UTF-16 surrogate escape (``"\\ud83c"``): valid JSON, but
    not Unicode text, so it failed later with a bare UnicodeEncodeError naming no file, line or field."""
    if "\\ud" not in line and "\\uD" not in line:  # the only way a surrogate gets into a decoded UTF-8 line
        return
    for key, value in obj.items():
        try:
            json.dumps({key: value}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataFormatError(path, n, str(key), f"an unpaired UTF-16 surrogate ({e.object[e.start]!a}): not "
                                                     "Unicode text") from None


def parse_jsonl_lines(lines: Iterable[str], path: Path) -> Iterator[dict]:
    """The JSON objects of ``lines`` (blank lines skipped); a malformed one raises naming ``path`` and its line."""
    for _, obj in _jsonl_records(lines, path):
        yield obj


def _text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file; undecodable bytes raise a DataFormatError naming the file and line (a bare
    UnicodeDecodeError names neither). A byte-order mark at the start is dropped."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(path, n, None, f"bytes that are not UTF-8 at offset {e.start}") from None


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) of each record of a JSONL file: errors name the file and line."""
    yield from _jsonl_records(_text_lines(path), path)


def read_jsonl(path: Path) -> Iterator[dict]:
    for _, obj in jsonl_records(path):
        yield obj


def read_stats(path: Path) -> dict:
    """A JSON-object file such as ``stats.json`` or a checkpoint's ``llmrec_config.json`` (``{}`` when absent); a
    damaged one raises naming the file (and line)."""
    if not path.exists():
        return {}
    try:
        stats = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataFormatError(path, None, None, f"bytes that are not UTF-8 at offset {e.start}") from None
    except json.JSONDecodeError as e:
        raise DataFormatError(path, e.lineno, None, f"not valid JSON ({e.msg})") from None
    if not isinstance(stats, dict):
        raise DataFormatError(path, None, None, f"expected a JSON object, got {json.dumps(stats)[:40]}")
    return stats


def json_id(value: Any, path: Path, n: int, fld: str) -> str:
    """An id field of a JSON record as a string: a non-empty string or an integer. ``null`` and ``true`` are
    not ids (``str()`` would make every missing id the one id "None")."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(path, n, fld, f"expected a string or integer id, got {json.dumps(value)[:40]}")
    value = str(value)
    if not value.strip():
        raise DataFormatError(path, n, fld, "empty id")
    return value


def _item_id(value: Any, path: Path, n: int, fld: str, n_items: int) -> int:
    # bool is a subclass of int in Python, but `true` is not an item id (Arrow would reject it later, unnamed)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataFormatError(path, n, fld, f"expected an integer item id, got {json.dumps(value)[:40]}")
    if not 1 <= value <= n_items:
        raise DataFormatError(path, n, fld, f"item {value} is not in the catalogue (ids 1..{n_items})")
    return value


def _timestamp(value: Any, path: Path, n: int) -> int | None:
    # Exactly an int64 or null: 1.5 would be truncated to 1 and "123" parsed, both silently.
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise DataFormatError(path, n, "timestamp", f"expected an integer or null, got {json.dumps(value)[:40]}")
    return value


def _current_umask() -> int:
    # os.umask can only be read by setting it; set it straight back (done per call: a program may change it).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_permissions(path: str | os.PathLike) -> None:
    """Give a file or directory made by ``tempfile`` the permissions a plain ``open``/``mkdir`` would have.

    ``mkstemp`` creates files 0600 and ``mkdtemp`` directories 0700 (private by design), so every output written
    through a temporary and a rename -- prepared datasets, results, reports -- was unreadable by the rest of a
    team sharing a cluster, unlike the checkpoints written in place beside them.
    """
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_current_umask())


def give_saved_weights_default_permissions(path: str | os.PathLike) -> None:
    """Give the ``.safetensors`` files at ``path`` (a file, or every one directly in a directory) the permissions a plain
    ``open`` would have.

    safetensors 0.8 writes through a temporary file that it renames into place, so every file it saves (through
    ``save_file`` or a transformers/peft ``save_pretrained``) is 0600 whatever the umask (safetensors issue
    #782): checkpoints and adapters a teammate on a shared cluster cannot load, beside 0644 configs.
    """
    path = Path(path)
    for f in [path] if path.is_file() else path.glob("*.safetensors"):  # a file: whatever its name (a .tmp)
        if f.is_file():
            give_default_permissions(f)


def replaceable_directory(path: str | os.PathLike) -> Path:
    """``path`` as the absolute directory that :func:`atomic_directory` replaces, refusing one it cannot.

    A symlink stands for the directory it points to (replacing the link itself left that directory stale and
    the link's moved-aside copy behind). The current directory or one holding it cannot be renamed (``.`` has no
    name to put a temporary directory beside): it is refused before any work.
    """
    final = Path(os.path.abspath(path))
    if final.is_symlink():
        final = final.resolve()
    cwd = Path.cwd().resolve()
    if final.resolve() == cwd or final.resolve() in cwd.parents:
        raise ValueError(f"output {path} is the current directory or holds it, which cannot be replaced as a whole: "
                         "name a directory inside it (e.g. data/mine)")
    return final


@contextmanager
def atomic_directory(final: str | os.PathLike):
    """Yield a temporary directory beside ``final``; on success it replaces ``final`` in one rename.

    If the body raises, the temporary directory is removed and ``final`` is left as it was, so a
    failed run never leaves a half-written output directory.
    """
    final = replaceable_directory(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{_writer_tag()}-", dir=final.parent))
    give_default_permissions(tmp)
    old: Path | None = None
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{_writer_tag()}"
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)  # the new output could not take its place: the old one goes back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_directory(final.parent)
    _remove_leftovers(final)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to the disk: a file renamed into place after this is whole after a power loss or a
    kernel crash too (a rename can reach the disk before the data it names, leaving an empty or partial file)."""
    with open(path, "r+b" if os.name == "nt" else "rb") as f:  # Windows cannot flush a read-only handle
        os.fsync(f.fileno())


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished temporary file ``tmp`` onto ``path`` after flushing its data to the disk, and make the
    rename itself durable: the last step of every atomic write of a file written by another library (safetensors,
    torch.save, matplotlib)."""
    fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_directory(Path(path).parent)


def _fsync_directory(path: Path) -> None:
    """Make the renames and new names in directory ``path`` durable (POSIX; a no-op where directories cannot be
    opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # file systems that refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """:func:`fsync_file` every file under directory ``root`` (symbolic links are names only: not followed) and
    every directory's entries."""
    for folder, _, files in os.walk(root):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_file(Path(folder) / name)
        _fsync_directory(Path(folder))


def _writer_tag() -> str:
    """``<pid>@<host>`` of this process, in the names of its temporaries: the pid says whether their writer is
    gone, the host (8 hex digits of its name's hash) that the pid is one of this machine's -- on a file system
    shared by several machines (multi-node training) another node's live writer has a pid unknown here."""
    import hashlib
    import socket

    return f"{os.getpid()}@{hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]}"


def _remove_leftovers(final: Path) -> None:
    """Remove the temporary and moved-aside copies that killed runs left beside ``final`` (each as large as the
    output; nothing else removes them). Only this machine's (by the host in the name; names without one, of
    older versions, are taken for this machine's) whose process (the pid in the name) is gone are touched."""
    here = _writer_tag().split("@")[1]
    for p in list(final.parent.glob(f".{final.name}.tmp-*")) + list(final.parent.glob(f".{final.name}.old-*")):
        m = re.match(rf"\.{re.escape(final.name)}\.(?:tmp|old)-(\d+)(?:@([0-9a-f]{{8}}))?(?:-|\Z)", p.name)
        if m is None or (m.group(2) is not None and m.group(2) != here):
            continue
        if int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_directory_path(path: str | os.PathLike, what: str = "output directory") -> None:
    """Raise ``ValueError`` if ``path`` (a directory to write into, existing or not) is a file or lies under one:
    said before any work, not at the first save after it."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                where = "is" if q == p else f"lies under {q}, which is"
                raise ValueError(f"{what} {p} {where} a file, not a directory")
            return


def check_file_path(path: str | os.PathLike, what: str = "output file") -> None:
    """Raise ``ValueError`` if ``path`` (a file to write) is a directory or lies under a file."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {p} is a directory")
    check_directory_path(p.parent, f"{what} {p}: its folder")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary file, flushed to the disk, and a rename (never half-written, also
    after a power loss). Temporary files that killed writers left beside ``path`` are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The pid and host in the name tell _remove_leftovers whose it is (a SIGKILLed writer cannot remove its own).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_writer_tag()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:  # a rewritten file keeps the read/write/execute bits its owner gave it (a private results file stays so)
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) & 0o777)
        except OSError:  # a new file (or one that cannot be looked at: a symlink loop): what open() would give
            give_default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    _remove_leftovers(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@dataclass
class PreparedData:
    """A loaded prepared directory: the catalogue, the splits (HF ``DatasetDict``) and the stats."""

    directory: Path
    catalog: Any  # llmrec.data.catalog.ItemCatalog
    splits: Any  # datasets.DatasetDict
    stats: dict
    lines: dict[str, list[int]] = field(default_factory=dict)  # split -> each row's line in its file

    @property
    def num_items(self) -> int:
        return len(self.catalog)

    def row_error(self, split: str, index: int, fld: str, problem: str) -> DataFormatError:
        """A :class:`DataFormatError` for row ``index`` (0-based) of ``split``, naming its file and line (blank
        lines make the line differ from the row's position)."""
        lines = self.lines.get(split)
        line = lines[index] if lines is not None and index < len(lines) else index + 1
        return DataFormatError(self.directory / f"{split}.jsonl", line, fld, problem)


def load_prepared(
    directory: str | os.PathLike,
    splits: Iterable[str] | None = None,
    max_history: int | None = None,
    with_titles: bool = True,
) -> PreparedData:
    """Load a directory written by ``llmrec data prepare`` (or a named embedded sample).

    ``splits`` defaults to the split files present. ``max_history`` (>= 1; None = all) keeps the most recent
    items of each history. ``with_titles`` adds ``history_titles`` / ``target_title`` columns.
    """
    from datasets import Dataset, DatasetDict, Features, Sequence, Value

    from llmrec.data.catalog import ItemCatalog
    from llmrec.data.samples import resolve_dataset_dir

    if max_history is not None and max_history < 1:
        # 0 and negative values used to mean "keep all" silently; None is the one way to say that.
        raise ValueError(f"max_history must be an int >= 1, or None for the whole history; got {max_history!r}")
    directory = resolve_dataset_dir(directory)
    catalog = ItemCatalog.load(directory / CATALOG_FILE)
    stats = read_stats(directory / STATS_FILE)
    prepared_cap = (stats.get("options") or {}).get("max_history")
    if max_history is not None and isinstance(prepared_cap, int) and 0 < prepared_cap < max_history:
        logger.warning("%s was prepared with --max-history %d: histories hold at most %d items, not the %d asked "
                       "(prepare it again with --max-history %d or 0 to read more)", directory, prepared_cap,
                       prepared_cap, max_history, max_history)
    wanted = list(splits) if splits is not None else [s for s in SPLITS if (directory / f"{s}.jsonl").exists()]
    if not wanted:
        raise FileNotFoundError(f"{directory}: no split files (train/valid/test.jsonl) found")
    features = Features(
        {
            "user_id": Value("string"),
            "history_item_ids": Sequence(Value("int64")),
            "target_item_id": Value("int64"),
            "timestamp": Value("int64"),
        }
    )
    out = {}
    line_numbers: dict[str, list[int]] = {}
    for name in wanted:
        path = directory / f"{name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{directory}: split '{name}' is missing ({path.name} not found)")
        cols: dict[str, list] = {k: [] for k in ROW_FIELDS}
        n_items = len(catalog)
        line_numbers[name] = []
        for n, row in jsonl_records(path):  # n: the file's line, as an editor shows it
            line_numbers[name].append(n)
            for key in ROW_FIELDS:
                if key not in row:
                    raise DataFormatError(path, n, key, "missing")
            hist = row["history_item_ids"]
            if not isinstance(hist, list):
                raise DataFormatError(path, n, "history_item_ids", "expected a list of item ids")
            for i in hist:
                _item_id(i, path, n, "history_item_ids", n_items)
            if max_history is not None:
                hist = hist[-max_history:]
            cols["user_id"].append(json_id(row["user_id"], path, n, "user_id"))
            cols["history_item_ids"].append(hist)
            cols["target_item_id"].append(_item_id(row["target_item_id"], path, n, "target_item_id", n_items))
            cols["timestamp"].append(_timestamp(row["timestamp"], path, n))
        if with_titles:
            title = catalog.title
            cols["history_titles"] = [[title(i) for i in h] for h in cols["history_item_ids"]]
            cols["target_title"] = [title(i) for i in cols["target_item_id"]]
            feats = features.copy()
            feats["history_titles"] = Sequence(Value("string"))
            feats["target_title"] = Value("string")
        else:
            feats = features
        out[name] = Dataset.from_dict(cols, features=feats)
    return PreparedData(directory=directory, catalog=catalog, splits=DatasetDict(out), stats=stats, lines=line_numbers)
