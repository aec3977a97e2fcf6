"""The scripts that write committed results files: scripts/seqrec_ml100k_table.py (the table of
scripts/seqrec_ml100k.sh) and scripts/games_grpo_sweep.sh (run against a stand-in ``llmrec``)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


def _table_module():
    return load_script("seqrec_ml100k_table")


def _run(seed: int, ndcg: float, threads: int = 1) -> dict:
    return {"seed": seed, "test": {"ndcg@10": ndcg, "hr@10": 0.1, "ndcg@20": ndcg + 0.02}, "best_epoch": 5,
            "best_phase": "train", "timings": {"epoch_s": 1.0, "infer_ms_per_row": 0.1, "torch_threads": threads,
                                               "eval_batch_size": 256, "num_processes": 1}}


def _row(seeds: int, ndcg: float, timing_runs: int) -> dict:
    timed = {"epoch_s": 2.0, "infer_ms_per_row": 0.2} if timing_runs else {"epoch_s": None, "infer_ms_per_row": None}
    return {"seeds": seeds, "timing_runs": timing_runs, "ndcg@10": ndcg, "ndcg@10_std": 0.001, "hr@10": 0.1,
            "hr@10_std": 0.01, **timed}


def _pair(baseline: str, diff: float) -> dict:
    d = {"diff": diff, "ci95": [diff - 0.01, diff + 0.01], "excludes_zero": False}
    return {"baseline": baseline, "seeds": [42, 43], "rows": 943, "ndcg@10": d, "hr@10": d}


def _bench(model: str, ndcg: float, timing_runs: int, threads: int) -> dict:
    """A ``llmrec bench seqrec`` result of one model over seeds 42 and 43 (``timing_runs`` of them timed)."""
    return {"dataset_dir": "/data", "summary": {model: _row(2, ndcg, timing_runs)},
            "timing_settings": {model: {"torch_threads": threads, "eval_batch_size": 256, "num_processes": 1}},
            "runs": {model: [_run(42, ndcg, threads), _run(43, ndcg, threads)]}, "paired": {}}


def _committed() -> dict:
    """A committed result: SASRec and LARES benchmarked together (LARES's paired interval against SASRec)."""
    return {"dataset_dir": "/data", "summary": {"sasrec": _row(2, 0.05, 2), "lares": _row(2, 0.055, 2)},
            "runs": {"sasrec": [_run(42, 0.05), _run(43, 0.05)], "lares": [_run(42, 0.055), _run(43, 0.055)]},
            "paired": {"lares": _pair("sasrec", 0.005)}}


def _row_of(text: str, model: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {model} |"))


def test_seqrec_table_reproduces_the_committed_table():
    """The table code moved out of seqrec_ml100k.sh unchanged for a complete result (the committed one)."""
    mod = _table_module()
    results = ROOT / "benchmarks" / "results"
    bench = json.loads((results / "seqrec_ml100k_bench.json").read_text(encoding="utf-8"))
    assert mod.table(bench) == (results / "seqrec_ml100k_bench.md").read_text(encoding="utf-8")
    assert 'python scripts/seqrec_ml100k_table.py "$OUT"' in (ROOT / "scripts" / "seqrec_ml100k.sh").read_text()


def test_seqrec_table_timings_not_all_or_none_made_with_this_invocations_settings():
    mod = _table_module()
    bench = _bench("sasrec", 0.05, timing_runs=0, threads=2)  # no run made with these settings: None timings
    bench["summary"]["lares"] = _row(2, 0.055, timing_runs=1)
    bench["runs"]["lares"] = [_run(42, 0.055, 2), _run(43, 0.055, 3)]
    bench["timing_settings"]["lares"] = {"torch_threads": 2, "eval_batch_size": 256, "num_processes": 1}
    text = mod.table(bench)
    assert _row_of(text, "sasrec").endswith("| 5, 5 | - | - |")
    assert _row_of(text, "lares").endswith("| 2.0 (1 of 2 runs) | 0.200 (1 of 2 runs) |")
    assert "2 torch threads per run" in text and "one torch thread" not in text
    assert '("k of n runs"; -: none)' in text
    bench["timing_settings"]["lares"]["torch_threads"] = 1
    assert "torch threads per run: sasrec 2, lares 1" in mod.table(bench)


def test_seqrec_merge_drops_a_committed_interval_against_a_rerun_baseline():
    mod = _table_module()
    # SASRec rerun (other test metrics): LARES's committed interval was against the old SASRec runs.
    bench = _bench("sasrec", 0.06, timing_runs=2, threads=1)
    dropped = mod.merge_committed(bench, _committed())
    assert dropped == {"lares": "sasrec"} and "lares" not in bench["paired"]
    assert set(bench["summary"]) == {"sasrec", "lares"}
    row = _row_of(mod.table(bench, dropped), "lares")
    assert "(-8.3% vs SASRec; no paired interval: sasrec rerun since)" in row and "[" not in row
    # SASRec's runs the same as the committed ones (e.g. reported again): the interval still holds.
    bench = _bench("sasrec", 0.05, timing_runs=2, threads=1)
    assert mod.merge_committed(bench, _committed()) == {}
    assert bench["paired"]["lares"] == _pair("sasrec", 0.005)
    assert "(+10.0% vs SASRec; +0.0050 [-0.0050, +0.0150])" in _row_of(mod.table(bench), "lares")
    # A pairing stored from SASRec's side (SASRec ran second) whose other model was rerun: dropped, and said so.
    old = _committed()
    old["paired"] = {"sasrec": _pair("lares", -0.005)}
    bench = _bench("lares", 0.07, timing_runs=2, threads=1)
    dropped = mod.merge_committed(bench, old)
    mod.flip_sasrec_pairing(bench["paired"])
    assert dropped == {"sasrec": "lares"} and bench["paired"] == {}
    assert "no paired interval: lares rerun since)" in _row_of(mod.table(bench, dropped), "lares")


def test_seqrec_table_main_writes_the_committed_files(tmp_path):
    mod = _table_module()
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    results.mkdir()
    bench = _bench("sasrec", 0.06, timing_runs=0, threads=1)
    (out / "seqrec_bench.json").write_text(json.dumps(bench))
    (results / "seqrec_ml100k_bench.json").write_text(json.dumps(_committed()))
    assert mod.main([str(out), "--results-dir", str(results)]) == 0
    written = json.loads((results / "seqrec_ml100k_bench.json").read_text())
    assert set(written["summary"]) == {"sasrec", "lares"} and written["paired"] == {}
    assert written["timing_settings"] == bench["timing_settings"]
    text = (results / "seqrec_ml100k_bench.md").read_text()
    assert _row_of(text, "sasrec").endswith("| - | - |")
    assert sorted(p.name for p in results.iterdir()) == ["seqrec_ml100k_bench.json", "seqrec_ml100k_bench.md"]
    again = copy.deepcopy(written)  # rerun on its own output: nothing changes
    (out / "seqrec_bench.json").write_text(json.dumps(again))
    assert mod.main([str(out), "--results-dir", str(results)]) == 0
    assert json.loads((results / "seqrec_ml100k_bench.json").read_text()) == written


FAKE_LLMREC = """\
import json, sys
from pathlib import Path
cmd, args = sys.argv[1], sys.argv[2:]
opt = lambda name: args[args.index(name) + 1]
if cmd == "grpo":  # what a finished run leaves: its configuration
    out = Path(opt("--output_dir")); out.mkdir(parents=True, exist_ok=True)
    (out / "training_args.json").write_text(json.dumps({"num_generations": 4, "train_lora": False}))
elif cmd == "evaluate":
    out = Path(opt("--output_dir")); out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"max_rows": int(opt("--max_rows"))}))
elif cmd == "compare":
    runs = [a for a in args[:args.index("--metrics")]]
    Path(opt("--output")).write_text(json.dumps({"runs": runs, "metrics": {"ndcg@10": [0.1] * len(runs)}}))
    print("| run | ndcg@10 |"); print("|---|---|")
    for r in runs: print(f"| {r} | 0.1 |")
    print("wrote", opt("--output"))  # the last line, which the script drops
"""


def test_games_grpo_sweep_commits_what_it_ran(tmp_path):
    """The committed .md says the evaluated rows and the group size the runs had, and lands whole (no temporary
    left beside it)."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "games_grpo_sweep.sh", root / "scripts")
    out = root / "out"
    for f in ("sft_latent/train_results.json", "eval_sft_latent/results.json", "eval_sft_bigrec/results.json"):
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text("{}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "llmrec"
    fake.write_text(f"#!{sys.executable}\n{FAKE_LLMREC}")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUT": str(out), "EVAL_ROWS": "100",
           "LRS": "1e-5", "MODES": "batch", "NAME": "t"}
    subprocess.run(["bash", str(root / "scripts" / "games_grpo_sweep.sh")], env=env, check=True,
                   capture_output=True, text=True)
    results = root / "benchmarks" / "results"
    assert sorted(p.name for p in results.iterdir()) == ["t_smollm2.json", "t_smollm2.md", "t_sweep_smollm2.json"]
    md = (results / "t_smollm2.md").read_text()
    assert md.startswith("Latent GRPO sweep (128 prompts per run, G=4, head only, noise 1.5 absolute), screened on "
                         "200 validation rows\n")
    assert "Best on validation: grpo_batch_lr1e-5. Test, 100 rows (" in md
    assert json.loads((results / "t_smollm2.json").read_text())["runs"][1] == f"{out}/eval_grpo_batch_lr1e-5"


def test_seqrec_table_names_the_seeds_run_and_compares_with_sasrec_on_shared_seeds():
    """The caption said "42, 43, 44" whatever the seeds were, and a 2-seed model's % was over SASRec's 3-seed mean
    (a review)."""
    mod = _table_module()
    bench = {"dataset_dir": "/data", "summary": {"sasrec": _row(3, 0.06, 3), "lares": _row(2, 0.055, 2)},
             "runs": {"sasrec": [_run(45, 0.05), _run(46, 0.05), _run(47, 0.08)],
                      "lares": [_run(45, 0.055), _run(46, 0.055)]}, "paired": {}}
    text = mod.table(bench)
    assert "over the finished seeds of 45, 46, 47 (seeds column)" in text
    assert "(+10.0% vs SASRec on seeds 45, 46)" in _row_of(text, "lares")  # not 0.055 / 0.06: -8.3%
