"""Shared fixtures: a small prepared dataset in the canonical layout, written offline."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from llmrec.data.canonical import atomic_write_json, write_jsonl
from llmrec.data.catalog import ItemCatalog

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Every fast test runs on one torch thread: the tensors are tiny and the test machines' cores are
    shared, so extra intra-op threads only add synchronisation (10-100x slower when oversubscribed)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
SHARED_DATA = REPO.parent / "shared" / "data"

WORDS = ["Super", "Mario", "Zelda", "Halo", "Tetris", "Sonic", "Kirby", "Metroid", "Prime", "Deluxe",
         "Edition", "PC", "Gold", "Collection", "Street", "Fighter", "Dark", "Souls", "Minecraft", "Pokemon"]


def make_titles(n: int, seed: int = 0) -> list[str]:
    """Distinct-ish random titles from the tiny tokenizer's vocabulary words, with some duplicates
    and some titles that are prefixes of others."""
    rng = random.Random(seed)
    titles = []
    for i in range(n):
        if i % 7 == 3 and titles:
            titles.append(titles[-1])  # a title shared by two items
        elif i % 5 == 4 and titles:
            titles.append(titles[-1] + " " + rng.choice(WORDS))  # extends an earlier title
        else:
            titles.append(" ".join(rng.sample(WORDS, rng.randint(1, 3))) + f" {i}")
    return titles


def write_prepared(directory: Path, n_items: int = 30, n_users: int = 12, seed: int = 0) -> Path:
    """A prepared directory (catalog + train/valid/test) with leave-one-out rows."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    titles = make_titles(n_items, seed)
    ItemCatalog([str(i) for i in range(1, n_items + 1)], titles).save(directory / "catalog.jsonl")
    splits = {"train": [], "valid": [], "test": []}
    for u in range(n_users):
        seq = [rng.randint(1, n_items) for _ in range(rng.randint(4, 9))]
        for pos in range(1, len(seq)):
            split = "test" if pos == len(seq) - 1 else "valid" if pos == len(seq) - 2 else "train"
            splits[split].append({"user_id": str(u), "history_item_ids": seq[:pos], "target_item_id": seq[pos],
                                  "timestamp": pos})
    for name, rows in splits.items():
        write_jsonl(directory / f"{name}.jsonl", rows)
    atomic_write_json(directory / "stats.json", {"rows": {k: len(v) for k, v in splits.items()}})
    return directory


@pytest.fixture
def prepared_dir(tmp_path: Path) -> Path:
    return write_prepared(tmp_path / "data")


@pytest.fixture
def early_stopping_seen(monkeypatch) -> list[bool]:
    """The ``early_stopping`` of every ``constrained_beam_search`` call that ``llmrec.decoding.search`` makes."""
    import llmrec.decoding.search as search

    seen: list[bool] = []
    real = search.constrained_beam_search

    def spy(*args, **kw):
        seen.append(kw["early_stopping"])
        return real(*args, **kw)

    monkeypatch.setattr(search, "constrained_beam_search", spy)
    return seen


def train_tiny_sasrec(data_dir: Path, out: Path, **overrides) -> Path:
    """A finished ``llmrec seqrec train`` run of a tiny SASRec on ``data_dir`` (seconds on one thread)."""
    from llmrec.seqrec.config import SeqRecConfig
    from llmrec.seqrec.run import run_seqrec

    fields = dict(dataset_dir=str(data_dir), output_dir=str(out), model="sasrec", max_history=5, hidden_size=16,
                  n_layers=1, n_heads=2, inner_size=32, dropout=0.0, attn_dropout=0.0, epochs=3, batch_size=8,
                  eval_batch_size=16, lr=1e-2, patience=3, progress=False, num_threads=1, seed=0)
    fields.update(overrides)
    run_seqrec(SeqRecConfig(**fields))
    return out


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under ``log_dir``: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def load_script(name: str):
    """A script of scripts/ (``name`` without ``.py``) imported as a module, for the tests of its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def call_concurrently(fn, n: int = 2) -> tuple[list, list]:
    """``fn()`` in ``n`` threads started together (as processes of one launch would): ``(results, errors)``."""
    import threading

    results, errors = [], []

    def call():
        try:
            results.append(fn())
        except BaseException as e:  # returned for the test's assertion
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors
