"""Copy generated results tables into README.md, so the README never carries hand-typed numbers.

Each block ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` in README.md is replaced by the
contents of ``benchmarks/results/NAME.md`` (written by the benchmark commands). Blocks whose file does
not exist are left as they are and reported; with ``--check`` they, and an opening marker without its matching
closing marker, are failures (a block nothing can regenerate is a hand-typed table).

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    readme = args.readme
    old = readme.read_text(encoding="utf-8")
    new, missing = render(old, args.results_dir)
    for name in missing:
        print(f"no benchmarks/results/{name}.md: block left as it is", file=sys.stderr)
    openings = re.findall(r"<!-- results:([\w.-]+) -->", old)
    matched = [m["name"] for m in BLOCK.finditer(old)]
    unmatched = sorted(n for n in set(openings) if openings.count(n) != matched.count(n))
    for name in unmatched:
        print(f"README.md: results block {name} has no matching closing marker", file=sys.stderr)
    if args.check:
        return int(new != old or bool(missing) or bool(unmatched))
    if new != old:
        readme.write_text(new, encoding="utf-8")
        print(f"{readme.name} updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
