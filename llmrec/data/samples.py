"""Named datasets that ship with the package (the quickstart's embedded Amazon Games sample).

``games-sample`` is a small real sample of DEALRec Amazon Games, cut by
``scripts/make_games_sample.py`` from ../shared/data; it ships as raw sequence files + title map
(``llmrec/data/samples/games_sample``) and is prepared on first use into a cache directory.
"""

from __future__ import annotations

import os
from pathlib import Path

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
SAMPLES = {"games-sample": "games_sample"}


def cache_root() -> Path:
    """llmrec's cache folder (prepared samples, converted models): ``$LLMREC_CACHE``, else
    ``$XDG_CACHE_HOME/llmrec``, else ``~/.cache/llmrec``; ``~`` expanded. One rule for data and models: the
    samples' copy ignored XDG_CACHE_HOME and took an empty LLMREC_CACHE as the working directory."""
    root = os.environ.get("LLMREC_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "llmrec"


def sample_source(name: str) -> Path:
    if name not in SAMPLES:
        raise KeyError(f"unknown sample '{name}'; known: {', '.join(SAMPLES)}")
    return SAMPLES_DIR / SAMPLES[name]


def sample_cache_dir(name: str) -> Path:
    """Where the embedded sample ``name`` is prepared on first use (whether or not it is there yet)."""
    from llmrec import __version__

    # Keyed by version: a newer llmrec may prepare differently, so it never reads a stale copy.
    return cache_root() / "data" / f"{name}-{__version__}"


def resolve_dataset_dir(directory: str | os.PathLike) -> Path:
    """A prepared directory, or the name of an embedded sample (prepared into the cache on first use)."""
    name = str(directory)
    if name in SAMPLES and not Path(name).exists():
        target = sample_cache_dir(name)
        if not (target / "stats.json").exists():
            from filelock import FileLock

            from llmrec.data.formats import read_seq_txt
            from llmrec.data.prepare import prepare

            # Processes starting together (accelerate launch) prepare it once, one after the other: without the
            # lock the second finished copy replaced the first in two renames, between which the directory was
            # missing for a process already reading it (review).
            target.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(target.parent / f".{target.name}.lock")):
                if not (target / "stats.json").exists():
                    prepare(read_seq_txt(sample_source(name)), target)
        return target
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(
            f"prepared dataset directory not found: {path} (run `llmrec data prepare` first, "
            f"or use an embedded sample: {', '.join(SAMPLES)})"
        )
    return path
