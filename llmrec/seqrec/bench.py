"""Multi-seed benchmark of the ID models on one split, and an inference-latency comparison.

``run_seqrec_benchmark`` trains and tests every model for every seed on the same prepared split,
skipping (model, seed) runs whose ``results.json`` already exists (so an interrupted benchmark resumes),
prints a mean +- std table and writes ``seqrec_bench.json`` / ``seqrec_bench.md`` into ``output``, with
``seqrec_bench.png`` (each run's validation curve, test NDCG@10 per model). Each finished
run's test rows are also ranked by ``llmrec evaluate --method seqrec`` (``<run>/test_eval``, the per-row file that
``llmrec compare`` reads), so every model gets its paired bootstrap 95% interval against the first model (per-row
metrics averaged over the seeds both have), not only mean +- std over seeds. A finished run asked for with larger
stopping rules (``--epochs``, ``--patience``; :data:`~llmrec.seqrec.config.EXTENDABLE_FIELDS`) trains on from its
checkpoints, as that run from scratch would. A finished run is reused whatever threads,
eval batch size and processes it ran with (the metrics do not depend on them); its timings do, so the timing columns
average only the runs made with this invocation's (``timing_settings``) and say so when those are not all.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from llmrec.data.canonical import atomic_write_json, atomic_write_text
from llmrec.distributed import distributed_state
from llmrec.evaluation.metrics import SEED_ROW_COVERAGE_NOTE

logger = logging.getLogger(__name__)

REPORTED = ("ndcg@10", "hr@10", "epoch_s", "infer_ms_per_row")
TIMED = ("epoch_s", "infer_ms_per_row")  # depend on timing_settings, which a reused run need not share


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it, else every CPU)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every OS (macOS, Windows)
        return os.cpu_count() or 1


def timing_settings(cfg: Any, num_processes: int, concurrent_runs: int = 1) -> dict[str, int]:
    """What a run's timings depend on besides the model and the data, under the names ``run_seqrec`` records them in
    ``timings``: torch's intra-op threads (``cfg.num_threads``, or this process's when 0), the eval batch size,
    the number of processes and the number of runs trained at once (``jobs``; a run recorded without it had 1)."""
    return {"torch_threads": cfg.num_threads if cfg.num_threads > 0 else torch.get_num_threads(),
            "eval_batch_size": cfg.eval_batch_size, "num_processes": num_processes, "concurrent_runs": concurrent_runs}


def _recorded_timing_setting(timings: dict[str, Any], key: str) -> Any:
    # runs finished before concurrent_runs was recorded were trained one at a time
    return timings.get(key, 1 if key == "concurrent_runs" else None)


def run_seqrec_benchmark(
    dataset_dir: str | Path,
    models: list[str],
    seeds: int,
    output: Path,
    /,  # positional only: a SeqRecConfig field of that name (dataset_dir) in ``overrides`` is then refused below
    model_overrides: dict[str, dict[str, Any]] | None = None,
    report_only: bool = False,
    jobs: int = 1,
    **overrides: Any,
) -> dict[str, dict[str, float]]:
    """Train + test each model for seeds ``0..seeds-1`` (config seed = 42 + s) on ``dataset_dir``.

    ``overrides`` are :class:`~llmrec.seqrec.config.SeqRecConfig` fields applied to every run (a
    ``config`` key names a recipe whose values come first, with ``model`` replaced per run; ``{model}`` in
    its path is replaced by each model's name, so every model reads its own recipe);
    ``model_overrides[model]`` adds per-model fields; ``report_only`` trains nothing and summarises the
    finished runs (seeds that have not finished are left out, and the table says how many seeds each has). ``jobs``
    > 1 trains that many runs at once, each in a process of its own (:func:`~llmrec.isolation.run_isolated`) with
    this process's torch threads divided among them unless ``num_threads`` is given, its output in
    ``<run>/train.log``, seed by seed (all models' seed 0 first, so a benchmark cut short has its seeds evenly);
    the runs' metrics and weights are those of ``jobs`` 1 with the same threads per run (``num_threads`` 0 means
    "not given" here; at least 1 thread each), their timings those of a machine shared by ``jobs`` runs (recorded as
    ``concurrent_runs``, one of the timing settings). Returns
    ``{model: {"ndcg@10", "hr@10", "epoch_s", "infer_ms_per_row", "<key>_std", "seeds", "timing_runs"}}``: the
    metrics over every seed; ``epoch_s`` and ``infer_ms_per_row`` over the ``timing_runs`` runs whose recorded
    threads, eval batch size and processes are this invocation's (:func:`timing_settings`; None when none is).
    """
    from llmrec.config import coerce_fields, read_recipe, to_dict
    from llmrec.data.identity import data_difference, data_sha256
    from llmrec.seqrec.config import SeqRecConfig, split_extension, training_field_differences
    from llmrec.seqrec.models import MODEL_NAMES
    from llmrec.seqrec.run import RESULTS_JSON, RUN_CONFIG_JSON, plan_extension, run_seqrec

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    if jobs > 1:
        from llmrec.isolation import in_distributed_launch

        if in_distributed_launch():  # a run's own process would join (and hang) the launched process group
            raise ValueError("jobs > 1 runs each run in a process of its own, which cannot join an `accelerate "
                             "launch` with several processes; use jobs 1 there (every process trains each run)")
    # Checked before the first run trains: a repeated model reused its own runs and counted every seed twice in
    # its mean +- std, and an unknown name failed only after the models before it had trained.
    if not models:
        raise ValueError("no model to benchmark (an empty model list)")
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {MODEL_NAMES}")
    repeated = sorted({m for m in models if models.count(m) > 1})
    if repeated:
        raise ValueError(f"model(s) {repeated} named more than once")
    output = Path(output)
    recipe = overrides.pop("config", None)
    # Set per run by the benchmark itself: an override of them was replaced without a word (--seed 7 ran seeds
    # 42.., --dataset_dir another dataset's name in the table).
    own = {"model": "--models", "seed": "--seeds (seed 42 + s for s < seeds)", "dataset_dir": "--dataset",
           "output_dir": "--output-dir"}
    taken = [k for k in overrides if k in own]
    if taken:
        raise ValueError("the benchmark sets " + ", ".join(f"{k} (use {own[k]})" for k in taken) + " itself")

    def recipe_for(model: str) -> dict[str, Any]:
        # "{model}" in the recipe path picks each model's own recipe (e.g. recipes/seqrec/{model}_ml100k.yaml).
        if not recipe:
            return {}
        path = str(recipe).replace("{model}", model)
        return coerce_fields([SeqRecConfig], read_recipe(path, keep_number_text=True), path)

    for model in models:  # every recipe read (and checked) before the first run starts
        recipe_for(model)
    overrides = coerce_fields([SeqRecConfig], overrides, "benchmark overrides")
    runs: dict[str, list[dict]] = {}
    finished: dict[str, dict[int, tuple[Path, dict]]] = {}  # model -> seed -> (run dir, its test metrics)
    digests: dict[str, str | None] | None = None  # of the dataset's files, read once when a finished run needs them
    asked: dict[str, SeqRecConfig] = {}  # model -> a config of this invocation (for its timing settings)
    # jobs processes share the cores: each takes its part of this process's threads where the run names none
    # (torch's default is every core, so jobs runs would each start that many and oversubscribe the machine)
    threads_per_job = max(1, torch.get_num_threads() // jobs)
    cpus = _usable_cpus()
    if jobs > cpus:  # still one thread each: the runs share cores, and their epoch times say so (concurrent_runs)
        logger.warning("jobs %d is more than the %d CPU(s) this process may use: the runs will share cores and each "
                       "train slower than one job at a time would", jobs, cpus)
    plans: list[tuple[str, int, Path, dict[str, Any]]] = []  # (model, s, run dir, config fields), model by model
    for model in models:
        for s in range(seeds):
            run_dir = output / "runs" / f"{model}_seed{s}"
            fields = {**recipe_for(model), **overrides, **(model_overrides or {}).get(model, {})}
            fields.update(model=model, dataset_dir=str(dataset_dir), output_dir=str(run_dir), seed=42 + s)
            if jobs > 1 and not int(fields.get("num_threads") or 0):
                fields["num_threads"] = threads_per_job
            asked[model] = SeqRecConfig(**fields)
            plans.append((model, s, run_dir, fields))
    # Every finished run is checked before the first training starts (an edited recipe or other options must not
    # be reported under results of the old settings, nor found out about only after hours of other runs).
    results: dict[tuple[str, int], dict] = {}
    for model, s, run_dir, fields in plans:
        res_file = run_dir / RESULTS_JSON
        if not res_file.exists():
            continue
        res = json.loads(res_file.read_text())
        if "config" not in res:
            raise ValueError(f"{res_file} records no config, so what it was trained with cannot be checked; "
                             "remove it or use another output directory")
        raised, diff = split_extension(training_field_differences(res.get("config", {}),
                                                                  to_dict(SeqRecConfig(**fields))))
        if diff or (raised and report_only):
            details = ", ".join(f"{k}={f!r} (asked: {w!r})" for k, (f, w) in sorted({**diff, **raised}.items()))
            remedy = ("run without --report-only to train it on with the larger stopping rules" if not diff else
                      "remove it or use another output directory")
            raise ValueError(f"{res_file} is a finished run made with {details}; {remedy}")
        # ... and on the same data: the dataset directory's files may have been re-prepared or edited since.
        # A run made before results.json recorded the digests has them (or the stats) in run_config.json.
        if digests is None:
            digests = data_sha256(dataset_dir)
        run_config = run_dir / RUN_CONFIG_JSON
        recorded = res if "data_sha256" in res else (json.loads(run_config.read_text()) if run_config.exists() else {})
        data = data_difference(recorded, dataset_dir, digests)
        if data:
            raise ValueError(f"{res_file} is a finished run made with {data}; remove it or use another "
                             "output directory")
        if raised:  # trained on by run_seqrec from its checkpoints (its results are removed then)
            plan_extension(run_dir, res["config"], SeqRecConfig(**fields))  # raises where it cannot
            logger.info("%s: a finished run made with %s: extending it", run_dir,
                        ", ".join(f"{k} {f} (asked: {w})" for k, (f, w) in raised.items()))
            continue
        results[model, s] = res
    pending = [] if report_only else [p for p in plans if (p[0], p[1]) not in results]  # a cut run is not reported
    if pending and not Path(dataset_dir).is_dir():  # before any run directory is made (each run would fail on it)
        raise FileNotFoundError(f"dataset directory {dataset_dir} does not exist (prepare it with `llmrec data "
                                "prepare`)")
    if pending:
        # Under several processes: every one has read the finished runs before the main one removes the results of
        # a run it extends (or another process would find them half gone). distributed_state, not a bare
        # PartialState: the first to set up accelerate's state here, the latter formed no process group on a
        # machine without GPUs, and every process then trained every run alone in the same directories (review).
        distributed_state().wait_for_everyone()
    if jobs == 1:
        for model, s, _, fields in pending:
            results[model, s] = run_seqrec(SeqRecConfig(**fields))
    elif pending:
        results.update(_train_in_parallel(pending, jobs))
    for model, s, run_dir, _ in plans:
        if (model, s) in results:
            res = results[model, s]
            runs.setdefault(model, []).append(res)
            finished.setdefault(model, {})[res["seed"]] = (run_dir, res["test"])
    paired = paired_differences(finished, dataset_dir)
    timing: dict[str, dict[str, int]] = {}  # model -> this invocation's timing settings
    if runs:
        timing = {m: timing_settings(asked[m], distributed_state().num_processes, jobs) for m in runs}
    summary: dict[str, dict[str, float]] = {}
    for model, rs in runs.items():
        # The timings only of the runs made with this invocation's threads, eval batch size and processes: a reused
        # run may have been made with others, which change its timings but not its metrics.
        timed = [r for r in rs if all(_recorded_timing_setting(r["timings"], k) == v for k, v in timing[model].items())]
        vals = {
            "ndcg@10": [r["test"]["ndcg@10"] for r in rs],
            "hr@10": [r["test"]["hr@10"] for r in rs],
            **{k: [r["timings"][k] for r in timed] for k in TIMED},
        }
        row: dict[str, float | None] = {"seeds": len(rs), "timing_runs": len(timed)}
        for k, xs in vals.items():
            row[k], row[f"{k}_std"] = _mean_std(xs) if xs else (None, None)
        if model in paired:
            for metric in ("ndcg@10", "hr@10"):
                d = paired[model][metric]
                row[f"{metric}_diff"], (row[f"{metric}_diff_lo"], row[f"{metric}_diff_hi"]) = d["diff"], d["ci95"]
                if "ci95_seeds_rows" in d:  # two seeds or more: the training runs' spread counted too
                    row[f"{metric}_diff_seeds_rows_lo"], row[f"{metric}_diff_seeds_rows_hi"] = d["ci95_seeds_rows"]
            row["paired_rows"] = paired[model]["rows"]
            row["paired_seeds"] = len(paired[model]["seeds"])
        summary[model] = row
    table = benchmark_table(summary, str(dataset_dir), baseline=next(iter(runs), None))
    if not distributed_state().is_main_process:  # every process has the summary; one prints and writes it
        return summary
    print(table)
    # The table and plot first, the JSON last: a summary cut after the JSON left the previous table (a review).
    atomic_write_text(output / "seqrec_bench.md", table)
    if runs:
        plot_seqrec_benchmark(runs, output / "seqrec_bench.png", title=str(dataset_dir))
    atomic_write_json(
        output / "seqrec_bench.json",
        {
            "dataset_dir": str(dataset_dir),
            "summary": summary,
            "jobs": jobs,  # runs trained at once by this invocation (their epoch times share the machine)
            # what summary's epoch_s and infer_ms_per_row were made with (over its timing_runs runs)
            "timing_settings": timing,
            "runs": {m: [_brief(r) for r in rs] for m, rs in runs.items()},
            "paired": paired,
        },
    )
    return summary


def validation_curve(result: dict, metric: str = "ndcg@10") -> tuple[list[int], list[float], int | None]:
    """``(epochs, values, selected)`` of one run's ``results.json``: the validation ``metric`` after each evaluated
    epoch, the phases one after another (LARES: SPT's epochs, then RPT's continue the count), and the position in
    that count of the epoch model selection took (None if the run records no phases)."""
    xs: list[int] = []
    ys: list[float] = []
    selected = None
    count = 0
    for phase in result.get("phases", []):
        for entry in phase.get("history", []):
            count += 1
            if "valid" in entry and metric in entry["valid"]:
                xs.append(count)
                ys.append(entry["valid"][metric])
                if phase.get("name") == result.get("best_phase", "train") and entry["epoch"] == result["best_epoch"]:
                    selected = count
    return xs, ys, selected


def plot_seqrec_benchmark(runs: dict[str, list[dict]], path: Path, title: str = "") -> None:
    """Two panels written atomically as PNG: every run's validation NDCG@10 by epoch (a dot at the epoch model
    selection took: how far each run trained past its best, and whether it was still rising), and test NDCG@10 per
    model (bar = mean over seeds, error bar = std when there are two seeds or more, dots = the seeds)."""
    from llmrec.plotting import pyplot, save_figure

    plt = pyplot()
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11.0, 4.0), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (model, rs) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        for j, r in enumerate(rs):
            xs, ys, selected = validation_curve(r)
            curves.plot(xs, ys, color=color, alpha=0.7, lw=1.2, label=model if j == 0 else None)
            if selected is not None:
                curves.plot([selected], [ys[xs.index(selected)]], "o", color=color, ms=5)
        test = [r["test"]["ndcg@10"] for r in rs]
        mean = statistics.fmean(test)
        std = statistics.stdev(test) if len(test) > 1 else None  # one seed: its spread is unknown, not 0
        bars.bar(i, mean, 0.6, color=color, alpha=0.6, yerr=std, capsize=3)
        bars.plot([i] * len(test), test, "k.", ms=4)
    curves.set_xlabel("epoch (LARES: SPT, then RPT)")
    curves.set_ylabel("validation NDCG@10")
    curves.set_title("validation by epoch (dot: selected epoch)", fontsize=9)
    curves.legend(fontsize=8)
    bars.set_xticks(range(len(runs)))
    bars.set_xticklabels(list(runs), rotation=30, ha="right", fontsize=8)
    bars.set_ylabel("test NDCG@10")
    bars.set_title("test (bar: mean, error bar: std over seeds, dots: seeds)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _train_logged(cfg: Any, log: Path, concurrent_runs: int) -> dict[str, Any]:
    """``run_seqrec(cfg)`` with this process's stdout, stderr and log records (INFO, as the CLI's) appended to ``log``,
    a failure's traceback included (it also goes back to the parent)."""
    import os
    import sys
    import traceback

    from llmrec.cli import configure_logging
    from llmrec.seqrec.run import run_seqrec

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab", buffering=0) as f:  # the descriptors below point at it until we return
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)  # a run's own process: nothing else writes to the terminal from it
        configure_logging("%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
        try:
            return run_seqrec(cfg, concurrent_runs=concurrent_runs)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            raise


def _train_in_parallel(pending: list[tuple[str, int, Path, dict[str, Any]]], jobs: int) -> dict[tuple[str, int], dict]:
    """Train ``pending`` runs ``jobs`` at a time, each in its own process, seed by seed; their results.

    A failing run does not stop the others: each failure is written out when it happens (run, error, log), and once
    every run has ended the first failing run's (in run order) error is raised again as it was raised in its run.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    from llmrec.isolation import run_isolated
    from llmrec.seqrec.config import SeqRecConfig

    order = sorted(pending, key=lambda p: p[1])  # stable: models in their given order within a seed
    models_order = list(dict.fromkeys(p[0] for p in pending))
    futures: dict = {}
    results: dict[tuple[str, int], dict] = {}
    failed: list[tuple[tuple[int, int], BaseException]] = []  # ((seed, model index), error)
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        with tqdm(total=len(order), desc="runs", unit="run") as bar:
            for model, s, run_dir, fields in order:
                log = run_dir / "train.log"
                futures[pool.submit(run_isolated, _train_logged, SeqRecConfig(**fields), log, jobs)] = (model, s, log)
            for future in as_completed(futures):
                model, s, log = futures[future]
                try:
                    res = future.result()
                except Exception as e:  # raised below, after the other runs
                    failed.append(((s, models_order.index(model)), e))
                    bar.write(f"{model} seed {s} failed: {type(e).__name__}: {e} (log: {log})")
                else:
                    results[model, s] = res
                    bar.write(f"{model} seed {s}: valid ndcg@10 {res['valid']['ndcg@10']:.4f}, "
                              f"test ndcg@10 {res['test']['ndcg@10']:.4f} (best epoch {res.get('best_epoch')})")
                bar.update()
    except BaseException:
        # Interrupted (Ctrl-C here, not in the runs): no queued run may start, and the running ones are stopped, not
        # left training on their own (they resume from their checkpoints on a rerun). A worker may be starting a run
        # as this happens (past the cancel, not yet a child), so stop children until every worker has returned.
        pool.shutdown(wait=False, cancel_futures=True)
        # (done(), not concurrent.futures.wait: a future cancelled by shutdown stays "not done" for wait())
        while True:
            for child in multiprocessing.active_children():
                if child.name == f"llmrec:{_train_logged.__qualname__}":
                    child.terminate()
            if all(f.done() for f in futures):
                break
            time.sleep(0.2)
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)
    if failed:
        raise min(failed, key=lambda f: f[0])[1]
    return results


def rank_test_rows(run_dir: Path, dataset_dir: str | Path, expected: dict[str, float]) -> Path:
    """``<run_dir>/test_eval``: the run's test rows ranked by ``llmrec evaluate --method seqrec`` (made if missing).

    Its metrics must be the run's own test metrics (``expected``, from ``results.json``): the same model, rows and
    tie-breaking; a mismatch (e.g. a stale ``test_eval`` left from an earlier run in that directory) is an error.
    """
    from llmrec.evaluation.evaluator import EvalConfig, evaluate
    from llmrec.seqrec.run import TEST_EVAL_DIR

    out = run_dir / TEST_EVAL_DIR
    if not (out / "results.json").exists():
        evaluate(EvalConfig(method="seqrec", checkpoint=str(run_dir), dataset=str(dataset_dir), split="test",
                            output_dir=str(out)))
    distributed_state().wait_for_everyone()  # the main process writes the files the others read next
    got = json.loads((out / "results.json").read_text())["metrics"]["item"]
    for metric in ("ndcg@10", "hr@10"):
        if abs(got[metric] - expected[metric]) > 1e-6:
            raise ValueError(f"{out}: test {metric} {got[metric]:.6f} is not the run's own {expected[metric]:.6f} "
                             f"({run_dir / 'results.json'}); remove {out} to rank the test rows again")
    return out


def paired_differences(finished: dict[str, dict[int, tuple[Path, dict]]], dataset_dir: str | Path) -> dict[str, dict]:
    """Each model against the first one: paired bootstrap 95% intervals of the NDCG@10 and HR@10 differences.

    ``finished``: model -> config seed -> (run directory, the run's test metrics). Pairs on the test rows, with
    each row's metrics averaged over the seeds both models have
    (:func:`llmrec.evaluation.compare.compare_runs` with ``seeds_per_run``). Returns ``{model: {"baseline",
    "seeds", "rows", "ndcg@10": {"diff", "ci95", "excludes_zero", ...}, "hr@10": {...}}}``, with two seeds or more
    also ``ci95_seeds_rows`` and ``per_seed_diff``.
    """
    from llmrec.evaluation.compare import compare_runs

    evals = {m: {seed: rank_test_rows(d, dataset_dir, test) for seed, (d, test) in seeds.items()}
             for m, seeds in finished.items()}
    if not evals:
        return {}
    baseline, *others = list(evals)
    out: dict[str, dict] = {}
    for model in others:
        shared = sorted(set(evals[model]) & set(evals[baseline]))
        if not shared:
            continue
        res = compare_runs([evals[baseline][s] for s in shared] + [evals[model][s] for s in shared],
                           ["ndcg@10", "hr@10"], seeds_per_run=len(shared))
        out[model] = {"baseline": baseline, "seeds": shared, "rows": res["rows"],
                      **{m: res["differences"][m][0] for m in ("ndcg@10", "hr@10")}}
    return out


def _brief(r: dict) -> dict:
    return {
        "seed": r["seed"],
        "test": r["test"],
        "valid": r["valid"],
        "best_epoch": r["best_epoch"],
        "best_phase": r.get("best_phase", "train"),
        "timings": r["timings"],
        "protocol": r["protocol"],
    }


def benchmark_table(summary: dict[str, dict[str, float]], title: str, baseline: str | None = None) -> str:
    """Markdown table: mean +- std over seeds of each reported number, and the paired differences to ``baseline``.

    The timings are over a row's ``timing_runs`` (default: all its seeds); when those are fewer, the cell says how
    many (``-`` for none)."""
    vs = f"NDCG@10 vs {baseline} [95% CI]" if baseline else "NDCG@10 diff [95% CI]"
    lines = [
        f"# seqrec benchmark: {title}",
        "",
        f"| model | seeds | NDCG@10 | HR@10 | {vs} | s/epoch | ms/row (each run's test pass) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in summary.items():
        diff = (f"{r['ndcg@10_diff']:+.4f} [{r['ndcg@10_diff_lo']:+.4f}, {r['ndcg@10_diff_hi']:+.4f}]"
                if "ndcg@10_diff" in r else "-")
        if "ndcg@10_diff_seeds_rows_lo" in r:
            diff += f"; seeds+rows [{r['ndcg@10_diff_seeds_rows_lo']:+.4f}, {r['ndcg@10_diff_seeds_rows_hi']:+.4f}]"
        base_seeds = summary[baseline]["seeds"] if baseline in summary else r["seeds"]
        if "paired_seeds" in r and r["paired_seeds"] < max(r["seeds"], base_seeds):
            # the columns beside it are over all of each model's seeds: say over which this one is
            n = int(r["paired_seeds"])
            diff += f" ({n} paired seed{'s' if n > 1 else ''})"

        def pm(key: str, digits: int, r=r) -> str:  # one seed has no spread: say so instead of "± 0"
            return (f"{r[key]:.{digits}f} ± {r[f'{key}_std']:.{digits}f}" if r["seeds"] > 1
                    else f"{r[key]:.{digits}f} (1 seed)")

        def timed(key: str, digits: int, r=r) -> str:  # over the runs made with this invocation's timing settings
            n, seeds = int(r.get("timing_runs", r["seeds"])), int(r["seeds"])
            if n == seeds:
                return pm(key, digits)
            if n == 0:
                return "-"
            return (f"{r[key]:.{digits}f} ± {r[f'{key}_std']:.{digits}f}" if n > 1 else f"{r[key]:.{digits}f}") + \
                f" ({n} of {seeds} runs)"

        lines.append(f"| {m} | {int(r['seeds'])} | {pm('ndcg@10', 4)} | {pm('hr@10', 4)} | {diff} | "
                     f"{timed('epoch_s', 2)} | {timed('infer_ms_per_row', 3)} |")
    rows = {int(p) for p in (summary[m].get("paired_rows") for m in summary) if p}
    partly = any(int(r.get("timing_runs", r["seeds"])) < r["seeds"] for r in summary.values())
    return "\n".join(lines) + "\n" + (f"\nDifferences: paired bootstrap over the {rows.pop()} test rows, each row's "
                                      "metrics averaged over the seeds both models have (these trained models); "
                                      "seeds+rows: the spread between seeds counted too (seed s paired with seed s; "
                                      f"llmrec.evaluation.metrics.seed_row_ci; {SEED_ROW_COVERAGE_NOTE}).\n"
                                      if len(rows) == 1 else "") + \
        ("\nTimings (s/epoch, ms/row): only over the runs made with this invocation's torch threads, eval batch size "
         "and processes (\"k of n runs\"; -: none), which change them; the metrics are over all seeds.\n"
         if partly else "")


@torch.no_grad()
def measure_inference(
    dataset_dir: str | Path,
    models: dict[str, dict[str, Any]],
    eval_batch_size: int = 256,
    repeats: int = 5,
    split: str = "test",
    clock: str = "process",
) -> dict[str, dict[str, Any]]:
    """Scoring latency per row of each model over a split, at ``eval_batch_size``, each on the split's rows as its own
    ``max_history`` cuts them (as training and evaluation give them to it).

    ``models`` maps a label to SeqRecConfig fields (e.g. ``{"sasrec": {"model": "sasrec"},
    "rearec-k2": {"model": "rearec-erl", "reason_steps": 2}}``). Latency does not depend on the
    weights, so models are freshly initialised. After one warm-up pass of every model, the models are timed in
    turn, ``repeats`` rounds interleaved (so background load hits all alike); the median round is reported, and
    ``ratio_vs_first``, the median over rounds of each round's time over the first model's in the same round.
    ``clock``: ``"process"`` (CPU time of this process: other jobs on a shared machine barely move it) or
    ``"wall"``.
    """
    from llmrec.seqrec.config import SeqRecConfig
    from llmrec.seqrec.data import load_seqrec_data
    from llmrec.seqrec.models import build_model

    if clock not in ("process", "wall"):
        raise ValueError(f"clock must be 'process' or 'wall', got {clock!r}")
    now = time.process_time if clock == "process" else time.perf_counter
    built = {}
    inputs: dict[str, torch.Tensor] = {}  # label -> the split's rows cut to the model's own max_history
    loaded: dict[int, torch.Tensor] = {}
    for label, fields in models.items():
        cfg = SeqRecConfig(dataset_dir=str(dataset_dir), **fields)
        if cfg.max_history not in loaded:
            data = load_seqrec_data(dataset_dir, cfg.max_history)
            loaded[cfg.max_history], num_items = torch.from_numpy(getattr(data, split).inputs), data.num_items
        inputs[label] = loaded[cfg.max_history]
        torch.manual_seed(0)
        built[label] = build_model(cfg, num_items).eval()
    times: dict[str, list[float]] = {k: [] for k in built}
    for label, m in built.items():  # warm-up: the whole split once
        rows = inputs[label]
        for i in range(0, len(rows), eval_batch_size):
            m.score(rows[i : i + eval_batch_size])
    for _ in range(repeats):
        for label, m in built.items():
            rows = inputs[label]
            t0 = now()
            for i in range(0, len(rows), eval_batch_size):
                m.score(rows[i : i + eval_batch_size])
            times[label].append(1000 * (now() - t0) / len(rows))
    first = next(iter(times.values()))
    return {k: {"ms_per_row": statistics.median(v), "rounds": v,
                "ratio_vs_first": statistics.median(a / b for a, b in zip(v, first, strict=True))}
            for k, v in times.items()}
