"""Is a finished SFT / GRPO run in an ``output_dir`` the run asked for now?

``llmrec sft`` / ``llmrec grpo`` skip a finished run (so pipelines can be rerun) and the quickstart reuses its
stages: both only when the run was made with the settings asked for now, compared field by field (what changes
nothing trained left out). :func:`refuse_other_finished_run` is the error that names each difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmrec.data.canonical import read_stats

if TYPE_CHECKING:
    from llmrec.training.grpo import LatentGRPOConfig
    from llmrec.training.sft import LatentSFTConfig


# Files the commands leave at the top of their output_dir, and the kind of run each marks.
RUN_MARKER_FILES = {
    "run_config.json": "an `llmrec seqrec train` run",
    "rankings.jsonl": "an `llmrec evaluate` output",
    "protocol.json": "an `llmrec evaluate` output",
    "llmrec_config.json": "an LLM checkpoint (`llmrec sft` / `llmrec grpo`)",
    "adapter_config.json": "an LLM checkpoint (`llmrec sft` / `llmrec grpo`)",
    "train_results.json": "an `llmrec sft` run",
}
LLM_CHECKPOINT_FILES = ("llmrec_config.json", "adapter_config.json", "train_results.json")


def refuse_other_kind_of_run(out: Path, command: str, own: tuple[str, ...] = ()) -> None:
    """Refuse to run ``command`` into an ``output_dir`` holding another kind of run (any of
    :data:`RUN_MARKER_FILES` but its ``own``): its files would go beside (or over, for a ``results.json``) the other
    run's, a directory no command reads as one run any more."""
    found = [name for name in RUN_MARKER_FILES if name not in own and (out / name).is_file()]
    if found:
        raise ValueError(f"{out} holds {', '.join(found)}: {RUN_MARKER_FILES[found[0]]}, not a {command} run; use "
                         "another output_dir")


def dataset_dir_or_none(name: str | None) -> Path | None:
    """The prepared dataset directory ``name`` names (an embedded sample resolved), or None if it cannot be found
    (then the comparisons that need the split's size leave it out)."""
    from llmrec.data.samples import resolve_dataset_dir

    try:
        return resolve_dataset_dir(name) if name else None
    except (OSError, ValueError):
        return None


def split_rows(data_dir: Path | None, split: str) -> int | None:
    """The rows of a split of a prepared dataset (its ``stats.json``), or None if unknown."""
    if data_dir is None or not (Path(data_dir) / "stats.json").is_file():
        return None
    return read_stats(Path(data_dir) / "stats.json").get("rows", {}).get(split)


def finished_sft_differences(cfg: LatentSFTConfig, data_dir: Path | None) -> dict[str, tuple[Any, Any]]:
    """``{setting: (found, asked)}`` between the finished SFT run in ``cfg.output_dir`` and ``cfg`` ({} if there is
    no finished run): rows, seed, model, data, dtype and every other trained field
    (:func:`llmrec.bench_pipeline.sft_run_differences`). ``data_dir``: the prepared dataset, for the rows of the
    train split (None if unknown: then an unlimited ``max_train_rows`` is taken to mean the rows the run had)."""
    from llmrec.bench_pipeline import sft_run_differences
    from llmrec.training.sft import RESULTS_NAME, TRAINING_ARGS_JSON

    out = Path(cfg.output_dir)
    if not (out / RESULTS_NAME).exists():
        return {}
    results = read_stats(out / RESULTS_NAME)
    n_train = split_rows(data_dir, cfg.train_split)
    if n_train is None and cfg.max_train_rows is None:
        n_train = results.get("drawn_train_rows", results.get("num_train_rows"))
    return sft_run_differences(results, read_stats(out / TRAINING_ARGS_JSON), cfg, n_train, data_dir)


def finished_grpo_differences(cfg: LatentGRPOConfig, data_dir: Path | None) -> dict[str, tuple[Any, Any]]:
    """``{setting: (found, asked)}`` between the finished GRPO run in ``cfg.output_dir`` and ``cfg`` ({} if there is
    none): the prompts it drew (``max_train_rows``, or the whole train split when it has fewer rows) and every other
    trained field of the config it recorded, the checkpoint it started from and its dtype included."""
    from llmrec.bench_pipeline import grpo_config_differences
    from llmrec.config import mismatches
    from llmrec.training.grpo import RESULTS_NAME
    from llmrec.training.sft import TRAINING_ARGS_JSON

    out = Path(cfg.output_dir)
    if not (out / RESULTS_NAME).exists():
        return {}
    results = read_stats(out / RESULTS_NAME)
    args = read_stats(out / TRAINING_ARGS_JSON)
    n = split_rows(data_dir, cfg.train_split)
    if n and cfg.exclude_sft_rows and cfg.sft_checkpoint:  # it draws from the rows its SFT did not train on
        from llmrec.training.grpo import sft_train_row_indices

        n -= len(sft_train_row_indices(cfg.sft_checkpoint, cfg.train_split, n))
    asked = cfg.max_train_rows if cfg.max_train_rows is not None else n
    # the prompts drawn, before those whose answer does not fit max_length were skipped (runs before 2026-12-06
    # recorded only the prompts kept)
    found: dict[str, Any] = {"prompts": results.get("drawn_prompts", results.get("prompts"))}
    wanted: dict[str, Any] = {"prompts": min(asked, n) if asked is not None and n else asked}
    if wanted["prompts"] is None:  # the split's size is unknown and no limit was asked: nothing to compare
        found, wanted = {}, {}
    start = grpo_start_differences(results, cfg.sft_checkpoint, data_dir)
    found.update(start)
    wanted.update({k: "what it holds now" for k in start})
    if "advantage_mode" in args:  # the run's own full config (older runs held a copy of the SFT's)
        found["model_dtype"], wanted["model_dtype"] = args.get("model_dtype"), cfg.model_dtype  # both concrete
        diff = grpo_config_differences(args, cfg, results.get("resumed_from"))
        found.update({k: f for k, (f, _) in diff.items()})
        wanted.update({k: w for k, (_, w) in diff.items()})
    return mismatches(found, wanted)


def grpo_start_differences(results: dict, sft_checkpoint: str | None, data_dir: Path | None) -> dict[str, str]:
    """``{"sft weights" | "data": what the run started from}`` where a finished GRPO run's results record another
    SFT checkpoint content or other data than ``sft_checkpoint`` and ``data_dir`` hold now (a retrained SFT in the
    same directory, a dataset prepared again in place); {} for runs that recorded neither."""
    from llmrec.training.grpo import start_differences, start_identity

    if results.get("sft_weights_sha256") is None and results.get("data_sha256") is None:
        return {}
    changed = start_differences(results, start_identity(sft_checkpoint, data_dir))
    out = {}
    if "other SFT weights" in changed:
        out["sft weights"] = f"sha256 {results['sft_weights_sha256'][:12]} (retrained since)"
    if "other data" in changed:
        out["data"] = "other prepared files (prepared again since)"
    return out


def refuse_other_finished_run(out_dir: Path, what: str, diff: dict[str, tuple[Any, Any]], remedy: str,
                              flags: dict[str, str] | None = None) -> None:
    """Raise ``ValueError`` naming each setting of ``diff`` (found, asked, and the flag in ``flags`` that sets it),
    the directory and ``remedy``."""
    if diff:
        flags = flags or {}
        details = ", ".join(f"{k}={f!r} (asked: {w!r}{' by ' + flags[k] if k in flags else ''})"
                            for k, (f, w) in diff.items())
        raise ValueError(f"{out_dir} holds a finished {what} made with {details}; {remedy}")
