"""Copy generated results tables into the documentation, so it never carries hand-typed numbers.

Each block ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` in README.md and in
benchmarks/README.md (the experiment log) is replaced by the contents of ``benchmarks/results/NAME.md``
(written by the benchmark commands). Blocks whose file does not exist are left as they are and reported;
with ``--check`` they, and an opening marker without its matching closing marker, are failures (a block
nothing can regenerate is a hand-typed table).

    python scripts/update_readme_results.py [--check]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


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


DOCUMENTS = (ROOT / "README.md", ROOT / "benchmarks" / "README.md")


def update(doc: Path, results_dir: Path, check: bool) -> bool:
    """Regenerate ``doc``'s blocks (or, with ``check``, only compare); True if it is up to date and complete."""
    name = doc.relative_to(ROOT).as_posix() if doc.is_relative_to(ROOT) else str(doc)
    old = doc.read_text(encoding="utf-8")
    new, missing = render(old, results_dir)
    for block in missing:
        print(f"{name}: no {results_dir.name}/{block}.md: block left as it is", file=sys.stderr)
    openings = re.findall(r"<!-- results:([\w.-]+) -->", old)
    matched = [m["name"] for m in BLOCK.finditer(old)]
    unmatched = sorted(n for n in set(openings) if openings.count(n) != matched.count(n))
    for block in unmatched:
        print(f"{name}: results block {block} has no matching closing marker", file=sys.stderr)
    if check:
        if new != old:
            print(f"{name}: not up to date", file=sys.stderr)
        return new == old and not missing and not unmatched
    if new != old:
        from llmrec.data.canonical import atomic_write_text

        atomic_write_text(doc, new)
        print(f"{name} updated")
    return not missing and not unmatched


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a document is not up to date")
    ap.add_argument("--readme", type=Path, action="append",
                    help="a document to update (repeatable; default: README.md and benchmarks/README.md)")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    ok = [update(doc, args.results_dir, args.check) for doc in (args.readme or DOCUMENTS)]
    return int(args.check and not all(ok))


if __name__ == "__main__":
    raise SystemExit(main())
