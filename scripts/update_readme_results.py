"""Copy generated results tables into the documentation, so it never carries hand-typed numbers.

Each block ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` in README.md and in
benchmarks/README.md (the experiment log) is replaced by the contents of ``benchmarks/results/NAME.md``
(written by the benchmark commands). Blocks whose file does not exist are left as they are and reported;
with ``--check`` they are failures (a block nothing can regenerate is a hand-typed table). A marker that is
not part of a block (an opening without its closing marker, a closing one whose opening was deleted, which
leaves a hand-typed table above it) or that is malformed (e.g. ``<!-- results:NAME-->``, which the block
pattern does not see) is an error in both modes, reported with its line.

    python scripts/update_readme_results.py [--check]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)
MARKER = re.compile(r"<!-- (?P<close>/?)results:(?P<name>[\w.-]+) -->")
# Anything that looks like a marker, however spaced or cased: each must be a MARKER (else it is silently ignored).
LOOSE = re.compile(r"<!--\s*/?\s*results\s*:", re.I)


def render(readme: str, results_dir: Path) -> tuple[str, list[str]]:
    missing: list[str] = []

    def sub(m: re.Match) -> str:
        path = results_dir / f"{m['name']}.md"
        if not path.exists():
            missing.append(m["name"])
            return m.group(0)
        body = path.read_text(encoding="utf-8").rstrip("\n") + "\n"
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(sub, readme), missing


def marker_errors(text: str) -> list[tuple[int, str]]:
    """(line, message) of each marker that is malformed or not the opening or closing marker of a block."""
    def line(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    in_blocks = {pos for m in BLOCK.finditer(text) for pos in (m.start(1), m.start(4))}
    errors = []
    for loose in LOOSE.finditer(text):
        m = MARKER.match(text, loose.start())
        if m is None:
            end = text.find("\n", loose.start())
            shown = text[loose.start():end if end >= 0 else None]
            errors.append((line(loose.start()), f"malformed results marker {shown!r} "
                                                "(expected '<!-- results:NAME -->' or '<!-- /results:NAME -->')"))
        elif m.start() not in in_blocks:
            what = "closing marker without its opening" if m["close"] else "opening marker without its closing"
            errors.append((line(m.start()), f"results block {m['name']}: {what}"))
    return errors


DOCUMENTS = (ROOT / "README.md", ROOT / "benchmarks" / "README.md")


def update(doc: Path, results_dir: Path, check: bool) -> bool:
    """Regenerate ``doc``'s blocks (or, with ``check``, only compare). True if its markers are sound and, with
    ``check``, it is also up to date and complete."""
    name = doc.relative_to(ROOT).as_posix() if doc.is_relative_to(ROOT) else str(doc)
    old = doc.read_text(encoding="utf-8")
    new, missing = render(old, results_dir)
    for block in missing:
        print(f"{name}: no {results_dir.name}/{block}.md: block left as it is", file=sys.stderr)
    errors = marker_errors(old)
    for line, message in errors:
        print(f"{name}:{line}: error: {message}", file=sys.stderr)
    if check:
        if new != old:
            print(f"{name}: not up to date", file=sys.stderr)
        return new == old and not missing and not errors
    if new != old:  # the sound blocks are still updated
        from llmrec.data.canonical import atomic_write_text

        atomic_write_text(doc, new)
        print(f"{name} updated")
    return not errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if a document is not up to date or has a block without its results file")
    ap.add_argument("--readme", type=Path, action="append",
                    help="a document to update (repeatable; default: README.md and benchmarks/README.md)")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    ok = [update(doc, args.results_dir, args.check) for doc in (args.readme or DOCUMENTS)]
    return int(not all(ok))  # without --check: only for broken markers


if __name__ == "__main__":
    raise SystemExit(main())
