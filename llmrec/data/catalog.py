"""The item catalogue: item id <-> title, and the report of what title cleaning found and did.

Title kinds found in real recommendation data (see ../shared/data/README.md):

* ``html``        -- an HTML fragment instead of a title (e.g. ``<span class="a-size-medium ...``,
                     29 items of the LatentR3 CDs data);
* ``placeholder`` -- a generated stand-in such as ``title_1234`` (19 items of DEALRec Games);
* ``empty``       -- missing or whitespace only;
* ``duplicate``   -- the same title as another item (468 items of Games once leading and trailing spaces are
                     stripped; 448 with them).

:class:`TitlePolicy` says what happens to each kind: ``drop`` removes the item and every interaction
with it before examples are formed (as if it had never been seen); ``keep`` keeps it. The default
drops html, placeholder and empty titles (an LLM cannot generate them meaningfully) and keeps
duplicates: items sharing a title become one path of the decoding trie and evaluation reports
title-level and item-level matching. The counts land in ``stats.json``. ``prepare`` refuses
``empty=keep``: a prepared catalogue has a title for every item (its loader rejects an empty one).

Title *text* is a separate choice, ``text=keep|normalize`` in the same policy string. Scraped Amazon titles hold
HTML character references (``Orcs &amp; Humans``, ``Mouse &ndash; 11 Buttons``: 745 of the 17,332 items of DEALRec
Games, 1,236 of the 12,101 of Beauty) and irregular whitespace (151 and 173 titles: double spaces, in Beauty also
two tabs and a line break), which an LLM then reads and has to generate verbatim. ``normalize`` decodes every
reference that ends in ``;`` (``html.unescape`` on it alone, so ``AT&T`` or ``&copy`` without its ``;`` stay as they
are) and makes every whitespace run (tabs, line breaks, no-break spaces) one space, before the kinds are judged (so
``Halo &amp; Co`` and ``Halo & Co`` become one title, a duplicate). The default ``keep`` leaves the text as the
source has it, as the papers' data do (D3's Amazon 2018 reader decodes ``&amp;`` and ``&quot;`` only, in
:mod:`llmrec.data.formats`): prepared data, and the results made on it, stay the same. Either way the titles
holding references or irregular whitespace are counted in ``stats.json`` (``cleaning.text``).
"""

from __future__ import annotations

import html
import html.entities
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llmrec.data.canonical import CATALOG_FILE, DataFormatError, json_id, jsonl_records, write_jsonl

TITLE_KINDS = ("html", "placeholder", "empty", "duplicate")
POLICIES = ("keep", "drop")
TEXT_POLICIES = ("keep", "normalize")

# Markup, not any "<word ...>": "Best of <Disc 2>", "<I Love Lucy> Season 1" or "<A Tribe Called Quest>" are titles,
# whose items (and interactions) the default policy would drop (review). Scraped fragments are lowercase: a known
# tag closed at once (<br>, <b>, <br/>) or with an attribute (<span class="a-size-medium ..., <a href=...), any
# closing tag (</center>), or a comment.
_HTML_TAGS = ("span", "div", "a", "p", "b", "i", "u", "br", "hr", "img", "li", "ul", "ol", "em", "strong", "font",
              "table", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "sup", "sub", "small", "script", "style",
              "center", "iframe", "html", "body", "head", "meta", "link", "section", "article", "input", "form",
              "button", "label", "select", "option", "noscript", "strike", "big", "tt", "pre", "code", "blockquote")
_HTML_RE = re.compile(r"<(?:" + "|".join(_HTML_TAGS) + r")(?:\s*/?>|\s+[a-z-]+\s*=)|</[a-z][a-z0-9]*\s*>|<!--")
_PLACEHOLDER_RE = re.compile(r"^title_\d+$")
# A character reference with its ";": named (&amp; &ndash; &frac12;), decimal (&#39;) or hexadecimal (&#x2019;).
_CHAR_REF_RE = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]*|#[0-9]+|#[xX][0-9A-Fa-f]+);")
_IRREGULAR_SPACE_RE = re.compile(r"[^\S ]|  ")  # whitespace other than a space, or two spaces in a row


def has_char_refs(title: str) -> bool:
    """Whether ``title`` holds an HTML character reference that :func:`normalize_title_text` decodes.

    >>> has_char_refs("Orcs &amp; Humans"), has_char_refs("AT&T"), has_char_refs("Tom &ampersand;")
    (True, False, False)
    """
    return any(_decode_char_ref(m) != m.group() for m in _CHAR_REF_RE.finditer(title))


def _decode_char_ref(match: re.Match[str]) -> str:
    """One reference matched by ``_CHAR_REF_RE``, decoded; an unknown name unchanged.

    ``html.unescape`` alone would decode the known prefix of an unknown name (HTML5 lets ``&copy`` stand
    without its ``;``), turning ``&copyright;`` into ``©right;``; a name is decoded only if it is whole.
    """
    ref = match.group()
    if ref.startswith("&#"):
        return html.unescape(ref)
    return html.entities.html5.get(ref[1:], ref)


def normalize_title_text(title: str) -> str:
    """Decode the HTML character references ending in ``;`` and make each whitespace run one space; strip.

    An unknown name (``&foo;``) stays as it is, as does a reference without its ``;`` (``&copy 2010``), which
    ``html.unescape`` of the whole title would decode.

    >>> normalize_title_text("Orcs &amp; Humans &ndash; PC")
    'Orcs & Humans – PC'
    >>> normalize_title_text("Don&#39;t\tStarve&nbsp; Together ")
    "Don't Starve Together"
    >>> normalize_title_text("AT&T &copy 2010 &foo; &copyright; &lt3;")
    'AT&T &copy 2010 &foo; &copyright; &lt3;'
    """
    decoded = _CHAR_REF_RE.sub(_decode_char_ref, title)
    return " ".join(decoded.split())


def classify_title(title: str | None) -> str | None:
    """Return the defect kind of one title (``html``/``placeholder``/``empty``) or ``None``.

    >>> classify_title('<span class="a-size-medium a-color-secondary')
    'html'
    >>> classify_title("title_17"), classify_title("  "), classify_title("Anno 2070")
    ('placeholder', 'empty', None)
    >>> [classify_title(t) for t in ("Best of <Disc 2>", "<I Love Lucy> Season 1", "<A Tribe Called Quest>")]
    [None, None, None]
    >>> [classify_title(t) for t in ("Halo <br>Legend", "<center>Halo</center>", 'x <a href="y">', "<!-- x -->")]
    ['html', 'html', 'html', 'html']
    """
    if title is None or not str(title).strip():
        return "empty"
    t = str(title).strip()
    if _HTML_RE.search(t):
        return "html"
    if _PLACEHOLDER_RE.match(t):
        return "placeholder"
    return None


@dataclass
class TitlePolicy:
    """What to do with each kind of bad title: ``keep`` or ``drop`` (the item and its interactions); and with the
    text of every title: ``text="keep"`` as the source has it, or ``"normalize"`` (:func:`normalize_title_text`)."""

    html: str = "drop"
    placeholder: str = "drop"
    empty: str = "drop"
    duplicate: str = "keep"
    text: str = "keep"

    def __post_init__(self) -> None:
        for kind in TITLE_KINDS:
            if getattr(self, kind) not in POLICIES:
                raise ValueError(f"title policy for '{kind}' must be one of {POLICIES}, got {getattr(self, kind)!r}")
        if self.text not in TEXT_POLICIES:
            raise ValueError(f"title policy for 'text' must be one of {TEXT_POLICIES}, got {self.text!r}")

    @classmethod
    def parse(cls, spec: str | None) -> TitlePolicy:
        """Parse ``"html=drop,duplicate=drop,text=normalize"`` (unnamed kinds keep their defaults)."""
        policy = cls()
        if not spec:
            return policy
        named: set[str] = set()
        for part in spec.split(","):
            if "=" not in part:
                raise ValueError(f"bad title policy '{part}': expected kind=keep|drop or text=keep|normalize")
            kind, value = (s.strip() for s in part.split("=", 1))
            if kind not in (*TITLE_KINDS, "text"):
                raise ValueError(f"unknown title kind '{kind}' in title policy; kinds: {TITLE_KINDS}, and 'text'")
            if kind in named:  # "html=keep,html=drop" silently meant the last one
                raise ValueError(f"title kind '{kind}' is named more than once in title policy {spec!r}: name each once")
            named.add(kind)
            setattr(policy, kind, value)
        policy.__post_init__()
        return policy

    def as_dict(self) -> dict[str, str]:
        """The keep/drop choice per title kind (the text choice is :attr:`text`)."""
        return {k: getattr(self, k) for k in TITLE_KINDS}


@dataclass
class CleaningReport:
    """Counts of each title kind found and of the items dropped because of it."""

    found: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TITLE_KINDS, 0))
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TITLE_KINDS, 0))
    policy: dict[str, str] = field(default_factory=dict)
    dropped_raw_ids: list[str] = field(default_factory=list)
    items_sharing_a_title: int = 0
    # title text: the policy, the titles holding character references / irregular whitespace (as the source has
    # them, counted under either policy) and the titles text=normalize changed
    text_policy: str = "keep"
    with_char_refs: int = 0
    with_irregular_whitespace: int = 0
    text_normalized: int = 0

    def as_dict(self) -> dict:
        return {"found": dict(self.found), "dropped_items": dict(self.dropped), "policy": dict(self.policy),
                "items_sharing_a_title": self.items_sharing_a_title,
                "text": {"policy": self.text_policy, "with_char_refs": self.with_char_refs,
                         "with_irregular_whitespace": self.with_irregular_whitespace,
                         "normalized": self.text_normalized}}


def clean_titles(
    raw_titles: Mapping[str, str | None], policy: TitlePolicy | None = None
) -> tuple[dict[str, str], CleaningReport]:
    """Apply ``policy`` to ``raw_id -> title``; return the kept ``raw_id -> stripped title`` and a report.

    With ``text="normalize"`` each title's text is normalised first (:func:`normalize_title_text`), so its kind
    is judged on the text that is kept. A duplicate is any item whose stripped title equals another *kept* item's
    title (after the other kinds are handled), so dropping duplicates removes every item of a shared title.
    """
    policy = policy or TitlePolicy()
    report = CleaningReport(policy=policy.as_dict(), text_policy=policy.text)
    kept: dict[str, str] = {}
    for raw_id, title in raw_titles.items():
        if title is not None:
            stripped = str(title).strip()
            report.with_char_refs += has_char_refs(stripped)
            report.with_irregular_whitespace += bool(_IRREGULAR_SPACE_RE.search(stripped))
            if policy.text == "normalize":
                normalized = normalize_title_text(stripped)
                report.text_normalized += normalized != stripped
                title = normalized
        kind = classify_title(title)
        if kind is not None:
            report.found[kind] += 1
            if getattr(policy, kind) == "drop":
                report.dropped[kind] += 1
                report.dropped_raw_ids.append(raw_id)
                continue
        kept[raw_id] = "" if title is None else str(title).strip()
    counts = Counter(kept.values())
    shared = {t for t, c in counts.items() if c > 1}
    # Like the data READMEs: an item is a duplicate if an earlier item already has its title
    # (items - distinct titles); the number of items in shared-title groups is reported beside it.
    report.found["duplicate"] = len(kept) - len(counts)
    report.items_sharing_a_title = sum(counts[t] for t in shared)
    if policy.duplicate == "drop":
        for raw_id in [r for r, t in kept.items() if t in shared]:
            del kept[raw_id]
            report.dropped["duplicate"] += 1
            report.dropped_raw_ids.append(raw_id)
    return kept, report


def _raw_sort_key(raw_id: str):
    # Numeric source ids keep their numeric order (1, 2, ..., 10), others sort as strings.
    # isdecimal, not isdigit: int() rejects digits such as "²" that isdigit() accepts.
    # Equal values ("2" and "02") are ordered shortest first, then as strings, so the order is total.
    return (0, int(raw_id), len(raw_id), raw_id) if raw_id.isdecimal() else (1, 0, 0, raw_id)


class ItemCatalog:
    """Item ids (contiguous from 1; 0 is padding) with their titles and source ids.

    >>> cat = ItemCatalog.from_titles({"10": "Halo", "2": "Tetris", "7": "Halo"})
    >>> cat.title(1), cat.raw_id(1), cat.item_ids_for_title("Halo")
    ('Tetris', '2', [2, 3])
    """

    def __init__(self, raw_ids: Iterable[str], titles: Iterable[str]):
        self.raw_ids: list[str] = [str(r) for r in raw_ids]
        self.path: Path | None = None  # the file it was loaded from (ItemCatalog.load)
        self.titles: list[str] = list(titles)
        if len(self.raw_ids) != len(self.titles):
            raise ValueError("raw_ids and titles differ in length")
        self._by_raw = {r: i + 1 for i, r in enumerate(self.raw_ids)}
        if len(self._by_raw) != len(self.raw_ids):
            raise ValueError("duplicate raw item ids in catalogue")
        self._by_title: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(self.titles):
            self._by_title[t].append(i + 1)

    @classmethod
    def from_titles(cls, raw_titles: Mapping[str, str]) -> ItemCatalog:
        """Number ``raw_id -> title`` from 1 in the order of the source ids."""
        order = sorted(raw_titles, key=_raw_sort_key)
        return cls(order, [raw_titles[r] for r in order])

    def __len__(self) -> int:
        return len(self.titles)

    @property
    def item_ids(self) -> range:
        return range(1, len(self.titles) + 1)

    def title(self, item_id: int) -> str:
        if not 1 <= item_id <= len(self.titles):
            raise KeyError(f"item id {item_id} is not in the catalogue (ids 1..{len(self.titles)})")
        return self.titles[item_id - 1]

    def raw_id(self, item_id: int) -> str:
        return self.raw_ids[item_id - 1]

    def id_for_raw(self, raw_id: str) -> int | None:
        return self._by_raw.get(str(raw_id))

    def item_ids_for_title(self, title: str) -> list[int]:
        """All item ids carrying ``title`` (several when items share a title), ascending."""
        return list(self._by_title.get(title, []))

    def unique_titles(self) -> list[str]:
        """Distinct titles in first-occurrence order (one decoding path each)."""
        return list(self._by_title)

    def save(self, path: str | Path) -> None:
        write_jsonl(
            Path(path),
            ({"item_id": i + 1, "raw_id": r, "title": t} for i, (r, t) in enumerate(zip(self.raw_ids, self.titles))),
        )

    @classmethod
    def load(cls, path: str | Path) -> ItemCatalog:
        path = Path(path)
        if path.is_dir():
            path = path / CATALOG_FILE
        if not path.exists():
            raise FileNotFoundError(f"catalogue file not found: {path}")
        raw_ids, titles = [], []
        line_of: dict[str, int] = {}
        for n, row in jsonl_records(path):  # n: the file's line (blank lines counted), for the messages
            for key in ("item_id", "raw_id", "title"):
                if key not in row:
                    raise DataFormatError(path, n, key, "missing")
            expected = len(titles) + 1
            if isinstance(row["item_id"], bool) or row["item_id"] != expected:  # True == 1 in Python
                raise DataFormatError(path, n, "item_id", f"expected {expected} (ids must be contiguous from 1)")
            raw = json_id(row["raw_id"], path, n, "raw_id")
            if raw in line_of:
                raise DataFormatError(path, n, "raw_id", f"raw id {raw!r} is also on line {line_of[raw]}")
            line_of[raw] = n
            title = row["title"]
            # prepare gives every item a title (items without one are dropped), and a model cannot generate ""
            if not isinstance(title, str):
                raise DataFormatError(path, n, "title", f"expected a string, got {json.dumps(title)[:40]}")
            if not title.strip():
                raise DataFormatError(path, n, "title", "empty title (a prepared catalogue has a title for every item)")
            raw_ids.append(raw)
            titles.append(title)
        if not titles:
            raise DataFormatError(path, None, None, "the catalogue is empty")
        catalog = cls(raw_ids, titles)
        catalog.path = path  # named by checks that read the titles later (e.g. special tokens in a title)
        return catalog
