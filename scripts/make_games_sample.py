#!/usr/bin/env python
"""Cut the quickstart's embedded sample of Amazon Games (DEALRec) from ../shared/data.

Picks ``--users`` users at random (fixed seed) among those with at least one validation or test
interaction and ``--min-train`` training interactions, keeps their full sequences, and writes the
DEALRec layout (``sequential_{train,valid,test}.txt`` + ``derived/items.jsonl`` with only the items
used) into ``llmrec/data/samples/games_sample``. The original user and item ids are kept, so every
line traces back to the source. Rerunning with the same arguments gives the same bytes.

    python scripts/make_games_sample.py --source ../shared/data/amazon_games_dealrec
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_seqs(path: Path) -> dict[str, list[str]]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if parts:
            out[parts[0]] = parts[1:]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "amazon_games_dealrec"))
    ap.add_argument("--output", default=str(ROOT / "llmrec" / "data" / "samples" / "games_sample"))
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--min-train", type=int, default=3)
    ap.add_argument("--max-train", type=int, default=60, help="skip extreme users to keep the sample small")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src, out = Path(args.source), Path(args.output)
    splits = {s: read_seqs(src / f"sequential_{s}.txt") for s in ("train", "valid", "test")}
    eligible = sorted(
        (u for u, tr in splits["train"].items()
         if args.min_train <= len(tr) <= args.max_train and (splits["valid"].get(u) or splits["test"].get(u))),
        key=int,
    )
    chosen = sorted(random.Random(args.seed).sample(eligible, args.users), key=int)
    used: set[str] = set()
    out.mkdir(parents=True, exist_ok=True)
    (out / "derived").mkdir(exist_ok=True)
    for s, seqs in splits.items():
        lines = []
        for u in chosen:
            items = seqs.get(u, [])
            used.update(items)
            lines.append(" ".join([u, *items]))
        (out / f"sequential_{s}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(src / "derived" / "items.jsonl", encoding="utf-8") as f, \
            open(out / "derived" / "items.jsonl", "w", encoding="utf-8", newline="\n") as g:
        for line in f:
            obj = json.loads(line)
            if str(obj["seq_id"]) in used:
                g.write(json.dumps({"seq_id": obj["seq_id"], "asin": obj["asin"], "title": obj["title"]},
                                   ensure_ascii=False) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}: {len(chosen)} users, {len(used)} items, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
