"""``llmrec quickstart`` end to end on a tiny model: SFT -> GRPO -> evaluation table; a rerun resumes (skips)."""

from __future__ import annotations

import contextlib
import io

import pytest

from llmrec.cli import main
from tests.conftest import write_prepared


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished quickstart (its argv, output directory and printed text), shared by the tests below."""
    root = tmp_path_factory.mktemp("quickstart")
    out = root / "qs"
    argv = ["quickstart", "--dataset", str(write_prepared(root / "data")), "--model", "tiny-qwen2", "--dtype",
            "float32", "--rows", "4", "--beams", "3", "--batch-size", "4", "--train-rows", "8", "--grpo-rows", "4",
            "--output-dir", str(out)]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(argv) == 0
    return argv, out, text.getvalue()


def test_quickstart_tiny_end_to_end_and_rerun(finished):
    argv, out, text = finished
    for stage in ("== latent SFT", "== latent GRPO", "== evaluate: sft_latent", "== evaluate: grpo_latent"):
        assert stage in text, stage
    assert "== results (4 test rows of" in text  # the rows evaluated (the protocol's), not --rows as asked
    table = (out / "results.md").read_text()
    assert table.count("\n| ") >= 4  # popularity, zero-shot, latent SFT, latent SFT + GRPO
    for name in ("eval_popularity", "eval_zero_shot", "eval_sft_latent", "eval_grpo_latent"):
        assert (out / name / "results.json").exists(), name
    assert (out / "sft_latent" / "train_results.json").exists()
    assert (out / "grpo_latent" / "grpo_results.json").exists()
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    assert main(argv) == 0  # everything finished: the rerun only reads and reprints
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == stamp
    assert (out / "results.md").read_text() == table


def test_quickstart_refuses_a_finished_stage_made_with_other_settings(finished, capsys):
    """A rerun asking for other settings does not reuse (and reprint) the finished stages as if made with them:
    the training stage is refused, naming the setting, its flag and the directory; nothing is rewritten."""
    argv, out, _ = finished
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    table = (out / "results.md").read_text()

    def rerun(flag: str, value: str) -> str:
        args = list(argv)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
        capsys.readouterr()
        assert main(args) == 1
        return capsys.readouterr().err

    sft, grpo = out / "sft_latent", out / "grpo_latent"
    assert f"{sft} holds a finished latent SFT made with train_rows=8 (asked: 6 by --train-rows)" in \
        rerun("--train-rows", "6")
    assert f"{sft} holds a finished latent SFT made with seed=0 (asked: 1 by --seed)" in rerun("--seed", "1")
    err = rerun("--grpo-rows", "3")
    assert f"{grpo} holds a finished latent GRPO made with prompts=4 (asked: 3 by --grpo-rows)" in err
    assert "use another --output-dir" in err
    assert "different protocol" in rerun("--rows", "3")  # an evaluation: refused by the evaluator
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json")} == stamp
    assert (out / "results.md").read_text() == table


@pytest.mark.parametrize("flag,value", [("--grpo-rows", "0"), ("--rows", "0"), ("--beams", "0"),
                                        ("--train-rows", "-1")])
def test_quickstart_refuses_bad_counts_before_any_stage(tmp_path, capsys, flag, value):
    """--grpo-rows 0 failed (naming max_train_rows) only after the SFT stage had trained."""
    out = tmp_path / "qs"
    assert main(["quickstart", "--dataset", str(tmp_path / "no-data"), "--model", "tiny-qwen2", flag, value,
                 "--output-dir", str(out)]) == 1
    assert f"{flag} must be >= " in capsys.readouterr().err and not out.exists()


def test_the_default_sizes_validate_and_save_the_sft_before_its_last_step(tmp_path):
    """At the default --train-rows the SFT took 8 steps and validated and saved every 8: one candidate for model
    selection, and a kill before the end started the SFT over (the README promises a resume)."""
    import math

    from llmrec.cli import build_parser
    from llmrec.quickstart import grpo_config, sft_config

    args = build_parser().parse_args(["quickstart"])
    sft = sft_config(args, tmp_path / "data", tmp_path / "qs")
    steps = math.ceil(args.train_rows / (sft.per_device_train_batch_size * sft.gradient_accumulation_steps))
    assert sft.load_best_model_at_end and steps % sft.save_steps == 0 and steps // sft.save_steps >= 2
    assert sft.eval_steps == sft.save_steps  # every saved checkpoint is a validated candidate
    grpo = grpo_config(args, tmp_path / "data", tmp_path / "qs")
    assert grpo.sft_checkpoint == sft.output_dir
