"""``llmrec bench pipeline`` end to end on a tiny model: every stage, one report, a rerun that runs nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import write_prepared

METHODS = "popularity,zero-shot,bigrec-sft,bigrec-sft+d3,latent-sft,latent-sft+grpo,latent-sft+grpo+d3,sasrec"



def _args(data: Path, out: Path, **kw) -> list[str]:
    args = ["bench", "pipeline", "--dataset", str(data), "--model", "tiny-qwen2", "--methods", METHODS,
            "--output-dir", str(out / "runs"), "--results-dir", str(out / "results"), "--name", "tiny",
            "--train-rows", "8", "--test-rows", "6", "--grpo-rows", "4", "--dtype", "float32",  # bf16: slow on AVX2
            "--id", "epochs=2", "hidden_size=16",
            "inner_size=32", "max_history=5", "progress=false", "num_threads=1",
            # Stages in this process: a fresh process per stage costs ~4 s of imports, and these tests run the
            # pipeline ~10 times; test_stages_in_their_own_processes_give_the_same_results covers the default.
            "--in-process"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from llmrec.cli import main

    root = tmp_path_factory.mktemp("pipeline")
    data = write_prepared(root / "data", n_items=30, n_users=14, seed=5)
    assert main(_args(data, root)) == 0
    return root, data


def test_report_has_every_method_on_the_same_rows(report):
    root, _ = report
    res = json.loads((root / "results" / "tiny.json").read_text())
    assert set(res["methods"]) == set(METHODS.split(","))
    assert res["missing"] == []
    assert res["protocol"]["test_rows"] == 6
    rows = [r[0] for r in res["protocol"]["test_row_ids"]]
    for m in res["methods"].values():
        for run in m["runs"]:
            ranked = [json.loads(line)["row"] for line in (Path(run) / "rankings.jsonl").read_text().splitlines()]
            assert sorted(ranked) == rows
    # ID models read their own history length; LLMs the prompt's
    assert res["methods"]["sasrec"]["history_length"] == 5
    assert res["methods"]["bigrec-sft"]["history_length"] == 10
    assert "ndcg@20" in res["methods"]["sasrec"]["mean"] and "ndcg@20" not in res["methods"]["bigrec-sft"]["mean"]
    names = {d["name"] for d in res["differences"]}
    assert {"latent+GRPO vs BIGRec SFT", "latent+GRPO+D3 vs BIGRec SFT+D3", "latent+GRPO vs best ID model"} <= names
    for d in res["differences"]:
        lo, hi = d["metrics"]["ndcg@10"]["ci95"]
        assert lo <= d["metrics"]["ndcg@10"]["diff"] <= hi
    assert (root / "results" / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (root / "results" / "tiny.md").read_text()
    assert "| Latent SFT + GRPO + D3 |" in md and "Reproduce: `llmrec bench pipeline" in md
    # the ID model's own whole-test-split numbers (its training run's results.json) are reported beside
    trained = json.loads((root / "runs" / "seqrec_sasrec" / "results.json").read_text())
    full = res["id_models_full_test"]["sasrec"]["0"]
    assert full["test"]["ndcg@10"] == trained["test"]["ndcg@10"] and full["best_epoch"] == trained["best_epoch"]
    assert "ID models on the whole test split" in md and f"| SASRec | 0 | {trained['valid']['ndcg@10']:.4f} |" in md


def test_stages_in_their_own_processes_give_the_same_results(report, tmp_path):
    """The default (each training run and evaluation in a fresh process) trains and ranks exactly as the fixture's
    in-process stages: the configs survive pickling, and nothing the parent process holds changes a result."""
    from llmrec.cli import main

    root, data = report
    args = _args(data, tmp_path)
    args.remove("--in-process")
    args[args.index("--methods") + 1] = "latent-sft+grpo"
    assert main(args + ["--no-report"]) == 0

    def ranks(runs: Path) -> list[tuple[int, int]]:
        lines = (runs / "eval_grpo_latent" / "rankings.jsonl").read_text().splitlines()
        return sorted((r["row"], r["item_rank"]) for r in map(json.loads, lines))

    assert ranks(tmp_path / "runs") == ranks(root / "runs")

    def summary(runs: Path) -> tuple:
        sft = json.loads((runs / "sft_latent" / "train_results.json").read_text())
        grpo = json.loads((runs / "grpo_latent" / "grpo_results.json").read_text())
        logs = [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}
                for e in grpo["log_history"]]
        return sft["train_loss"], sft["eval_losses"], logs

    assert summary(tmp_path / "runs") == summary(root / "runs")

    # A rerun finds everything finished: no stage needs a fresh process (it spawned one per finished evaluation).
    import llmrec.isolation

    def no_process(*a, **kw):
        raise AssertionError("a finished stage was run in a fresh process")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llmrec.isolation, "run_isolated", no_process)
        assert main(args + ["--no-report"]) == 0


def test_d3_evaluations_use_the_sasrec_of_the_same_seed(report):
    root, _ = report
    proto = json.loads((root / "runs" / "eval_grpo_latent_d3" / "results.json").read_text())["protocol"]
    assert proto["length_penalty"] == 0.0
    assert proto["guidance"]["checkpoint"] == str(root / "runs" / "seqrec_sasrec")


def test_rerun_skips_finished_stages(report):
    from llmrec.cli import main

    root, data = report
    stamps = {p: p.stat().st_mtime_ns for p in (root / "runs").rglob("results.json")}
    stamps.update({p: p.stat().st_mtime_ns for p in (root / "runs").rglob("*_results.json")})
    assert main(_args(data, root)) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_changed_options_are_refused_not_silently_reused(report, capsys):
    from llmrec.cli import main

    root, data = report
    capsys.readouterr()
    assert main(_args(data, root, row_seed=7)) == 1  # other test rows: the evaluator refuses
    assert "different protocol" in capsys.readouterr().err
    assert main(_args(data, root, train_rows=9)) == 1  # another SFT subset size
    assert "train_rows=8 (asked: 9)" in capsys.readouterr().err
    args = _args(data, root)
    args[args.index("--id") + 1: args.index("--id") + 1] = ["dropout=0.3"]
    assert main(args) == 1  # another ID-model setting
    assert "dropout=0.5 (asked: 0.3)" in capsys.readouterr().err
    # A GRPO option outside the summary in llmrec_config.json is checked against the run's training_args.json.
    assert main(_args(data, root, grpo="epsilon=0.2")) == 0
    assert main(_args(data, root, grpo="epsilon=0.3")) == 1
    assert "epsilon=0.2 (asked: 0.3)" in capsys.readouterr().err
    # An SFT option: both SFT stages were trained without the output norm (recorded as its default).
    assert main(_args(data, root, sft="head_output_norm=false")) == 0
    assert main(_args(data, root, sft="head_output_norm=true")) == 1
    assert "head_output_norm=False (asked: True)" in capsys.readouterr().err
    res = json.loads((root / "results" / "tiny.json").read_text())
    assert res["protocol"]["row_seed"] == 0 and res["protocol"]["llm"] == "tiny-qwen2"
    assert res["protocol"]["llm_train_rows"] == 8


def test_a_recipe_edit_after_a_finished_training_stage_is_refused(report, tmp_path, capsys):
    """The SFT and GRPO stages are checked field by field against the config the pipeline would build now: an edited
    recipe (here the latent SFT's learning rate, the BIGRec SFT's LoRA targets, a list, and GRPO's reward weights and
    clip) is caught, not only ``--sft`` / ``--grpo`` keys; a setting that changes nothing trained (the evaluation
    batch, how often GRPO logs) is not."""
    import shutil

    import yaml

    from llmrec.cli import main
    from llmrec.resources import resource_dir

    root, data = report
    recipes = tmp_path / "recipes"
    shutil.copytree(resource_dir("recipes"), recipes)
    latent, bigrec = recipes / "games" / "sft_latent.yaml", recipes / "games" / "sft_bigrec.yaml"
    grpo = recipes / "games" / "grpo_latent.yaml"
    original = {f: f.read_text() for f in (latent, bigrec, grpo)}

    def run(path: Path, **changes) -> int:
        for f, text in original.items():
            f.write_text(text)
        path.write_text(yaml.safe_dump({**yaml.safe_load(original[path]), **changes}))
        capsys.readouterr()
        return main(_args(data, root, recipes=recipes))

    assert run(latent, per_device_eval_batch_size=2) == 0
    assert run(latent, learning_rate=1e-4) == 1
    assert "learning_rate=0.0003 (asked: 0.0001)" in capsys.readouterr().err
    assert run(bigrec, lora_target_modules=["q_proj", "v_proj"]) == 1
    err = capsys.readouterr().err
    assert "sft_bigrec holds a finished run made with lora_target_modules=" in err and "(asked: ['q_proj', 'v_proj'])" in err
    assert run(grpo, logging_steps=3) == 0
    assert run(grpo, epsilon_high=0.3, reward_weights=[2.0]) == 1
    err = capsys.readouterr().err
    assert "grpo_latent holds a finished run made with" in err
    assert "epsilon_high=0.28 (asked: 0.3)" in err and "reward_weights=[1.0] (asked: [2.0])" in err


def test_seed_0_in_a_grpo_stage_of_its_own_may_come_from_a_sweep(report, tmp_path, capsys):
    """Seed 0's run in a ``--grpo-stage`` of its own is checked on the ``--grpo`` keys only (a sweep chose its settings);
    the seeds after it train with every trained setting of seed 0's run (they took only 14 named keys: epsilon_high,
    the batch layout, the schedule... came from the recipe, and the report averaged seeds trained differently), and
    a recipe edited since does not split them. The output directory is given through "x/..", which the recorded
    checkpoint paths do not spell out."""
    import shutil

    import yaml

    from llmrec.cli import main
    from llmrec.resources import resource_dir

    root, data = report
    recipes = tmp_path / "recipes"
    shutil.copytree(resource_dir("recipes"), recipes)

    (tmp_path / "x").mkdir()  # an output path through "..": the recorded paths are compared as paths

    def run(seeds: int, *grpo: str) -> int:
        args = _args(data, tmp_path / "x" / "..", seeds=seeds, grpo_stage="grpo_sweep", recipes=recipes)
        args[args.index("--methods") + 1] = "latent-sft+grpo"
        capsys.readouterr()
        return main(args + (["--grpo", *grpo] if grpo else []))

    assert run(1, "epsilon_high=0.3", "learning_rate=2e-4", "num_iterations=2") == 0  # "the sweep's" seed 0
    assert run(2) == 0  # seed 0 reused as it is; seed 1 trains with its learning rate and iterations
    seed1 = json.loads((tmp_path / "runs" / "seed1" / "grpo_sweep" / "training_args.json").read_text())
    assert seed1["learning_rate"] == 2e-4 and seed1["num_iterations"] == 2 and seed1["epsilon_high"] == 0.3
    grpo = recipes / "games" / "grpo_latent.yaml"
    grpo.write_text(yaml.safe_dump({**yaml.safe_load(grpo.read_text()), "epsilon_high": 0.25, "beta": 0.1}))
    assert run(2) == 0  # both seeds follow seed 0's run, not the recipe edited since
    assert run(2, "learning_rate=3e-4") == 1  # a --grpo key is asked of every seed
    assert "grpo_sweep holds a finished run made with learning_rate=0.0002 (asked: 0.0003)" in capsys.readouterr().err
    # and its prompts: seed 0's 4 were averaged with seeds drawing --grpo-rows 3 (review)
    args = _args(data, tmp_path / "x" / "..", seeds=1, grpo_stage="grpo_sweep", recipes=recipes)
    args[args.index("--methods") + 1] = "latent-sft+grpo"
    args[args.index("--grpo-rows") + 1] = "3"
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "grpo_sweep holds a finished run made with prompts=4 (asked: 3)" in err and "seed1" not in err


def test_sft_fields_a_run_did_not_record_or_that_act_only_on_resume(report, capsys):
    """A field the finished run did not record (added later) counts as its default, after TrainingArguments'
    __post_init__; a field that acts only on resume is compared only for a run that resumed; recorded paths are
    compared as paths."""
    from llmrec.cli import main

    root, data = report
    d = root / "runs" / "sft_latent"
    saved = {f: (d / f).read_text() for f in ("training_args.json", "train_results.json")}
    args, res = json.loads(saved["training_args.json"]), json.loads(saved["train_results.json"])
    try:
        # an older run: no head_output_norm, no report_to (which __post_init__ rewrites from "none" to [])
        (d / "training_args.json").write_text(json.dumps(
            {k: v for k, v in args.items() if k not in ("head_output_norm", "report_to")}))
        assert main(_args(data, root)) == 0
        assert main(_args(data, root, sft="head_output_norm=true")) == 1
        assert "head_output_norm=False (asked: True)" in capsys.readouterr().err
        # made with transformers' default for the resume-only field: fine unless the run resumed
        (d / "training_args.json").write_text(json.dumps({**args, "restore_callback_states_from_checkpoint": False}))
        assert main(_args(data, root)) == 0
        # the data directory recorded with a trailing slash is the same directory
        (d / "train_results.json").write_text(json.dumps({**res, "config": {**res["config"], "dataset": str(data) + "/"}}))
        assert main(_args(data, root)) == 0
        (d / "train_results.json").write_text(json.dumps({**res, "resumed_from": str(d / "checkpoint-2")}))
        capsys.readouterr()
        assert main(_args(data, root)) == 1
        assert "restore_callback_states_from_checkpoint=False (asked: True)" in capsys.readouterr().err
    finally:
        for f, text in saved.items():
            (d / f).write_text(text)


def test_id_overrides_are_typed_and_the_command_is_complete(report):
    from llmrec.bench_pipeline import Pipeline, PipelineOptions

    root, data = report
    p = Pipeline(PipelineOptions(dataset=str(data), output_dir=str(root / "runs"), id_overrides={"lr": "1e-3"},
                                 test_rows=6, methods=["sasrec"]))
    assert p._seqrec_fields("sasrec", 0)["lr"] == 0.001
    assert "--test-rows 6" in p.command() and "--methods sasrec" in p.command() and "--id lr=0.001" in p.command()
    # --grpo values are typed at once too: a finished GRPO run's recorded 1e-05 must match an asked "1e-5"
    g = Pipeline(PipelineOptions(dataset=str(data), grpo_overrides={"learning_rate": "1e-5",
                                                                    "reward_funcs": ["neg_ppl", "log_likelihood"]}))
    assert g.opts.grpo_overrides["learning_rate"] == 1e-5
    assert """--grpo learning_rate=1e-05 'reward_funcs=["neg_ppl","log_likelihood"]'""" in g.command()
    from llmrec.config import ConfigError

    with pytest.raises(ConfigError, match="--grpo: unknown option.*'learning_rte'"):
        Pipeline(PipelineOptions(dataset=str(data), grpo_overrides={"learning_rte": 1e-5}))
    with pytest.raises(ConfigError, match="--id: unknown option.*'epoch'"):
        Pipeline(PipelineOptions(dataset=str(data), id_overrides={"epoch": 3}))
    f = Pipeline(PipelineOptions(dataset=str(data), sft_overrides={"head_output_norm": "true", "learning_rate": "1e-4"}))
    assert f.opts.sft_overrides == {"head_output_norm": True, "learning_rate": 1e-4}
    assert "--sft head_output_norm=True learning_rate=0.0001" in f.command()
    with pytest.raises(ConfigError, match="--sft: unknown option.*'head_outptu_norm'"):
        Pipeline(PipelineOptions(dataset=str(data), sft_overrides={"head_outptu_norm": True}))
    with pytest.raises(ValueError, match="--sft seed: the pipeline sets it .use --seeds"):
        Pipeline(PipelineOptions(dataset=str(data), sft_overrides={"seed": 3}))


def test_differences_over_two_seeds_also_resample_the_seeds(report, tmp_path):
    """With two seeds each difference carries its per-seed values and a seeds+rows interval (seed s paired with seed
    s); a one-seed difference has none (the fixture's report shows "-")."""
    from llmrec.cli import main

    root, data = report
    assert "| latent SFT vs BIGRec SFT | 1 |" in (root / "results" / "tiny.md").read_text()
    assert "ci95_seeds_rows" not in json.loads((root / "results" / "tiny.json").read_text())["differences"][0]["metrics"][
        "ndcg@10"]
    args = _args(data, tmp_path, seeds=2)
    args[args.index("--methods") + 1] = "bigrec-sft,latent-sft"
    assert main(args) == 0
    res = json.loads((tmp_path / "results" / "tiny.json").read_text())
    (d,) = [d for d in res["differences"] if d["name"] == "latent SFT vs BIGRec SFT"]
    assert d["seeds"] == [0, 1]
    n = d["metrics"]["ndcg@10"]

    def ndcg(run: str) -> float:
        return json.loads((tmp_path / "runs" / run / "results.json").read_text())["metrics"]["item"]["ndcg@10"]

    assert n["per_seed_diff"] == pytest.approx([ndcg("eval_sft_latent") - ndcg("eval_sft_bigrec"),
                                                ndcg("seed1/eval_sft_latent") - ndcg("seed1/eval_sft_bigrec")])
    lo, hi = n["ci95_seeds_rows"]
    assert lo <= n["diff"] <= hi
    assert f"| latent SFT vs BIGRec SFT | 2 | {n['diff']:+.4f} [" in (tmp_path / "results" / "tiny.md").read_text()


def test_sft_overrides_reach_both_sft_runs_and_the_report(report, tmp_path):
    from safetensors.torch import load_file

    from llmrec.cli import main
    from llmrec.models.latent import LATENT_CONFIG_NAME, LATENT_HEAD_NAME

    root, data = report
    args = _args(data, tmp_path, sft="head_output_norm=true")
    args[args.index("--methods") + 1] = "bigrec-sft,latent-sft,latent-sft+grpo"
    assert main(args) == 0
    runs = tmp_path / "runs"
    latent = json.loads((runs / "sft_latent" / LATENT_CONFIG_NAME).read_text())["config"]
    assert latent["head_output_norm"] is True
    # GRPO loads the head with its norm and saves it in the same form (this run's single step has a warm-up
    # learning rate of 0, so nothing moves; tests/test_grpo.py covers training).
    sft_head, grpo_head = (load_file(str(runs / d / LATENT_HEAD_NAME)) for d in ("sft_latent", "grpo_latent"))
    assert sft_head.keys() == grpo_head.keys() and "output_norm_weight" in grpo_head
    assert json.loads((runs / "grpo_latent" / LATENT_CONFIG_NAME).read_text())["config"]["head_output_norm"]
    for kind in ("latent", "bigrec"):
        assert json.loads((runs / f"sft_{kind}" / "train_results.json").read_text())["config"]["head_output_norm"]
    res = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert res["protocol"]["llm_sft_overrides"] == {"head_output_norm": True}
    assert "SFT with head_output_norm=True" in (tmp_path / "results" / "tiny.md").read_text()
    assert "--sft head_output_norm=True" in (tmp_path / "results" / "tiny.md").read_text()


def test_a_finished_stage_of_another_dtype_is_refused(report):
    from llmrec.bench_pipeline import Pipeline, PipelineOptions

    root, data = report
    same = dict(dataset=str(data), model="tiny-qwen2", output_dir=str(root / "runs"), train_rows=8, grpo_rows=4)
    fixture = Pipeline(PipelineOptions(**same, dtype="float32"))  # what the fixture trained with
    assert "--dtype float32" in fixture.command()
    fixture._check_finished("sft_latent", 0)
    other = Pipeline(PipelineOptions(**same))  # the default, bfloat16
    assert "--dtype" not in other.command()
    for stage in ("sft_latent", "grpo_latent"):
        with pytest.raises(ValueError, match=r"model_dtype='float32' \(asked: 'bfloat16'\)"):
            other._check_finished(stage, 0)


def test_a_finished_id_model_trained_on_other_files_is_refused(report, tmp_path):
    # Same dataset path and config, other contents (re-prepared or edited): the finished SASRec run must not be
    # reused as if trained on these files.
    import shutil

    from llmrec.bench_pipeline import Pipeline, PipelineOptions

    root, data = report
    data_copy, runs = tmp_path / "data", tmp_path / "runs"
    shutil.copytree(data, data_copy)
    shutil.copytree(root / "runs" / "seqrec_sasrec", runs / "seqrec_sasrec")
    res_file = runs / "seqrec_sasrec" / "results.json"
    res = json.loads(res_file.read_text())
    res["config"].update(dataset_dir=str(data_copy), output_dir=str(runs / "seqrec_sasrec"))
    res_file.write_text(json.dumps(res))
    id_overrides = {"epochs": 2, "hidden_size": 16, "inner_size": 32, "max_history": 5, "progress": False,
                    "num_threads": 1}  # the fixture's --id
    pipeline = Pipeline(PipelineOptions(dataset=str(data_copy), model="tiny-qwen2", output_dir=str(runs),
                                        id_overrides=id_overrides))
    pipeline._check_finished("seqrec_sasrec", 0)  # the same files: reused
    train = data_copy / "train.jsonl"
    rows = train.read_text().splitlines()
    train.write_text("\n".join(rows[1:] + rows[:1]) + "\n")
    with pytest.raises(ValueError, match="train.jsonl are not those it was trained on"):
        pipeline._check_finished("seqrec_sasrec", 0)


def test_report_only_and_bad_options(report, tmp_path):
    from llmrec.bench_pipeline import Pipeline, PipelineOptions

    root, data = report
    with pytest.raises(ValueError, match="unknown method"):
        PipelineOptions(methods=["sasrec", "bert4rec"])
    with pytest.raises(ValueError, match="d3_weights"):
        PipelineOptions(d3_weights=[1.0, 0])
    # one test row: accepted, then the report's bootstrap failed after every stage had run (review)
    with pytest.raises(ValueError, match="--test-rows must be >= 2"):
        PipelineOptions(test_rows=1)
    # "" selected every method, "," none (failing at the end) (review)
    import argparse

    from llmrec.bench_pipeline import options_from_args

    for empty in ("", ",", " , "):
        with pytest.raises(ValueError, match="names no method"):
            options_from_args(argparse.Namespace(methods=empty))
    with pytest.raises(ValueError, match="methods is empty"):
        PipelineOptions(methods=[])
    from llmrec.bench_pipeline import _pairs

    # the last value won without a word (a review)
    with pytest.raises(ValueError, match=r"--eval: num_beams given twice \(num_beams=10 and 'num_beams=20'\)"):
        _pairs(["num_beams=10", "num_beams=20"], "--eval")
    assert _pairs(["num_beams=10", "ks=[1, 5]"], "--eval") == {"num_beams": 10, "ks": [1, 5]}
    from llmrec.bench_pipeline import _weights

    assert _weights("0.3, 1,3") == [0.3, 1.0, 3.0]
    with pytest.raises(ValueError, match="numbers separated by commas"):
        _weights("0.3;1")
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        Pipeline(PipelineOptions(dataset=str(data), output_dir=str(tmp_path / "empty"), report_only=True,
                                 results_dir=str(tmp_path / "r"))).run()
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        Pipeline(PipelineOptions(dataset=str(tmp_path / "nodata"), output_dir=str(tmp_path / "x"),
                                 methods=["popularity"])).run()
    # evaluations on different rows are refused, naming each run's rows
    import shutil

    other = tmp_path / "other"
    Pipeline(PipelineOptions(dataset=str(data), output_dir=str(other), methods=["popularity"], test_rows=3,
                             results_dir=str(tmp_path / "r"), name="pop")).run()
    shutil.copytree(root / "runs" / "eval_sasrec", other / "eval_sasrec")
    with pytest.raises(ValueError, match="not on the same test rows"):
        Pipeline(PipelineOptions(dataset=str(data), output_dir=str(other), methods=["popularity", "sasrec"],
                                 report_only=True, results_dir=str(tmp_path / "r"), name="mixed")).run()
    assert not (tmp_path / "r" / "mixed.json").exists()
    # a subset of the finished methods reports just those
    res = Pipeline(PipelineOptions(dataset=str(data), output_dir=str(root / "runs"), report_only=True,
                                   methods=["popularity", "sasrec"], results_dir=str(tmp_path / "r"),
                                   name="sub", test_rows=6, id_overrides=dict(FIXTURE_ID))).run()
    assert set(res["methods"]) == {"popularity", "sasrec"}
    assert not (tmp_path / "r" / "sub.md.tmp").exists()
    # the JSON last: a report cut after it left the previous .md for update_readme_results.py (a review)
    stamps = {ext: (tmp_path / "r" / f"sub.{ext}").stat().st_mtime_ns for ext in ("md", "png", "json")}
    import llmrec.bench_pipeline as bp

    with pytest.MonkeyPatch.context() as m:
        m.setattr(bp, "plot_report", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            Pipeline(PipelineOptions(dataset=str(data), output_dir=str(root / "runs"), report_only=True,
                                     methods=["popularity", "sasrec"], results_dir=str(tmp_path / "r"),
                                     name="sub", test_rows=6, id_overrides=dict(FIXTURE_ID))).run()
    assert (tmp_path / "r" / "sub.json").stat().st_mtime_ns == stamps["json"]  # not written before the plot
    # a finished beam evaluation made with another LM setting is refused, naming both runs
    mixed = tmp_path / "mixed_runs"
    for name in ("eval_sft_bigrec", "eval_sft_latent"):
        shutil.copytree(root / "runs" / name, mixed / name)
    f = mixed / "eval_sft_latent" / "results.json"
    res_json = json.loads(f.read_text())
    res_json["protocol"]["num_beams"] += 1
    f.write_text(json.dumps(res_json))
    with pytest.raises(ValueError, match=r"differ in num_beams: .*eval_sft_\w+.*eval_sft_\w+"):
        Pipeline(PipelineOptions(dataset=str(data), output_dir=str(mixed), methods=["bigrec-sft", "latent-sft"],
                                 report_only=True, results_dir=str(tmp_path / "r"), name="beams")).run()
    # a D3 row must decode the same checkpoint as its plain row
    d3 = tmp_path / "d3_runs"
    for name in ("eval_sft_bigrec", "eval_sft_bigrec_d3"):
        shutil.copytree(root / "runs" / name, d3 / name)
    assert json.loads((d3 / "eval_sft_bigrec" / "results.json").read_text())["protocol"]["checkpoint_sha256"]
    f = d3 / "eval_sft_bigrec_d3" / "results.json"
    res_json = json.loads(f.read_text())
    res_json["protocol"]["checkpoint_sha256"] = "0" * 64
    f.write_text(json.dumps(res_json))
    with pytest.raises(ValueError, match="decoded other weights"):
        Pipeline(PipelineOptions(dataset=str(data), output_dir=str(d3), methods=["bigrec-sft", "bigrec-sft+d3"],
                                 report_only=True, results_dir=str(tmp_path / "r"), name="d3pair")).run()


def test_d3_weight_selected_on_validation_rows(report, capsys):
    """--d3-weight with several values: each D3 method picks its weight by NDCG@10 on validation rows (recorded,
    ties to the smaller weight), is tested with that weight only, and a rerun selects nothing again."""
    from llmrec.cli import main

    root, data = report
    args = _args(data, root, d3_weight="0.5,2", d3_valid_rows=4, name="tiny_d3")
    args[args.index("--methods") + 1] = "bigrec-sft,bigrec-sft+d3"
    assert main(args) == 0
    sel = json.loads((root / "runs" / "d3_selection" / "bigrec-sft+d3.json").read_text())
    assert set(sel["valid_ndcg@10"]) == {"0.5", "2"} and sel["rows"] == 4 and sel["split"] == "valid"
    scores = {float(k): v for k, v in sel["valid_ndcg@10"].items()}
    assert sel["chosen"] == max(scores, key=lambda w: (scores[w], -w))
    for w in (0.5, 2):
        valid = json.loads((root / "runs" / "d3_selection" / f"bigrec-sft+d3_w{w:g}" / "results.json").read_text())
        assert valid["protocol"]["split"] == "valid" and valid["protocol"]["guidance"]["weight"] == w
    test_dir = root / "runs" / f"eval_sft_bigrec_d3_w{sel['chosen']:g}"
    assert json.loads((test_dir / "results.json").read_text())["protocol"]["guidance"]["weight"] == sel["chosen"]
    res = json.loads((root / "results" / "tiny_d3.json").read_text())
    assert res["methods"]["bigrec-sft+d3"]["runs"] == [str(test_dir)]
    assert res["protocol"]["d3_selection"]["bigrec-sft+d3"]["0"]["chosen"] == sel["chosen"]
    md = (root / "results" / "tiny_d3.md").read_text()
    assert "selected per method and seed by NDCG@10 on 4 validation rows" in md
    # with two weights the choice is always on an edge of the grid: said in the log and in the report
    edge = "largest" if sel["chosen"] == 2 else "smallest"
    assert f"is the grid's {edge}; consider a wider --d3-weight grid" in capsys.readouterr().err
    assert f"among 0.5, 2 (BIGRec SFT + D3: {sel['chosen']:g}, the grid's {edge})" in md
    # several seeds: those with the same choice are named together
    from llmrec.bench_pipeline import report_markdown

    by_seed = res["protocol"]["d3_selection"]["bigrec-sft+d3"]
    by_seed["1"] = dict(by_seed["0"])
    by_seed["2"] = dict(by_seed["0"], chosen=2.5 - sel["chosen"])  # the other weight, the other edge
    other = "smallest" if edge == "largest" else "largest"
    assert (f"(BIGRec SFT + D3: {sel['chosen']:g} (seeds 0, 1; the grid's {edge}), {2.5 - sel['chosen']:g} "
            f"(seed 2; the grid's {other}))") in report_markdown(res)
    from llmrec.bench_pipeline import Pipeline, options_from_args
    from llmrec.cli import build_parser

    ns = build_parser().parse_args(args)
    assert "--d3-weight 0.5,2 --d3-valid-rows 4" in Pipeline(options_from_args(ns)).command()
    # a selection made on other validation rows is not reused
    ns.d3_valid_rows = 5
    with pytest.raises(ValueError, match="on 4 validation rows .* asked: .* on 5 rows"):
        Pipeline(options_from_args(ns)).d3_weight("bigrec-sft+d3", 0)
    stamp = (root / "runs" / "d3_selection" / "bigrec-sft+d3.json").stat().st_mtime_ns
    assert main(args) == 0  # rerun: nothing selected or evaluated again
    assert (root / "runs" / "d3_selection" / "bigrec-sft+d3.json").stat().st_mtime_ns == stamp
    capsys.readouterr()
    other = _args(data, root, d3_weight="0.5,3", d3_valid_rows=4, name="tiny_d3")
    other[other.index("--methods") + 1] = "bigrec-sft+d3"
    assert main(other) == 1
    assert "remove it to select again" in capsys.readouterr().err


def test_archive_lets_another_checkout_report_and_skip_finished_methods(report, tmp_path, capsys):
    """The report's small files are mirrored into <results>/<name>_runs/ (no weights, compact rankings); with that
    mirror and an empty run directory (a fresh clone), a rerun trains and evaluates nothing and reports the same."""
    import shutil

    from llmrec.cli import main

    root, data = report
    archive = root / "results" / "tiny_runs"
    files = [p for p in archive.rglob("*") if p.is_file()]
    assert files and not any(p.suffix in (".safetensors", ".pt", ".bin") for p in files)
    rec = json.loads((archive / "eval_sft_latent" / "rankings.jsonl").read_text().splitlines()[0])
    assert {"row", "user_id", "target_item_id", "item_rank", "title_rank"} <= set(rec) and "title_ranking" not in rec
    assert (archive / "sft_latent" / "train_results.json").exists()
    assert (archive / "seqrec_sasrec" / "results.json").exists()
    before = json.loads((root / "results" / "tiny.json").read_text())

    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    args = _args(data, tmp_path)  # same options, empty --output-dir tmp_path/runs
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "== seed 0: train" not in out and "evaluate" not in out
    assert out.count("(skipped)") == len(METHODS.split(","))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    after = json.loads((results / "tiny.json").read_text())
    assert set(after["methods"]) == set(before["methods"])
    for m, r in before["methods"].items():
        assert after["methods"][m]["mean"] == pytest.approx(r["mean"])
        assert after["methods"][m]["train_seconds"] == r["train_seconds"]
    assert after["differences"] == before["differences"]
    assert after["protocol"]["grpo_settings"] == before["protocol"]["grpo_settings"]
    assert after["protocol"]["llm_train_rows"] == before["protocol"]["llm_train_rows"]


def test_an_archived_evaluation_beside_a_retrained_stage_is_refused(report, tmp_path, capsys):
    """The run directory's sft_latent holds other weights than those its archived evaluation decoded (retrained):
    the archived result was skipped to and reported as that stage's (review); now refused, naming the weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from llmrec.cli import main

    root, data = report
    shutil.copytree(root / "results", tmp_path / "results")
    shutil.copytree(root / "runs" / "sft_latent", tmp_path / "runs" / "sft_latent")
    f = tmp_path / "runs" / "sft_latent" / "adapter_model.safetensors"
    save_file({k: v + 0.5 for k, v in load_file(str(f)).items()}, str(f))
    args = _args(data, tmp_path)
    args[args.index("--methods") + 1] = "latent-sft"
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "an archived evaluation of latent-sft (seed 0)" in err and "checkpoint weights" in err


def test_two_processes_on_one_output_dir_share_a_stage_instead_of_training_it_twice(tmp_path, monkeypatch):
    """Two pipelines (lanes) started side by side on one --output-dir, both needing SASRec: the stage lock makes
    the second wait while the first trains, then reuse its run (one training); lanes run with --no-report, and a
    final --report-only reports all their methods."""
    import threading
    import time

    from llmrec.bench_pipeline import Pipeline, PipelineOptions

    data = write_prepared(tmp_path / "data", n_items=30, n_users=14, seed=5)
    trained, started = [], threading.Event()
    real = Pipeline._seqrec

    def slow_seqrec(self, model, seed):
        trained.append(model)
        started.set()
        time.sleep(1.0)  # long enough for the other lane to reach the stage
        return real(self, model, seed)

    monkeypatch.setattr(Pipeline, "_seqrec", slow_seqrec)

    def options(methods: list[str], **kw) -> PipelineOptions:
        return PipelineOptions(
            dataset=str(data), model="tiny-qwen2", methods=methods, output_dir=str(tmp_path / "runs"),
            results_dir=str(tmp_path / "results"), name="lanes", test_rows=6,
            id_overrides={"epochs": 1, "hidden_size": 16, "inner_size": 32, "max_history": 5, "progress": False,
                          "num_threads": 1}, **kw)

    def lane(methods: list[str], errors: list) -> None:
        try:
            assert Pipeline(options(methods, no_report=True)).run() == {}
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    errors: list = []
    first = threading.Thread(target=lane, args=(["sasrec"], errors))
    first.start()
    assert started.wait(60)
    second = threading.Thread(target=lane, args=(["popularity", "sasrec"], errors))
    second.start()
    first.join(300)
    second.join(300)
    assert not errors, errors
    assert trained == ["sasrec"]
    assert not (tmp_path / "results" / "lanes.json").exists()  # lanes write no (partial) report
    res = Pipeline(options(["popularity", "sasrec"], report_only=True)).run()
    assert set(res["methods"]) == {"popularity", "sasrec"} and res["missing"] == []
    with pytest.raises(ValueError, match="exclude each other"):
        options(["sasrec"], report_only=True, no_report=True)


def test_best_id_model_is_chosen_on_validation_not_on_the_test_rows():
    from llmrec.bench_pipeline import Pipeline

    full = {"sasrec": {0: {"valid_ndcg@10": 0.05, "test": {"ndcg@10": 0.01}},
                       1: {"valid_ndcg@10": 0.03, "test": {"ndcg@10": 0.01}}},
            "lares": {0: {"valid_ndcg@10": 0.035, "test": {"ndcg@10": 0.09}}}}
    assert Pipeline._best_id_model(["sasrec", "lares"], full) == "sasrec"  # valid 0.04 vs 0.035; test says lares
    full["lares"][0]["valid_ndcg@10"] = None
    assert Pipeline._best_id_model(["sasrec", "lares"], full) is None
    assert Pipeline._best_id_model([], full) is None


def test_archive_reads_rankings_with_unicode_line_separators(tmp_path):
    """Titles with U+2028 / U+2029 / U+0085 stay raw in rankings.jsonl: the archive copy splits lines at "\\n" only."""
    from llmrec.bench_pipeline import Pipeline, PipelineOptions
    from llmrec.data.catalog import ItemCatalog
    from llmrec.evaluation.evaluator import EvalConfig, evaluate

    data = write_prepared(tmp_path / "data", n_items=30, n_users=12)
    seps = ["\u2028", "\u2029", "\x85"]
    ItemCatalog([str(i) for i in range(1, 31)], [f"Game{seps[i % 3]}{i}" for i in range(1, 31)]).save(data / "catalog.jsonl")
    pipe = Pipeline(PipelineOptions(dataset=str(data), methods=["popularity"], output_dir=str(tmp_path / "runs"),
                                    results_dir=str(tmp_path / "results"), name="tiny"))
    eval_dir = pipe.eval_dir("popularity", 0)
    evaluate(EvalConfig(dataset=str(data), method="popularity", ks=[1, 5], output_dir=str(eval_dir)))
    pipe._archive("popularity", 0, eval_dir)
    archived = [json.loads(x) for x in (pipe._mirror(eval_dir) / "rankings.jsonl").read_text(encoding="utf-8")
                .split("\n") if x]
    assert [r["row"] for r in archived] == list(range(12))


def test_a_method_found_only_in_the_archive_is_checked_before_it_is_skipped_or_reported(report, tmp_path, capsys):
    """A checkout with the archive but no run directory: a method whose evaluation is archived is skipped (and
    reported under this invocation's flags) only if its archived training summaries and evaluation protocol match
    what is asked now, as a stage in the run directory is checked; otherwise nothing is run and no report written."""
    import shutil

    from llmrec.cli import main

    root, data = report
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    report_md = (results / "tiny.md").read_text()

    def run(*extra: str, **kw) -> str:
        args = _args(data, tmp_path, **kw) + list(extra)
        capsys.readouterr()
        assert main(args) == 1
        assert (results / "tiny.md").read_text() == report_md  # never relabelled with the refused settings
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.json"))
        return capsys.readouterr().err

    err = run("--sft", "learning_rate=0.5")
    assert "tiny_runs/sft_bigrec (archived) holds a finished run made with learning_rate=0.0003 (asked: 0.5)" in err
    args = _args(data, tmp_path)
    args[args.index("--id") + 1] = "epochs=7"
    capsys.readouterr()
    assert main(args) == 1
    assert "tiny_runs/seqrec_sasrec (archived) holds a finished run made with epochs=2 (asked: 7)" in \
        capsys.readouterr().err
    assert "max_rows=6 (asked: 5)" in run(test_rows=5)
    assert "row_seed=0 (asked: 3)" in run(row_seed=3)
    assert "prompts=4 (asked: 3)" in run(grpo_rows=3)
    assert "archived evaluation of zero-shot (seed 0) made with dtype='float32' (asked: 'bfloat16')" in \
        run(dtype="bfloat16")
    # --report-only labels the report with this invocation's flags as well: refused the same way
    err = run("--report-only", "--sft", "learning_rate=0.5")
    assert "(archived) holds a finished run made with learning_rate=0.0003 (asked: 0.5)" in err
    # an archived evaluation whose training stage is in neither place cannot be checked: refused
    (results / "tiny_runs" / "seqrec_sasrec" / "results.json").unlink()
    err = run()
    assert "holds an archived evaluation of bigrec-sft+d3 (seed 0)" in err and "cannot be checked" in err
    # the same settings: accepted (test_archive_lets_another_checkout_report_and_skip_finished_methods)


def test_seeds_evaluated_under_another_beam_protocol_are_not_averaged(report):
    """The report refuses to put evaluations made with another history length, or (among the rows without D3, and
    among the D3 rows) another length penalty, into one table; D3's own length penalty of 0 beside the plain rows'
    is fine."""
    from llmrec.bench_pipeline import Pipeline

    root, _ = report
    finished = {m: {0: root / "runs" / d, 1: root / "runs" / "seed1" / d}
                for m, d in (("bigrec-sft", "eval_sft_bigrec"), ("bigrec-sft+d3", "eval_sft_bigrec_d3"))}

    def proto(name: str) -> dict:
        return json.loads((root / "runs" / name / "results.json").read_text())["protocol"]

    plain, d3 = proto("eval_sft_bigrec"), proto("eval_sft_bigrec_d3")
    assert plain["length_penalty"] == 1.0 and d3["length_penalty"] == 0.0
    same = {("bigrec-sft", 0): plain, ("bigrec-sft", 1): dict(plain), ("bigrec-sft+d3", 0): d3,
            ("bigrec-sft+d3", 1): dict(d3)}
    Pipeline._check_same_protocol(same, finished)
    for key, method, value, where in (("history_length", "bigrec-sft", 3, ""),
                                      ("history_length", "bigrec-sft+d3", 3, ""),
                                      ("early_stopping", "bigrec-sft", False, ""),
                                      ("batch_size", "bigrec-sft+d3", 1, ""),
                                      ("length_penalty", "bigrec-sft", 0.3, " (among the rows without D3)"),
                                      ("length_penalty", "bigrec-sft+d3", 0.3, " (among the D3 rows)")):
        mixed = dict(same)
        mixed[(method, 1)] = {**same[(method, 1)], key: value}
        with pytest.raises(ValueError, match=rf"differ in {key}{re.escape(where)}: .* {value!r} in .*seed1"):
            Pipeline._check_same_protocol(mixed, finished)
    # early_stopping is recorded only when false: the other run shows the default, not None (review)
    mixed = {**same, ("bigrec-sft", 0): {**plain, "early_stopping": False}}
    with pytest.raises(ValueError, match=r"differ in early_stopping: False in .*, True in .*seed1"):
        Pipeline._check_same_protocol(mixed, finished)


def test_eval_protocol_differences_see_early_stopping():
    """A finished evaluation decoded with the other early_stopping (recorded only when false) is a mismatch, as
    prompt_fit is: it was accepted as the pipeline's evaluation (and D3 selections likewise)."""
    from llmrec.bench_pipeline import eval_protocol_differences
    from llmrec.evaluation.evaluator import EvalConfig

    cfg = EvalConfig(dataset="data/games", split="test", method="beam", model_name_or_path="tiny-qwen2",
                     dtype="float32", num_beams=4, ks=[1, 3], batch_size=8)
    proto = {"dataset": "data/games", "split": "test", "max_rows": cfg.max_rows, "row_seed": cfg.row_seed,
             "method": "beam", "ks": [1, 3], "history_length": cfg.history_length, "model": "tiny-qwen2",
             **{k: getattr(cfg, k) for k in ("dtype", "prompt", "noun", "use_chat_template", "tokenization",
                                             "num_beams", "length_penalty", "max_prompt_length", "batch_size")}}
    assert eval_protocol_differences(proto, cfg) == {}
    assert eval_protocol_differences({**proto, "early_stopping": False}, cfg) == {"early_stopping": (False, True)}
    cfg.early_stopping = False
    assert eval_protocol_differences(proto, cfg) == {"early_stopping": (True, False)}


def test_grpo_and_id_keys_the_pipeline_sets_are_refused(report):
    """Like --sft's: a --grpo or --id key the pipeline sets itself would be overridden (--id) or win over the
    pipeline's value and then fail the finished-stage check of the same command (--grpo)."""
    from llmrec.bench_pipeline import Pipeline, PipelineOptions

    _, data = report
    for key, value, hint in (("max_train_rows", 8, "--grpo-rows"), ("model_dtype", "bfloat16", "--dtype"),
                             ("seed", 3, "--seeds"), ("output_dir", "x", "--output-dir"), ("dataset", "x", "--dataset"),
                             ("sft_checkpoint", "x", "latent SFT stage")):
        with pytest.raises(ValueError, match=f"--grpo {key}: the pipeline sets it .*{hint}"):
            Pipeline(PipelineOptions(dataset=str(data), grpo_overrides={key: value}))
    for key, value, hint in (("seed", 3, "--seeds"), ("model", "lares", "--methods"), ("output_dir", "x", "--output-dir"),
                             ("dataset_dir", "x", "--dataset"), ("mask_history", True, "the papers' protocol")):
        with pytest.raises(ValueError, match=f"--id {key}: the pipeline sets it .*{hint}"):
            Pipeline(PipelineOptions(dataset=str(data), id_overrides={key: value}))
    Pipeline(PipelineOptions(dataset=str(data), grpo_overrides={"noise_scale": 0.3}, id_overrides={"epochs": 3}))


def test_an_id_recipe_masking_history_is_refused(report, tmp_path):
    """The beam-search rows rank history items like any item: an ID recipe masking them would put another notion of
    a hit into the same table (and the paired differences)."""
    import shutil

    from llmrec.bench_pipeline import Pipeline, PipelineOptions
    from llmrec.resources import resource_dir

    _, data = report
    recipes = tmp_path / "recipes"
    shutil.copytree(resource_dir("recipes"), recipes)
    p = Pipeline(PipelineOptions(dataset=str(data), recipes=str(recipes)))
    assert p._seqrec_fields("sasrec", 0)["mask_history"] is False
    recipe = recipes / "seqrec" / "sasrec_games.yaml"
    assert "\nmask_history: false\n" in recipe.read_text()
    recipe.write_text(recipe.read_text().replace("\nmask_history: false\n", "\nmask_history: true\n"))
    with pytest.raises(ValueError, match=r"sasrec_games.yaml: mask_history true: the table's rows rank history"):
        p._seqrec_fields("sasrec", 0)


FIXTURE_ID = {"epochs": 2, "hidden_size": 16, "inner_size": 32, "max_history": 5, "progress": False, "num_threads": 1}


def _fixture_pipeline(root: Path, data: Path, **kw):
    """A Pipeline with the fixture's options (``kw`` replaces some)."""
    from llmrec.bench_pipeline import Pipeline, PipelineOptions

    opts = dict(dataset=str(data), model="tiny-qwen2", output_dir=str(root / "runs"), train_rows=8, grpo_rows=4,
                dtype="float32", id_overrides=dict(FIXTURE_ID))
    return Pipeline(PipelineOptions(**{**opts, **kw}))


def test_grpo_prompts_are_capped_at_the_rows_it_can_draw(report):
    """--grpo-rows above the train split's size trains on every row; the same command then accepts that run (the
    SFT check caps --train-rows the same way), and a smaller --grpo-rows is still refused."""
    root, data = report
    n_train = json.loads((data / "stats.json").read_text())["rows"]["train"]
    f = root / "runs" / "grpo_latent" / "grpo_results.json"
    saved = f.read_text()
    try:
        # as a run with --grpo-rows >= n_train
        f.write_text(json.dumps({**json.loads(saved), "prompts": n_train, "drawn_prompts": n_train}))
        _fixture_pipeline(root, data, grpo_rows=n_train + 24)._check_finished("grpo_latent", 0)
        with pytest.raises(ValueError, match=rf"prompts={n_train} \(asked: 4\)"):
            _fixture_pipeline(root, data)._check_finished("grpo_latent", 0)
    finally:
        f.write_text(saved)
    # with exclude_sft_rows the prompts come from the rows the SFT (8 of them) did not train on
    excl = _fixture_pipeline(root, data, grpo_rows=n_train, grpo_overrides={"exclude_sft_rows": True})
    assert excl._grpo_prompts(0) == n_train - 8


def test_an_id_key_a_model_does_not_read_does_not_block_its_finished_stage(report):
    """--id applies to every ID model: a key SASRec does not read (ReaRec-ERL's kl_weight) leaves its finished run
    (and D3's guide) reusable, whichever side holds it; a key it reads is still compared."""
    root, data = report
    _fixture_pipeline(root, data, id_overrides={**FIXTURE_ID, "kl_weight": 0.3})._check_finished("seqrec_sasrec", 0)
    with pytest.raises(ValueError, match=r"dropout=0.5 \(asked: 0.3\)"):
        _fixture_pipeline(root, data, id_overrides={**FIXTURE_ID, "kl_weight": 0.3, "dropout": 0.3}
                          )._check_finished("seqrec_sasrec", 0)
    f = root / "runs" / "seqrec_sasrec" / "results.json"
    saved = f.read_text()
    try:
        res = json.loads(saved)
        f.write_text(json.dumps({**res, "config": {**res["config"], "kl_weight": 0.3}}))  # a run made with it
        _fixture_pipeline(root, data)._check_finished("seqrec_sasrec", 0)
    finally:
        f.write_text(saved)


def test_a_repeated_d3_weight_is_refused_before_any_work(report, capsys):
    from llmrec.bench_pipeline import PipelineOptions
    from llmrec.cli import main

    root, data = report
    with pytest.raises(ValueError, match="weight.s. 3 given more than once"):
        PipelineOptions(d3_weights=[1.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="weight.s. 1 given more than once"):
        PipelineOptions(d3_weights=[1.0, 1.0000001])  # one key "1" in the selection's grid
    capsys.readouterr()
    assert main(_args(data, root, d3_weight="1,3,3", name="tiny_dup")) == 1
    assert "--d3-weight: weight(s) 3 given more than once" in capsys.readouterr().err
    assert not (root / "results" / "tiny_dup.json").exists()


def test_stages_and_evaluations_on_retrained_weights_or_other_data_are_refused(report):
    """Checked by content, not only by path (review): a GRPO stage whose SFT checkpoint was retrained since (the
    remedy of a refused SFT: remove it, train again) is refused, and so is an evaluation in the run directory of
    weights retrained since (--report-only reported it); an SFT stage on a dataset prepared again in place is
    refused (ID-model stages already were). The fixture's files are changed in place and restored."""
    root, data = report
    pipeline = _fixture_pipeline(root, data, methods=["latent-sft", "latent-sft+grpo"], test_rows=6)
    for stage in ("sft_latent", "grpo_latent"):
        pipeline._check_finished(stage, 0)
    pipeline._check_evaluation("latent-sft", 0)
    head = root / "runs" / "sft_latent" / "latent_head.safetensors"
    train = data / "train.jsonl"
    saved = {head: head.read_bytes(), train: train.read_text()}
    try:
        head.write_bytes(saved[head] + b" ")  # other weights at the same path
        with pytest.raises(ValueError, match=r"grpo_latent holds a finished run made with sft weights='sha256 "):
            pipeline._check_finished("grpo_latent", 0)
        with pytest.raises(ValueError, match=r"eval_sft_latent holds a finished evaluation of latent-sft \(seed 0\) "
                                             r"made with checkpoint weights="):
            _fixture_pipeline(root, data, methods=["latent-sft"], test_rows=6)._check_evaluation("latent-sft", 0)
        head.write_bytes(saved[head])
        rows = saved[train].splitlines()
        train.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # the same rows in another order
        with pytest.raises(ValueError, match="sft_latent holds a finished run made with data="):
            pipeline._check_finished("sft_latent", 0)
    finally:
        head.write_bytes(saved[head])
        train.write_text(saved[train])
    pipeline._check_finished("grpo_latent", 0)


def test_popularity_and_zero_shot_are_reported_only_over_the_data_there_is_now(report):
    """They have no training stage whose data digests would catch a dataset prepared again in place, and the
    evaluator checks its data only when it runs: an evaluation only reported (archived, --report-only) gave the
    old list's and the old catalogue's numbers (review). The fixture's files are changed in place and restored."""
    root, data = report
    pipeline = _fixture_pipeline(root, data, methods=["popularity", "zero-shot"], test_rows=6)
    for method in ("popularity", "zero-shot"):
        pipeline._check_evaluation(method, 0)
    train, catalog = data / "train.jsonl", data / "catalog.jsonl"
    saved = {train: train.read_text(), catalog: catalog.read_text()}
    try:
        rows = [json.loads(x) for x in saved[train].splitlines()]
        least = min(range(1, 31), key=lambda i: sum(r["target_item_id"] == i for r in rows))
        train.write_text(saved[train] + "".join(json.dumps(dict(rows[0], target_item_id=least)) + "\n"
                                                for _ in range(20)))  # now the most popular item
        with pytest.raises(ValueError, match=r"eval_popularity holds a finished evaluation of popularity \(seed 0\) "
                                             r"whose list \(top items .*\) is not the one .*train.jsonl gives now"):
            _fixture_pipeline(root, data, methods=["popularity"], test_rows=6)._check_evaluation("popularity", 0)
        train.write_text(saved[train])
        first, rest = saved[catalog].split("\n", 1)
        catalog.write_text(json.dumps(dict(json.loads(first), title="Another title")) + "\n" + rest)
        with pytest.raises(ValueError, match=r"eval_zero_shot holds a finished evaluation of zero-shot \(seed 0\) "
                                             r"ranked over another catalogue"):
            _fixture_pipeline(root, data, methods=["zero-shot"], test_rows=6)._check_evaluation("zero-shot", 0)
    finally:
        train.write_text(saved[train])
        catalog.write_text(saved[catalog])


def test_a_wrong_stage_setting_fails_before_any_stage_trains(tmp_path, capsys):
    """--id n_heads=3 with hidden_size 16 failed only when the SASRec stage started, after BIGRec SFT had trained
    and been evaluated (review): every stage's config is built first."""
    from llmrec.cli import main

    data = write_prepared(tmp_path / "data", n_items=30, n_users=14, seed=5)
    args = _args(data, tmp_path, methods="bigrec-sft,sasrec")
    args[args.index("inner_size=32")] = "n_heads=3"
    assert main(args) == 1
    assert "hidden_size (16) must be divisible by n_heads (3)" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "sft_bigrec").exists()


def test_report_only_checks_the_evaluations_of_the_run_directory_too(report, tmp_path, capsys):
    """--report-only labels the report with this invocation's flags (protocol line, "Reproduce:", SFT text) and
    archives what it reports: an evaluation in the run directory made with other settings, or whose training stage
    was, is refused as an archived one is, naming the directory and the settings, and nothing is written; with the
    settings it was made with, it is reported."""
    from llmrec.cli import main

    root, data = report
    results = tmp_path / "results"

    def run(*extra: str, **kw) -> int:
        args = _args(data, root, **kw) + ["--report-only", *extra]
        args[args.index("--results-dir") + 1] = str(results)
        capsys.readouterr()
        return main(args)

    runs = root / "runs"
    for kw, extra, message in (
            ({"row_seed": 7}, (), f"{runs}/eval_popularity holds a finished evaluation of popularity (seed 0) made with "
                                  "row_seed=0 (asked: 7)"),
            ({"test_rows": 5}, (), "eval_popularity holds a finished evaluation of popularity (seed 0) made with "
                                   "max_rows=6 (asked: 5)"),
            ({"dtype": "bfloat16"}, (), f"{runs}/eval_zero_shot holds a finished evaluation of zero-shot (seed 0) made "
                                        "with dtype='float32' (asked: 'bfloat16')"),
            ({"model": "other-model"}, (), "zero-shot (seed 0) made with model='tiny-qwen2' (asked: 'other-model')"),
            ({}, ("--sft", "learning_rate=0.5"), f"{runs}/sft_bigrec holds a finished run made with "
                                                 "learning_rate=0.0003 (asked: 0.5)")):
        assert run(*extra, **kw) == 1
        err = capsys.readouterr().err
        assert message in err, err
        assert not results.exists()  # no report, no archive copy
    assert run() == 0
    res = json.loads((results / "tiny.json").read_text())
    assert set(res["methods"]) == set(METHODS.split(",")) and res["protocol"]["row_seed"] == 0
    assert (results / "tiny_runs" / "eval_zero_shot" / "results.json").exists()


def test_each_grpo_stage_has_its_own_d3_weight_selection(report, tmp_path):
    """The selection (and its per-weight validation evaluations) decodes one GRPO stage's weights: shared by every
    --grpo-stage, reporting a sweep's stage after the default one was refused over the default's selection
    (review). The default stage keeps the name the committed reports use; the BIGRec D3 selection is shared."""
    root, data = report
    res = str(tmp_path / "results")  # not the default results dir, whose committed archives hold older selections
    default = _fixture_pipeline(root, data, d3_weights=[0.5, 1.0], results_dir=res)
    sweep = _fixture_pipeline(root, data, d3_weights=[0.5, 1.0], grpo_stage="grpo_b", results_dir=res)
    m = "latent-sft+grpo+d3"
    assert default.d3_selection_file(m, 0).name == "latent-sft+grpo+d3.json"
    assert sweep.d3_selection_file(m, 0).name == "latent-sft+grpo+d3.grpo_b.json"
    assert sweep.d3_selection_file("bigrec-sft+d3", 0) == default.d3_selection_file("bigrec-sft+d3", 0)
    # A selection made before (the plain name; the committed reports' archives) is read where the stage has none of
    # its own, and checked against its weights as before.
    old = _fixture_pipeline(root, data, d3_weights=[0.5, 1.0], grpo_stage="grpo_b", output_dir=str(tmp_path / "r"),
                            results_dir=res)
    assert old.d3_selection_file(m, 0).name == "latent-sft+grpo+d3.grpo_b.json"
    (tmp_path / "r" / "d3_selection").mkdir(parents=True)
    (tmp_path / "r" / "d3_selection" / "latent-sft+grpo+d3.json").write_text("{}")
    assert old.d3_selection_file(m, 0).name == "latent-sft+grpo+d3.json"
    # ... but not one that names the stage it was made for (the default stage's, since)
    (tmp_path / "r" / "d3_selection" / "latent-sft+grpo+d3.json").write_text('{"grpo_stage": "grpo_latent"}')
    assert old.d3_selection_file(m, 0).name == "latent-sft+grpo+d3.grpo_b.json"


def test_a_d3_selection_is_reused_only_on_the_weights_and_settings_it_was_made_with(report, tmp_path, capsys):
    """The D3 weight selection records what its validation evaluations decoded (the checkpoints' digests, the
    decoding settings): after the SFT stage or the SASRec guide was retrained (other weights in the same
    directory), or with other decoding settings, it is refused, naming the setting and the files to remove. One
    written before selections recorded that is checked against its per-weight evaluations, and selected again
    without them. The report checks it against the digests its test evaluation recorded."""
    import shutil

    root, data = report
    runs = tmp_path / "runs"
    for stage in ("sft_bigrec", "seqrec_sasrec"):
        shutil.copytree(root / "runs" / stage, runs / stage)
    p = _fixture_pipeline(tmp_path, data, d3_weights=[0.5, 2.0], d3_valid_rows=4, in_process=True,
                          results_dir=str(tmp_path / "results"))  # not the committed archive (the default)
    m = "bigrec-sft+d3"
    p._select_d3_weight(m, 0)
    f = p.d3_selection_file(m, 0)
    written = f.read_text()
    sft_weights = sorted((runs / "sft_bigrec").glob("*.safetensors"))[0]
    guide_weights = runs / "seqrec_sasrec" / "train" / "best.safetensors"

    def refused(key: str) -> None:
        with pytest.raises(ValueError, match=rf"{key}='[0-9a-f]{{64}}' \(asked: '[0-9a-f]{{64}}'\)") as e:
            p._select_d3_weight(m, 0)
        assert str(e.value).startswith(f"{f}: the D3 weight of {m} (seed 0) was selected on validation ")
        assert f"remove it and the evaluations {f.parent / (m + '_w*')} to select again" in str(e.value)

    saved = sft_weights.read_bytes()
    sft_weights.write_bytes(saved + b" ")  # the SFT stage retrained: other weights in the same directory
    refused("checkpoint_sha256")
    sft_weights.write_bytes(saved)

    sel = json.loads(written)
    valid = json.loads((f.parent / f"{m}_w0.5" / "results.json").read_text())["protocol"]
    assert sel["protocol"]["checkpoint_sha256"] == valid["checkpoint_sha256"] is not None
    assert sel["protocol"]["guidance"]["id_weights_sha256"] == valid["guidance"]["id_weights_sha256"] is not None
    assert "weight" not in sel["protocol"]["guidance"]
    old = {k: v for k, v in sel.items() if k != "protocol"}  # as selections were written before they recorded it
    for record in (sel, old):  # the same weights: reused as it is
        f.write_text(json.dumps(record))
        stamp = f.stat().st_mtime_ns
        p._select_d3_weight(m, 0)
        assert f.stat().st_mtime_ns == stamp
    for weights, key in ((sft_weights, "checkpoint_sha256"), (guide_weights, "guidance_sha256")):
        saved = weights.read_bytes()
        weights.write_bytes(saved + b" ")  # retrained
        try:
            for record in (sel, old):  # the old one: its per-weight evaluations' results.json tell
                f.write_text(json.dumps(record))
                refused(key)
        finally:
            weights.write_bytes(saved)
    f.write_text(json.dumps({**sel, "protocol": {**sel["protocol"], "num_beams": sel["protocol"]["num_beams"] + 1}}))
    with pytest.raises(ValueError, match=rf"num_beams={sel['protocol']['num_beams'] + 1} \(asked: "):
        p._select_d3_weight(m, 0)

    # The report's check: the digests the test evaluation recorded.
    f.write_text(json.dumps(sel))
    assert p._check_d3_selection(m, 0, {"checkpoint_sha256": valid["checkpoint_sha256"], "guidance_sha256": None})
    with pytest.raises(ValueError, match=r"checkpoint_sha256=.*\(asked: '0000"):
        p._check_d3_selection(m, 0, {"checkpoint_sha256": "0" * 64, "guidance_sha256": None})

    # An old selection whose per-weight evaluations are gone cannot be checked: selected again, recording it.
    for w in ("0.5", "2"):
        shutil.rmtree(f.parent / f"{m}_w{w}")
    f.write_text(json.dumps(old))
    assert not p._check_d3_selection(m, 0, {"checkpoint_sha256": "0" * 64, "guidance_sha256": None})
    capsys.readouterr()
    p._select_d3_weight(m, 0)
    assert "does not say which checkpoints it was selected on: selecting again" in capsys.readouterr().out
    again = json.loads(f.read_text())
    assert again["protocol"] == sel["protocol"] and again["chosen"] == sel["chosen"]


def test_a_missing_ndcg_is_no_bar_not_a_zero_bar(tmp_path):
    # A method without NDCG@10 (evaluated with fewer beams) was drawn as a bar at 0, read as a measured zero.
    import math

    from llmrec.bench_pipeline import ndcg_bars, plot_report

    methods = [("a", {"label": "A", "mean": {"ndcg@10": 0.02}, "std": {"ndcg@10": 0.001}}),
               ("b", {"label": "B", "mean": {"ndcg@1": 0.01}, "std": {"ndcg@1": 0.0}})]
    means, stds = ndcg_bars(methods, 10)
    assert means[0] == 0.02 and stds[0] == 0.001 and math.isnan(means[1]) and math.isnan(stds[1])
    result = {"methods": dict(methods), "protocol": {"dataset": "d", "test_rows": 5, "llm": "tiny"}}
    plot_report(result, tmp_path / "plot.png")  # NaN bars are left out, not an error
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one seed: no error bar (the JSON's std 0.0 drew a zero-length one, read as no spread between seeds) (review)
    one = [("c", {"label": "C", "seeds": [0], "mean": {"ndcg@10": 0.03}, "std": {"ndcg@10": 0.0}}),
           ("d", {"label": "D", "seeds": [0, 1], "mean": {"ndcg@10": 0.03}, "std": {"ndcg@10": 0.002}})]
    _, stds = ndcg_bars(one, 10)
    assert math.isnan(stds[0]) and stds[1] == 0.002


def test_the_report_leaves_out_the_train_rows_when_no_lm_was_trained():
    """A report of popularity, zero-shot and ID models only read "LLMs: smollm2-135m bfloat16, None train rows per
    seed"; checked on the committed SmolLM2 report's result with its train rows taken out."""
    import copy

    from llmrec.bench_pipeline import report_markdown

    committed = json.loads((Path(__file__).resolve().parent.parent / "benchmarks" / "results"
                            / "pipeline_games_smollm2.json").read_text())
    assert "train rows per seed" in report_markdown(committed)
    untrained = copy.deepcopy(committed)
    untrained["protocol"]["llm_train_rows"] = None
    text = report_markdown(untrained)
    assert "None" not in text.split("\n")[0] and "train rows per seed" not in text


def test_eval_overrides_reach_every_lm_evaluation_and_the_report(report, tmp_path, capsys):
    """``--eval`` sets the decoding of every LM evaluation (D3 rows keep length penalty 0), not the ID models' or
    popularity's; the report states it and reproduces it; a finished evaluation decoded otherwise is refused."""

    from llmrec.cli import main

    root, data = report
    args = _args(data, tmp_path, name="es")
    args[args.index("--methods") + 1] = "popularity,zero-shot,bigrec-sft,bigrec-sft+d3,sasrec"
    args += ["--eval", "early_stopping=false", "length_penalty=0.5"]
    assert main(args) == 0
    runs = tmp_path / "runs"

    def proto(d: str) -> dict:
        return json.loads((runs / d / "results.json").read_text())["protocol"]

    for d in ("eval_zero_shot", "eval_sft_bigrec"):
        assert proto(d)["early_stopping"] is False and proto(d)["length_penalty"] == 0.5
    assert proto("eval_sft_bigrec_d3")["early_stopping"] is False and proto("eval_sft_bigrec_d3")["length_penalty"] == 0
    assert "early_stopping" not in proto("eval_sasrec") and "early_stopping" not in proto("eval_popularity")
    res = json.loads((tmp_path / "results" / "es.json").read_text())
    assert res["protocol"]["llm_eval_overrides"] == {"early_stopping": False, "length_penalty": 0.5}
    assert res["protocol"]["llm_eval"]["early_stopping"] is False
    md = (tmp_path / "results" / "es.md").read_text()
    assert "10 beams with early_stopping false (generate's default, the papers' decoding) (length_penalty=0.5)" in md
    assert "--eval early_stopping=False length_penalty=0.5" in md
    # The fixture's evaluations decoded with early stopping: asking for another decoding on them is refused
    # (before anything runs: --no-report, nothing is written).
    other = _args(data, root, name="other")
    other[other.index("--methods") + 1] = "bigrec-sft"
    assert main(other + ["--no-report", "--eval", "early_stopping=false"]) != 0
    err = capsys.readouterr().err
    assert "eval_sft_bigrec holds results of a different protocol (early_stopping=True (here False))" in err


def test_eval_overrides_are_typed_and_checked(tmp_path):
    from llmrec.bench_pipeline import Pipeline, PipelineOptions
    from llmrec.config import ConfigError

    data = write_prepared(tmp_path / "data", n_items=12, n_users=4, seed=1)
    p = Pipeline(PipelineOptions(dataset=str(data), eval_overrides={"early_stopping": "false", "num_beams": "20"}))
    assert p.opts.eval_overrides == {"early_stopping": False, "num_beams": 20}
    assert p._eval_config("bigrec-sft", 0, "test", None, None, tmp_path / "e").early_stopping is False
    assert p._eval_config("sasrec", 0, "test", None, None, tmp_path / "e").num_beams == 10  # unread by an ID model
    with pytest.raises(ConfigError, match="--eval: unknown option.*'early_stoping'"):
        Pipeline(PipelineOptions(dataset=str(data), eval_overrides={"early_stoping": False}))
    with pytest.raises(ValueError, match="--eval guidance_weight: the pipeline sets it .use --d3-weight"):
        Pipeline(PipelineOptions(dataset=str(data), eval_overrides={"guidance_weight": 3}))
    with pytest.raises(ValueError, match="--eval max_rows: the pipeline sets it .use --test-rows"):
        Pipeline(PipelineOptions(dataset=str(data), eval_overrides={"max_rows": 3}))
    # the report compares NDCG@10 (review: a bare KeyError after all the training)
    with pytest.raises(ValueError, match=r"--eval num_beams=5: the report needs at least 10 beams"):
        Pipeline(PipelineOptions(dataset=str(data), eval_overrides={"num_beams": 5}))
    with pytest.raises(ValueError, match=r"--eval ks=\[1, 5\]: the report needs 10 among the cut-offs"):
        Pipeline(PipelineOptions(dataset=str(data), eval_overrides={"ks": [1, 5]}))
    # the Reproduce command quotes what the shell would split (review: noun=board games came back as two arguments)
    from llmrec.bench_pipeline import options_from_args
    from llmrec.cli import build_parser

    spaced = Pipeline(PipelineOptions(dataset=str(data), eval_overrides={"noun": "board games", "ks": [1, 10]}))
    import shlex

    argv = shlex.split(spaced.command())[3:]  # after "llmrec bench pipeline"
    again = options_from_args(build_parser().parse_args(["bench", "pipeline", *argv]))
    assert Pipeline(again).opts.eval_overrides == {"noun": "board games", "ks": [1, 10]}


def test_seed0_grpo_accelerator_config_is_not_copied_to_later_seeds(tmp_path):
    """Seed 0's recorded accelerator_config (never read by latent GRPO; accepted before it was refused) is not one of
    the trained settings later seeds copy, and a recorded default one (dict form) is accepted (review)."""
    from llmrec.bench_pipeline import Pipeline, PipelineOptions

    data = write_prepared(tmp_path / "data", n_items=12, n_users=4, seed=1)
    p = Pipeline(PipelineOptions(dataset=str(data), output_dir=str(tmp_path / "runs"), seeds=2))
    args = p._grpo_config(0).to_dict()
    assert isinstance(args["accelerator_config"], dict)  # as training_args.json records it
    args["accelerator_config"] = {**args["accelerator_config"], "split_batches": True}
    d = p.stage_dir("grpo_latent", 0)
    d.mkdir(parents=True)
    (d / "training_args.json").write_text(json.dumps(args, default=str))
    (d / "llmrec_config.json").write_text(json.dumps({"grpo": {}}))
    (d / "grpo_results.json").write_text(json.dumps({"prompts": 64}))
    assert "accelerator_config" not in p._grpo_settings(0, for_training=True)
    assert not p._grpo_config(1).accelerator_config.split_batches


def test_an_sft_on_another_split_is_capped_at_that_split_s_rows(report, tmp_path, capsys):
    """``--sft train_split=valid`` with ``--train-rows`` above the valid split's rows: the stage trains on every
    valid row, and its check capped --train-rows at the train split's rows instead, refusing the stage it had just
    trained (the report failed, and every rerun) (review)."""
    from llmrec.cli import main

    _, data = report
    n_valid = json.loads((data / "stats.json").read_text())["rows"]["valid"]
    args = _args(data, tmp_path) + ["--sft", "train_split=valid"]
    args[args.index("--methods") + 1] = "bigrec-sft"
    args[args.index("--train-rows") + 1] = str(n_valid + 6)
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "runs" / "sft_bigrec" / "train_results.json").read_text())["num_train_rows"] \
        == n_valid
    assert main(args) == 0
