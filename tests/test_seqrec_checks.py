"""Input and reuse checks of ``llmrec seqrec``: changed data under a run, settings no model reads, values that are
not numbers, benchmark model lists. Tiny synthetic data, CPU, seconds each."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_seqrec import tiny_cfg, write_successor_dataset

from llmrec.seqrec.config import SeqRecConfig


def _change_one_target(path: Path) -> None:
    """Rewrite ``path`` (a split file) with its first row's target replaced: same row count, other content."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["target_item_id"] = rows[0]["target_item_id"] % 12 + 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_resume_refuses_a_dataset_whose_files_changed(tmp_path):
    """Same dataset_dir, other contents (re-prepared, edited; no stats.json to tell): the rerun must not load the
    old run's weights and report them as trained on this data."""
    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, epochs=2, eval_every=1)
    run_seqrec(cfg)
    assert run_seqrec(cfg)["config"] == dataclasses.asdict(cfg)  # unchanged data: resumes (finished: reloads)
    _change_one_target(d / "train.jsonl")
    with pytest.raises(ValueError, match=r"holds a run made with .*dataset.*train\.jsonl"):
        run_seqrec(cfg)


def test_resume_of_a_run_recorded_without_a_data_digest_checks_its_stats(tmp_path):
    """A run directory written before the digest was recorded still resumes (its stats.json identity is checked)."""
    from llmrec.seqrec.run import RUN_CONFIG_JSON, run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, epochs=2, eval_every=1)
    first = run_seqrec(cfg)
    path = Path(cfg.output_dir) / RUN_CONFIG_JSON
    old = json.loads(path.read_text())
    old.pop("data_sha256")
    path.write_text(json.dumps(old))
    assert run_seqrec(cfg)["test"] == first["test"]
    assert "data_sha256" in json.loads(path.read_text())  # recorded from now on


def test_benchmark_refuses_a_finished_run_of_other_data(tmp_path):
    """A finished run's results.json is reused only if the dataset's files are those it was trained on."""
    from llmrec.seqrec.bench import run_seqrec_benchmark

    d = write_successor_dataset(tmp_path / "d")
    kw = dict(max_history=10, hidden_size=16, n_layers=1, inner_size=32, epochs=1, batch_size=8, progress=False)
    out = tmp_path / "bench"
    first = run_seqrec_benchmark(d, ["sasrec"], 1, out, **kw)
    assert run_seqrec_benchmark(d, ["sasrec"], 1, out, **kw) == first
    _change_one_target(d / "test.jsonl")
    with pytest.raises(ValueError, match=r"sasrec_seed0.*results\.json.*another dataset.*test\.jsonl"):
        run_seqrec_benchmark(d, ["sasrec"], 1, out, **kw)
    with pytest.raises(ValueError, match=r"another dataset"):
        run_seqrec_benchmark(d, ["sasrec"], 1, out, report_only=True, **kw)


def test_benchmark_refuses_repeated_unknown_or_no_models(tmp_path):
    """"sasrec,sasrec" counted every seed twice (the mean +- std of duplicated runs); an unknown name was found only
    after the models before it had trained; an empty list wrote an empty table."""
    from llmrec.seqrec.bench import run_seqrec_benchmark

    d = write_successor_dataset(tmp_path / "d")
    for models, match in ((["sasrec", "sasrec"], "more than once"), (["sasrec", "sasrce"], "unknown model"),
                          ([], "no model")):
        with pytest.raises(ValueError, match=match):
            run_seqrec_benchmark(d, models, 1, tmp_path / "bench", epochs=1, progress=False)
        assert not (tmp_path / "bench").exists()


@pytest.mark.parametrize("field", ["kl_weight", "cl_weight", "temperature", "lr", "state_scale", "noise_std",
                                   "weight_decay", "kl_cap", "tla_weight"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_numbers_are_refused(field, value):
    """``nan < 0`` is False: NaN passed the range checks and trained a NaN model whose ranking was reported."""
    with pytest.raises(ValueError, match=field):
        SeqRecConfig(dataset_dir="x", **{field: value})


@pytest.mark.parametrize("field,value", [("rpt_reward", "NDCG"), ("rpt_reward", "ndcg@10"), ("fuse", "sum"),
                                         ("state_init", "random"), ("depth_sampling", "poisson"),
                                         ("align_sim", "cosine")])
def test_unknown_choices_are_refused_at_once(field, value):
    """rpt_reward other than "ndcg" trained with the recall reward silently; the others failed only when the model
    was built, after the data had been read."""
    with pytest.raises(ValueError, match=field):
        SeqRecConfig(dataset_dir="x", model="lares", **{field: value})


def test_fields_the_model_does_not_read_are_named():
    cfg = SeqRecConfig(dataset_dir="x", model="sasrec", pta_alpha=1.2, test_depths=[2], reason_steps=2)
    assert cfg.unused_fields() == {"pta_alpha": 1.2, "test_depths": [2]}
    assert SeqRecConfig(dataset_dir="x", model="rearec-erl", pta_alpha=1.2).unused_fields() == {"pta_alpha": 1.2}
    assert SeqRecConfig(dataset_dir="x", model="rearec-prl", pta_alpha=1.2, kl_weight=0.1).unused_fields() == {
        "kl_weight": 0.1}
    assert SeqRecConfig(dataset_dir="x", model="lares", rpt_epochs=2, test_depths=[1, 2]).unused_fields() == {}
    # Fields another setting turns off: rows mode has no windows, a LARES without RPT neither filters nor runs RPT.
    assert SeqRecConfig(dataset_dir="x", train_mode="rows", window_stride=3).unused_fields() == {"window_stride": 3}
    assert SeqRecConfig(dataset_dir="x", window_stride=3).unused_fields() == {}
    assert SeqRecConfig(dataset_dir="x", model="lares", rpt_lr=0.5, filter_topk=7, rpt_beta=9.0).unused_fields() == {
        "filter_topk": 7, "rpt_beta": 9.0, "rpt_lr": 0.5}
    assert SeqRecConfig(dataset_dir="x", model="lares", rpt_epochs=1, rpt_lr=0.5).unused_fields() == {}
    # PRL without noise has no noisy view, so no contrastive term (review: cl_weight was recorded as if it acted)
    assert SeqRecConfig(dataset_dir="x", model="rearec-prl", noise_std=0.0, cl_weight=0.5).unused_fields() == {
        "cl_weight": 0.5}
    assert SeqRecConfig(dataset_dir="x", model="rearec-prl", cl_weight=0.5).unused_fields() == {}
    # More settings a weight of 0 switches off, recorded as if they had shaped the result (review)
    def unused(model: str, **kw) -> dict:
        return SeqRecConfig(dataset_dir="x", model=model, **kw).unused_fields()

    assert unused("rearec-prl", noise_std=0.0, warmup_epochs=7) == {"warmup_epochs": 7}
    assert unused("rearec-prl", cl_weight=0.0, noise_std=0.5, cl_max_rows=8) == {"cl_max_rows": 8, "noise_std": 0.5}
    assert unused("rearec-prl", cl_weight=0.0, noise_std=0.0) == {}  # both switched off: neither is refused
    assert unused("rearec-prl", pl_weight=0.0, pta_alpha=3.0) == {"pta_alpha": 3.0}
    assert unused("rearec-erl", kl_weight=0.0, kl_cap=5.0) == {"kl_cap": 5.0}
    assert unused("rearec-erl", reason_steps=0, kl_weight=0.1) == {"kl_weight": 0.1}
    assert unused("lares", tla_weight=0.0, sla_weight=0.0, align_tau=0.2, align_sim="cos",
                  sla_exclude_final=True) == {"align_sim": "cos", "align_tau": 0.2, "sla_exclude_final": True}
    assert unused("lares", sla_weight=0.0, align_tau=0.2, sla_exclude_final=True) == {"sla_exclude_final": True}


def test_reported_cut_off_10_is_required():
    """ks without 10 trained a whole run, then failed on the NDCG@10 of its summary (LARES: before results.json)."""
    with pytest.raises(ValueError, match="ks must include 10"):
        SeqRecConfig(dataset_dir="x", ks=[5, 20], valid_metric="ndcg@20")
    assert SeqRecConfig(dataset_dir="x", ks=[10]).ks == [10]


def test_scoring_helpers_refuse_ids_outside_the_catalogue_and_empty_histories():
    """id 0 in mask_items wrote -inf to column -1 (the last item); an all-padding history was scored silently."""
    import torch

    from llmrec.seqrec.models import SASRec
    from llmrec.seqrec.modules import Backbone
    from llmrec.seqrec.scoring import mask_items, score_histories

    model = SASRec(Backbone(num_items=5, max_len=4, hidden=8, heads=2, inner=16)).eval()
    for histories, problem in (([[1], []], "history 1 is empty"), ([[0]], "item id 0, outside the catalogue's 1..5"),
                               ([[2, 6]], "item id 6")):
        with pytest.raises(ValueError, match=problem):
            score_histories(model, histories, 4, "cpu")
    with pytest.raises(ValueError, match="masked row 0 holds item id 0"):
        mask_items(torch.zeros(1, 5), [[0]])
    assert mask_items(torch.zeros(1, 5), [[5]]).tolist() == [[0, 0, 0, 0, float("-inf")]]


def test_cli_train_refuses_settings_the_model_does_not_read(tmp_path, capsys):
    """`llmrec seqrec train --config sasrec.yaml --pta_alpha 2` trained a plain SASRec and recorded pta_alpha 2."""
    from llmrec.cli import main

    d = write_successor_dataset(tmp_path / "d")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: sasrec\ndataset_dir: {d}\nmax_history: 10\nhidden_size: 16\nn_layers: 1\nepochs: 1\n")
    out = tmp_path / "out"
    assert main(["seqrec", "train", "--config", str(recipe), "--output_dir", str(out), "--progress", "false",
                 "--pta_alpha", "2", "--test_depths", "2"]) == 1
    err = capsys.readouterr().err
    assert "pta_alpha" in err and "test_depths" in err and "sasrec" in err
    assert not out.exists()


def test_training_from_scratch_removes_the_old_runs_results_first(tmp_path, monkeypatch):
    """resume: false over a finished run, cut after its train phase: the old results.json (which marks the directory
    a finished run for the pipeline, the benchmark and `llmrec recommend`) must not stand beside the new weights."""
    from llmrec.seqrec import trainer as T
    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, epochs=2, eval_every=1)
    run_seqrec(cfg)
    out = Path(cfg.output_dir)
    assert (out / "results.json").exists()
    real = T.SeqRecTrainer.evaluate

    def killed_at_test(self, rows, depth=None, desc="eval"):
        if desc == "test":
            raise KeyboardInterrupt("killed")
        return real(self, rows, depth, desc)

    monkeypatch.setattr(T.SeqRecTrainer, "evaluate", killed_at_test)
    with pytest.raises(KeyboardInterrupt):
        run_seqrec(dataclasses.replace(cfg, lr=0.5, resume=False))
    assert (out / "train" / "done.json").exists()  # the new train phase finished: its best weights are in place
    assert not (out / "results.json").exists() and not (out / "results.md").exists()


def test_a_lares_run_from_scratch_cut_before_rpt_does_not_take_up_the_old_runs_rpt(tmp_path, monkeypatch):
    """resume: false forgot only the phase it started: a run cut before RPT (here in the between-phase filter)
    left the old run's finished RPT phase, which the next, resumed run reported under the new config."""
    from llmrec.seqrec import trainer as T
    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, model="lares", epochs=2, mean_recurrence=2, rpt_epochs=1, rpt_batch_size=16,
                   rpt_lr=1e-3)
    run_seqrec(cfg)
    new = dataclasses.replace(cfg, lr=3e-3)
    alone = run_seqrec(dataclasses.replace(new, output_dir=str(tmp_path / "alone")))
    real = T.SeqRecTrainer.lares_filter

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed in the filter")

    monkeypatch.setattr(T.SeqRecTrainer, "lares_filter", killed)
    with pytest.raises(KeyboardInterrupt):
        run_seqrec(dataclasses.replace(new, resume=False))
    out = Path(cfg.output_dir)
    assert not (out / "rpt" / "done.json").exists() and not (out / "rpt" / "state.json").exists()
    monkeypatch.setattr(T.SeqRecTrainer, "lares_filter", real)
    resumed = run_seqrec(new)
    assert resumed["test"] == alone["test"] and resumed["rpt_rows_kept"] == alone["rpt_rows_kept"]


def test_resume_reads_the_same_directory_spelled_otherwise_and_fields_added_later_as_their_defaults(tmp_path):
    """"data/x/" and "data/x" are one dataset; a field the recorded run's code did not have yet is its default
    (as the benchmark reads a finished run): neither is another setting."""
    from llmrec.seqrec.run import RUN_CONFIG_JSON, run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, epochs=1)
    first = run_seqrec(cfg)
    assert run_seqrec(dataclasses.replace(cfg, dataset_dir=str(d) + "/"))["test"] == first["test"]
    path = Path(cfg.output_dir) / RUN_CONFIG_JSON
    old = json.loads(path.read_text())
    del old["config"]["sla_exclude_final"]
    path.write_text(json.dumps(old))
    assert run_seqrec(cfg)["test"] == first["test"]


@pytest.mark.parametrize("field,value,match", [
    ("mask_history", "false", "true or false"), ("mask_history", 2, "true or false"), ("progress", None, "true or false"),
    ("max_train_batches", 1.5, "integer"), ("epochs", True, "integer"), ("lr", "1e-3", "number"),
    ("input_dropout", "0.2", "number"), ("valid_metric", 10, "string"), ("ks", [5, 10.5], "list of integers"),
    ("test_depths", 2, "list of integers"),
])
def test_values_of_another_type_are_refused(field, value, match):
    """From Python (the benchmark, the pipeline, scripts) values reach the config unconverted: "false" was true."""
    with pytest.raises(ValueError, match=f"{field} must be .*{match}"):
        SeqRecConfig(dataset_dir="x", **{field: value})


def test_booleans_zero_and_one_read_as_false_and_true():
    import numpy as np

    cfg = SeqRecConfig(dataset_dir="x", mask_history=1, progress=0, epochs=np.int64(3), lr=np.float64(0.01))
    assert cfg.mask_history is True and cfg.progress is False and cfg.epochs == 3
    assert SeqRecConfig(dataset_dir="x", input_dropout=None, lr=1).lr == 1


def test_batches_that_cannot_be_split_over_the_processes_are_refused_before_any_work(tmp_path, monkeypatch):
    """LARES's rpt_batch_size was checked only when RPT started, after the whole SPT phase had trained (and its
    run directory then refused the corrected value)."""
    import types

    from llmrec.seqrec import run as run_module

    monkeypatch.setattr(run_module, "make_accelerator", lambda seed: types.SimpleNamespace(num_processes=2))
    d = write_successor_dataset(tmp_path / "d")
    cases = ((dict(eval_batch_size=5), "eval_batch_size 5"),
             (dict(model="lares", rpt_epochs=1, rpt_batch_size=5), "rpt_batch_size 5"),
             (dict(batch_size=7), "batch_size 7"))
    for kw, named in cases:
        out = tmp_path / f"run-{named.split()[0]}"
        cfg = SeqRecConfig(dataset_dir=str(d), output_dir=str(out), progress=False, **kw)
        with pytest.raises(ValueError, match=f"{named}: not divisible by the 2 processes"):
            run_module.run_seqrec(cfg)
        assert not out.exists()


def _cut(path: Path, keep: int | None = None) -> None:
    """Truncate ``path`` (to half its size by default): a copy or a disk that stopped part way."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def test_damaged_checkpoints_are_named_with_what_to_do(tmp_path, capsys):
    """A truncated best/last checkpoint raised safetensors' bare "incomplete metadata" (a traceback naming no file);
    a truncated optimiser state torch's "failed finding central directory"."""
    from llmrec.cli import main
    from llmrec.safetensors_io import SafetensorsFileError
    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, epochs=1)
    run_seqrec(cfg)
    pdir = Path(cfg.output_dir) / "train"
    remedy = re.escape(f"checkpoint of the run in {cfg.output_dir}: train the run again from scratch (resume: false")
    _cut(pdir / "best.safetensors")  # a finished phase is reloaded from it
    with pytest.raises(SafetensorsFileError, match=rf"train/best\.safetensors: damaged .*incomplete metadata.*{remedy}"):
        run_seqrec(cfg)
    (pdir / "done.json").unlink()  # an unfinished phase resumes from its last slot
    _cut(pdir / "last-0.safetensors", keep=100)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in dataclasses.asdict(cfg).items()))
    assert main(["seqrec", "train", "--config", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert f"llmrec: error: {pdir / 'last-0.safetensors'}: damaged or not a safetensors file" in err
    assert "Traceback" not in err and "SafetensorError" not in err
    _cut(pdir / "best.safetensors", keep=0)
    run_seqrec(dataclasses.replace(cfg, resume=False))  # the way out the message names
    _cut(pdir / "last_optim-0.pt")
    (pdir / "done.json").unlink()
    with pytest.raises(ValueError, match=r"last_optim-0\.pt: damaged or not an optimiser checkpoint.*resume: false"):
        run_seqrec(cfg)


def test_an_id_model_with_damaged_weights_or_results_is_named(tmp_path):
    """`llmrec evaluate --method seqrec` and D3 guidance read a run's train/best.safetensors and results.json."""
    from llmrec.decoding.guidance import load_guidance_model
    from llmrec.safetensors_io import SafetensorsFileError
    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, epochs=1)
    run_seqrec(cfg)
    run = Path(cfg.output_dir)
    results = (run / "results.json").read_text()
    (run / "results.json").write_text(results[:40])
    with pytest.raises(ValueError, match=rf"checkpoint {run}: results\.json is damaged \(.*resume: false"):
        load_guidance_model(run)
    (run / "results.json").write_text("[1, 2]")
    with pytest.raises(FileNotFoundError, match="results.json has no 'config'"):  # was AttributeError: 'list'...
        load_guidance_model(run)
    (run / "results.json").write_text(results)
    _cut(run / "train" / "best.safetensors")
    with pytest.raises(SafetensorsFileError, match=rf"{run / 'train' / 'best.safetensors'}: damaged .*resume: false"):
        load_guidance_model(run)


@pytest.mark.parametrize("train_mode", ["sequence", "rows"])
def test_train_rows_with_an_empty_history_are_warned_about_and_counted(tmp_path, caplog, train_mode):
    """They were skipped with only an INFO line whose row count had changed; results.json did not say so."""
    import logging

    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    path = d / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows[:3]:
        r["history_item_ids"] = []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.INFO, logger="llmrec.seqrec.data"):
        res = run_seqrec(tiny_cfg(tmp_path, d, epochs=1, train_mode=train_mode))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"train.jsonl: 3 of {len(rows)} train rows have an empty history and are skipped" in m for m in warned)
    assert res["protocol"]["skipped"] == {"train_rows_empty_history": 3}
    assert res["protocol"]["train_targets"] == len(rows) - 3
    saved = json.loads((Path(res["config"]["output_dir"]) / "results.json").read_text())
    assert saved["protocol"]["skipped"] == {"train_rows_empty_history": 3}


def test_a_dataset_without_empty_histories_records_none_and_does_not_warn(tmp_path, caplog):
    import logging

    from llmrec.seqrec.data import load_seqrec_data

    d = write_successor_dataset(tmp_path / "d")
    with caplog.at_level(logging.INFO, logger="llmrec.seqrec.data"):
        data = load_seqrec_data(d, 10)
    # nothing recorded: the protocol of clean data is what earlier runs recorded (finished runs compare equal)
    assert data.train_rows_empty_history == 0 and "skipped" not in data.protocol()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_output_dir_under_a_file_is_refused_at_config_time(tmp_path):
    from llmrec.seqrec.config import SeqRecConfig

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="output_dir .* a file, not a directory"):  # a traceback at the first write
        SeqRecConfig(dataset_dir="x", output_dir=str(tmp_path / "afile"))


def test_top_k_refuses_nan_scores_where_the_list_and_the_rank_would_disagree():
    """A descending sort puts NaN first while ranks_from_scores never counts it as higher."""
    import torch

    from llmrec.evaluation.metrics import ranks_from_scores
    from llmrec.seqrec.scoring import top_k

    scores = torch.tensor([[0.5, 2.0, 1.0], [float("nan"), 2.0, 1.0]])
    assert ranks_from_scores(scores, torch.tensor([1, 1])).tolist() == [0, 0]
    with pytest.raises(ValueError, match="NaN for 1 of 2 histories \\(first: batch row 1\\)"):
        top_k(scores, 2)
    values, order = top_k(scores[:1], 2)
    assert order.tolist() == [[1, 2]] and values.tolist() == [[2.0, 1.0]]


@pytest.mark.parametrize("key,flag", [("seed", "--seeds"), ("model", "--models"), ("dataset_dir", "--dataset"),
                                      ("output_dir", "--output-dir")])
def test_bench_refuses_overrides_of_what_it_sets_per_run(tmp_path, key, flag):
    """--seed 7 was replaced by 42 + s without a word (and so were model, dataset_dir, output_dir)."""
    from llmrec.seqrec.bench import run_seqrec_benchmark

    with pytest.raises(ValueError, match=f"the benchmark sets {key} \\(use {flag}"):
        run_seqrec_benchmark(tmp_path / "data", ["sasrec"], 1, tmp_path / "out", **{key: "7"})
    assert not (tmp_path / "out").exists()


def test_a_rerun_of_a_finished_run_keeps_its_training_time(prepared_dir, tmp_path):
    """The rerun trained nothing and wrote its own ~0 s as train_total_s (the pipeline report's training time)."""
    from tests.conftest import train_tiny_sasrec

    out = train_tiny_sasrec(prepared_dir, tmp_path / "run")
    first = json.loads((out / "results.json").read_text())
    train_tiny_sasrec(prepared_dir, out)
    again = json.loads((out / "results.json").read_text())
    assert again["timings"]["train_total_s"] == first["timings"]["train_total_s"] > 0
    assert again["test"] == first["test"]


def test_lares_filter_keeping_no_row_skips_rpt(tmp_path):
    """A filter that keeps no train row (filter_topk 1 on 300 items, a small candidate budget): RPT is skipped and
    the SPT model is the result. Its loader failed on the empty row set after the whole SPT phase, on every rerun."""
    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d", num_items=300, users=16, length=9)
    cfg = tiny_cfg(tmp_path, d, model="lares", epochs=1, lr=1e-6, eval_every=1, rpt_epochs=1, mean_recurrence=2,
                   filter_topk=1, rpt_max_rows=5)
    res = run_seqrec(cfg)
    assert res["rpt_rows_kept"] == 0 and res["selected_phase"] == "spt" and res["best_phase"] == "train"
    assert [p["name"] for p in res["phases"]] == ["train"]
    assert run_seqrec(cfg)["test"] == res["test"]  # the rerun reuses the finished SPT phase


def test_lares_filter_ranks_without_history_masking(tmp_path):
    """The filter between SPT and RPT keeps rows by the unmasked rank, as RPT's reward ranks (mask_history is an
    evaluation choice): masked, every row whose target repeats a history item was dropped from RPT."""
    import numpy as np
    import torch

    from llmrec.data.canonical import write_jsonl
    from llmrec.seqrec.data import load_seqrec_data
    from llmrec.seqrec.models import build_model
    from llmrec.seqrec.trainer import SeqRecTrainer, make_accelerator

    d = write_successor_dataset(tmp_path / "d", num_items=40, users=40, length=12)
    for split in ("train", "valid", "test"):  # each user cycles over 5 items: most targets repeat a history item
        rows = [json.loads(line) for line in (d / f"{split}.jsonl").read_text().splitlines()]
        for r in rows:
            u, n = int(r["user_id"][1:]), len(r["history_item_ids"])
            r["history_item_ids"] = [1 + (u + i % 5) % 40 for i in range(n)]
            r["target_item_id"] = 1 + (u + n % 5) % 40
        write_jsonl(d / f"{split}.jsonl", rows)
    data = load_seqrec_data(d, max_history=10)
    repeats = np.array([t in h[-10:] for h, t in zip(data.train_rows.histories, data.train_rows.targets)])
    assert repeats.sum() > 100
    kept = {}
    for mask in (False, True):
        cfg = tiny_cfg(tmp_path / f"m{mask}", d, model="lares", mask_history=mask, filter_topk=20, rpt_epochs=1)
        torch.manual_seed(0)
        trainer = SeqRecTrainer(cfg, data, build_model(cfg, data.num_items), make_accelerator(cfg.seed),
                                Path(cfg.output_dir))
        kept[mask] = trainer.lares_filter()
    assert kept[True][repeats].sum() > 0
    assert (kept[True] == kept[False]).all()


def test_lares_same_target_partner_is_never_an_empty_history():
    """LARES's same-target augmentation pairs rows with other rows that have a history: an empty-history train
    row (all padding, not trained on) was picked as the partner, aligning with the state of padding."""
    import numpy as np
    import torch

    from llmrec.seqrec.data import SameTargetPool, SplitRows, left_pad

    hist = [[2, 5], [], [3]]
    pool = SameTargetPool(SplitRows("train", left_pad(hist, 4), np.array([7, 7, 9]), hist, ["a", "b", "c"]))
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert pool.sample(torch.tensor([7]), torch.tensor([0]), generator=g).tolist() == [[0, 0, 2, 5]]
    own = torch.tensor([[0, 0, 0, 4]])
    # a target only an empty-history row leads to: the row's own input, not padding
    hist = [[], [3]]
    pool = SameTargetPool(SplitRows("train", left_pad(hist, 4), np.array([7, 9]), hist, ["a", "b"]))
    assert pool.sample(torch.tensor([7]), torch.tensor([-1]), own_inputs=own).tolist() == [[0, 0, 0, 4]]


def test_pta_alpha_below_one_is_refused():
    """tau_k = tau * alpha^(K-k) with alpha >= 1 (the spec); below 1 the annealing ran backwards unnoticed."""
    with pytest.raises(ValueError, match="pta_alpha must be >= 1"):
        SeqRecConfig(model="rearec-prl", dataset_dir="x", pta_alpha=0.5)
    assert SeqRecConfig(model="rearec-prl", dataset_dir="x", pta_alpha=1.0).pta_alpha == 1.0


def test_validation_ranks_refuse_nan_scores(tmp_path):
    """ranks_from_scores never counts a NaN item as higher: a model scoring NaN for some items got optimistic
    validation and test metrics from the trainer (evaluate and recommend already refused NaN through top_k)."""
    from llmrec.seqrec.data import load_seqrec_data
    from llmrec.seqrec.models import build_model
    from llmrec.seqrec.trainer import SeqRecTrainer, make_accelerator

    d = write_successor_dataset(tmp_path / "d", num_items=20, users=12, length=8)
    data = load_seqrec_data(d, max_history=10)
    cfg = tiny_cfg(tmp_path / "m", d)
    model = build_model(cfg, data.num_items)
    trainer = SeqRecTrainer(cfg, data, model, make_accelerator(cfg.seed), Path(cfg.output_dir))
    assert len(trainer.ranks(data.valid)) == len(data.valid.targets)  # finite: ranks as before
    score = model.score

    def nan_for_one_item(ids):  # item column 0 NaN for every row whose target is another item
        s = score(ids)
        s[:, 0] = float("nan")
        return s

    model.score = nan_for_one_item
    assert int(data.valid.targets[0]) != 1
    with pytest.raises(ValueError, match=r"scored NaN for some items of valid rows \[0"):
        trainer.ranks(data.valid)
