"""2-process training (accelerate launch, gloo on CPU) equals 1 process with the same global batch."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from launching import accelerate_launch, run_script_here
from test_seqrec import write_successor_dataset

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from llmrec.seqrec.config import SeqRecConfig
    from llmrec.seqrec.run import run_seqrec

    data_dir, out, rows_data_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    common = dict(dataset_dir=data_dir, max_history=10, hidden_size=16, n_layers=1, n_heads=2, inner_size=32,
                  dropout=0.0, attn_dropout=0.0, epochs=2, batch_size=6, eval_batch_size=8, lr=1e-2,
                  progress=False, resume=False)
    models = {
        "sasrec": {},
        "rearec-erl": {"reason_steps": 2},
        "rearec-prl": {"reason_steps": 2, "noise_std": 0.0},
        # Random depth (Poisson-lognormal per step) and random initial states (per row) as in the recipes,
        # then the filter (random states) and RPT: keyed draws, so the same on both layouts.
        "lares": {"mean_recurrence": 2, "tla_weight": 0.0, "sla_weight": 0.0, "rpt_epochs": 2,
                  "rpt_dropout": 0.0, "rpt_batch_size": 6, "rpt_group": 3, "filter_topk": 3, "rpt_lr": 1e-2},
    }
    for name, extra in models.items():
        run_seqrec(SeqRecConfig(model=name, output_dir=f"{out}/{name}", **common, **extra))
    # The GRU backbone: GRU4Rec, and ReaRec reasoning on it (noisy view off, as for the Transformer above: the
    # contrastive term's in-batch negatives are local to each process)
    run_seqrec(SeqRecConfig(model="gru4rec", output_dir=f"{out}/gru4rec", **common))
    run_seqrec(SeqRecConfig(model="rearec-prl", backbone="gru", output_dir=f"{out}/rearec-prl-gru", **common,
                            reason_steps=2, noise_std=0.0))
    # One sample per row, 65 rows in global batches of 8: the last batch holds one loss position, fewer than the
    # processes (its loss normaliser was floored at 1 per process, halving its gradient on 2 processes)
    run_seqrec(SeqRecConfig(model="sasrec", output_dir=f"{out}/sasrec-rows", train_mode="rows",
                            **dict(common, dataset_dir=rows_data_dir, batch_size=8)))
    # A finished run extended (epochs 2 -> 3: the main process alone edits its directory, every process resumes).
    run_seqrec(SeqRecConfig(model="sasrec", output_dir=f"{out}/sasrec-ext", **common))
    run_seqrec(SeqRecConfig(model="sasrec", output_dir=f"{out}/sasrec-ext", **dict(common, epochs=3, resume=True)))

    # What llmrec does at exit: destroying the group must free it and join gloo's worker threads. A group kept
    # alive (importing torch._dynamo after it was created, as DDP does, holds it) leaves them running past
    # the interpreter, and about one launch in 20 then aborted at exit (SIGABRT) after its work had finished.
    import os
    import llmrec
    llmrec._destroy_process_group_at_exit()
    if os.path.isdir("/proc/self/task"):
        threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        assert not [t for t in threads if "gloo" in t], threads
    """
)


def test_two_processes_match_one_process(tmp_path):
    from safetensors.torch import load_file

    # 16 train windows in global batches of 6, 6 and 4: with 2 processes accelerate fills the last batch with 2
    # rows from the epoch's start (3 per process), which must carry no loss.
    data = write_successor_dataset(tmp_path / "d")
    rows_data = write_successor_dataset(tmp_path / "d65", users=13, length=8)  # 13 users x 5 train rows
    assert sum(1 for _ in open(rows_data / "train.jsonl")) == 65
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run_script_here(script, data, tmp_path / "one", rows_data)  # 1 process: this one
    accelerate_launch(2, [script, data, tmp_path / "two", rows_data])
    for name in ("sasrec", "rearec-erl", "rearec-prl", "lares", "sasrec-rows", "gru4rec", "rearec-prl-gru"):
        phases = ("train", "rpt") if name == "lares" else ("train",)
        for phase in phases:
            a, b = (load_file(str(_last_weights(tmp_path / run / name / phase))) for run in ("one", "two"))
            assert a.keys() == b.keys()
            for k in a:
                x, y = a[k], b[k]
                if k.endswith("qkv.bias"):
                    # The key part of the qkv bias has no true gradient (softmax ignores a per-query constant),
                    # and Adam turns the float noise of its gradient (another summation order per layout) into
                    # steps of ~lr there, which no output sees: compare the query and value parts only.
                    x, y = (torch.cat([t[:16], t[32:]]) for t in (x, y))
                # The rows the loader adds to a last batch, if trained on, move the weights by ~1e-2. RPT starts
                # from SPT weights that already differ by float noise (~6e-6: another summation order per layout)
                # and its 2 epochs at lr 1e-2 under Adam grow that tenfold: up to 6.2e-5 on one AVX2 machine, under
                # 3e-5 on another. Its tolerance is still two orders below a layout-dependent result.
                atol = 2e-4 if phase == "rpt" else 3e-5
                assert torch.allclose(x, y, atol=atol, rtol=1e-4), (name, phase, k, (x - y).abs().max())
        one = json.loads((tmp_path / "one" / name / "results.json").read_text())
        two = json.loads((tmp_path / "two" / name / "results.json").read_text())
        assert (one["timings"]["num_processes"], two["timings"]["num_processes"]) == (1, 2)
        assert one["timings"]["epochs"] == two["timings"]["epochs"] == 2 * len(phases)
        # the same validation ranking (gathered across the 2 processes) from the same weights
        assert one["valid"] == pytest.approx(two["valid"], abs=1e-6)
        # every logged term is the batch's on both layouts (2 processes logged rank 0's share alone: the loss, then
        # CE, KL, PTA, depth, RPT's reward and KL)
        for p, phase in enumerate(phases):
            logged = [[{k: v for k, v in e.items() if k not in ("seconds", "valid")} for e in r["phases"][p]["history"]]
                      for r in (one, two)]
            assert len(logged[0]) == len(logged[1])
            for a, b in zip(*logged):
                assert a == pytest.approx(b, rel=1e-4, abs=1e-6), (name, phase, a, b)
            assert set(logged[0][0]) > {"epoch", "loss"}, logged[0][0]
    ext = [json.loads((tmp_path / run / "sasrec-ext" / "results.json").read_text()) for run in ("one", "two")]
    assert ext[0]["timings"]["epochs"] == ext[1]["timings"]["epochs"] == 3
    assert ext[0]["valid"] == pytest.approx(ext[1]["valid"], abs=1e-6)
    a, b = (load_file(str(_last_weights(tmp_path / run / "sasrec-ext" / "train"))) for run in ("one", "two"))
    for k in a:
        if not k.endswith("qkv.bias"):  # as above
            assert torch.allclose(a[k], b[k], atol=3e-5, rtol=1e-4), ("sasrec-ext", k, (a[k] - b[k]).abs().max())
    lares = [json.loads((tmp_path / run / "lares" / "results.json").read_text()) for run in ("one", "two")]
    # the filter (random initial states) kept the same rows, and RPT trained on them (its weights moved)
    assert lares[0]["rpt_rows_kept"] == lares[1]["rpt_rows_kept"] > 0
    spt, rpt = (load_file(str(_last_weights(tmp_path / "one" / "lares" / p))) for p in ("train", "rpt"))
    assert max((spt[k] - rpt[k]).abs().max().item() for k in spt) > 1e-3


def _last_weights(phase_dir: Path) -> Path:
    """The last epoch's weights: the checkpoint slot its state.json names."""
    return phase_dir / f"last-{json.loads((phase_dir / 'state.json').read_text())['slot']}.safetensors"


BENCH_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from llmrec.seqrec.bench import run_seqrec_benchmark

    torch.set_num_threads(1)
    run_seqrec_benchmark(sys.argv[1], ["sasrec", "rearec-erl"], 1, sys.argv[2], max_history=10, hidden_size=16,
                         n_layers=1, n_heads=2, inner_size=32, dropout=0.0, attn_dropout=0.0, epochs=2, batch_size=6,
                         eval_batch_size=8, lr=1e-2, progress=False)
    """
)


def test_bench_seqrec_under_two_processes_trains_each_run_across_them(tmp_path):
    """The benchmark set up accelerate's state first, without a process group on a machine without GPUs: each
    launched process trained every run alone, in the same directories, recorded 1 process and printed the table."""
    data = write_successor_dataset(tmp_path / "d")
    script = tmp_path / "bench.py"
    script.write_text(BENCH_SCRIPT)
    run_script_here(script, data, tmp_path / "one")
    out = accelerate_launch(2, [script, data, tmp_path / "two"])
    assert out.count("| model |") == 1, out  # one process prints the table
    for name in ("sasrec", "rearec-erl"):
        one, two = (json.loads((tmp_path / run / "runs" / f"{name}_seed0" / "results.json").read_text())
                    for run in ("one", "two"))
        assert (one["timings"]["num_processes"], two["timings"]["num_processes"]) == (1, 2)
        assert one["valid"] == pytest.approx(two["valid"], abs=1e-6)
        assert one["test"] == pytest.approx(two["test"], abs=1e-6)
    summaries = [json.loads((tmp_path / run / "seqrec_bench.json").read_text())["summary"] for run in ("one", "two")]
    assert summaries[0]["rearec-erl"]["ndcg@10_diff"] == pytest.approx(summaries[1]["rearec-erl"]["ndcg@10_diff"],
                                                                       abs=1e-6)
    assert (tmp_path / "two" / "seqrec_bench.png").exists()


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from llmrec.seqrec.config import SeqRecConfig
    from llmrec.seqrec.run import run_seqrec
    from llmrec.seqrec.trainer import SeqRecTrainer

    data_dir, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    common = dict(dataset_dir=data_dir, max_history=10, hidden_size=16, n_layers=1, n_heads=2, inner_size=32,
                  dropout=0.3, attn_dropout=0.3, epochs=3, batch_size=6, eval_batch_size=8, lr=1e-2,
                  progress=False, resume=False)
    run_seqrec(SeqRecConfig(model="sasrec", output_dir=f"{out}/whole", **common))
    real, calls = SeqRecTrainer.evaluate, []

    def cut_in_the_second_validation(self, *args, **kwargs):  # after epoch 2's training, before its state
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    SeqRecTrainer.evaluate = cut_in_the_second_validation
    try:
        run_seqrec(SeqRecConfig(model="sasrec", output_dir=f"{out}/cut", **common))
    except KeyboardInterrupt:
        pass
    SeqRecTrainer.evaluate = real
    torch.manual_seed(12345)  # whatever the generators hold now: the resume restores each process's own state
    run_seqrec(SeqRecConfig(model="sasrec", output_dir=f"{out}/cut", **dict(common, resume=True)))
    """
)


def test_a_two_process_run_with_dropout_resumes_as_it_would_have_gone_on(tmp_path):
    """Each process draws its own dropout masks, and the two diverge at the epoch's short last batch (3 rows on one
    process, 1 on the other): the checkpoint held rank 0's generator state alone, which every process restored, so
    a resumed 2-process run with dropout was not the run that was cut (a review)."""
    from safetensors.torch import load_file

    data = write_successor_dataset(tmp_path / "d")  # 16 windows in global batches of 6, 6, 4
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    accelerate_launch(2, [script, data, tmp_path / "two"])
    whole, cut = (load_file(str(_last_weights(tmp_path / "two" / run / "train"))) for run in ("whole", "cut"))
    for k in whole:
        assert torch.equal(whole[k], cut[k]), (k, (whole[k] - cut[k]).abs().max())
    # each process's own generator states, which each restores (on GPUs: its own device's CUDA generator)
    state = json.loads((tmp_path / "two" / "cut" / "train" / "state.json").read_text())
    assert len(state["rng_by_process"]) == 2 and all(len(r["torch_rng"]) > 0 for r in state["rng_by_process"])


LONE_BATCH_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from llmrec.seqrec.config import SeqRecConfig
    from llmrec.seqrec.run import run_seqrec

    data_dir, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    run_seqrec(SeqRecConfig(model="lares", dataset_dir=data_dir, output_dir=out, max_history=10, hidden_size=16,
                            n_layers=1, n_heads=2, inner_size=32, dropout=0.0, attn_dropout=0.0, epochs=2,
                            batch_size=8, eval_batch_size=8, lr=1e-2, progress=False, resume=False,
                            mean_recurrence=2, tla_weight=0.1, sla_weight=0.1, rpt_epochs=0))
    """
)


def test_a_process_holding_only_filler_rows_logs_what_the_others_log(tmp_path):
    """3 train windows in a global batch of 8: one process holds only the rows the loader adds, so LARES's alignment
    terms were missing from its logs and the processes reduced lists of other lengths: the run hung (a review)."""
    data = write_successor_dataset(tmp_path / "d", users=3)
    script = tmp_path / "lone.py"
    script.write_text(LONE_BATCH_SCRIPT)
    accelerate_launch(2, [script, data, tmp_path / "two"], timeout=240)  # the old failure was a hang
    run_script_here(script, data, tmp_path / "one")
    logged = [json.loads((tmp_path / run / "results.json").read_text())["phases"][0]["history"]
              for run in ("one", "two")]
    assert len(logged[0]) == len(logged[1]) == 2
    assert all(a.keys() == b.keys() for a, b in zip(*logged))
    # The alignment terms' in-batch negatives are local to a process (as the LARES code has them), so the loss and
    # the weights after the first step depend on the layout here; the first epoch's supervised CE is the batch's.
    assert logged[0][0]["ce"] == pytest.approx(logged[1][0]["ce"], rel=1e-4)
