"""Content identity of a prepared dataset: the digests a training run records of the files it read.

A path can hold other contents later (a dataset prepared again in place, an edited split): ``stats.json`` counts
do not tell, digests do. The ID-model trainer, SFT and GRPO record :func:`data_sha256`; reusing or resuming a run
compares it with :func:`data_difference`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmrec.data.canonical import CATALOG_FILE, SPLITS

DATA_FILES = (CATALOG_FILE, *(f"{split}.jsonl" for split in SPLITS))  # the catalogue and every split


def data_sha256(dataset_dir: str | Path) -> dict[str, str | None]:
    """``{file: SHA-256}`` of a prepared dataset's catalogue and splits (None for a missing file)."""
    # imported here, as the evaluator does: the module imports transformers
    from llmrec.models.backbone import sha256_of_files

    files = {name: Path(dataset_dir) / name for name in DATA_FILES}
    return {name: sha256_of_files([path]) if path.exists() else None for name, path in files.items()}


def data_difference(recorded: dict[str, Any], dataset_dir: str | Path,
                    digests: dict[str, str | None] | None = None) -> str | None:
    """Why the data a run recorded (``recorded``: its ``data_sha256`` and/or ``data_stats``) is not the data in
    ``dataset_dir`` now, or None if it is. ``digests``: ``data_sha256(dataset_dir)`` when the caller has it.

    A record without digests (made before they were recorded) is compared by its ``stats.json`` content only.
    """
    if recorded.get("data_sha256") is not None:
        now = digests if digests is not None else data_sha256(dataset_dir)
        changed = [name for name in DATA_FILES if recorded["data_sha256"].get(name) != now[name]]
        if changed:
            return (f"another dataset (the contents of {', '.join(str(Path(dataset_dir) / f) for f in changed)} are "
                    "not those it was trained on)")
        return None
    stats = Path(dataset_dir) / "stats.json"
    if "data_stats" in recorded and recorded["data_stats"] != (json.loads(stats.read_text()) if stats.exists() else None):
        return f"another dataset ({stats} differs)"
    return None
