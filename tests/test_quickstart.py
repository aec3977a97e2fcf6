"""``llmrec quickstart`` end to end on a tiny model: SFT -> GRPO -> evaluation table; a rerun resumes (skips)."""

from __future__ import annotations

from llmrec.cli import main


def test_quickstart_tiny_end_to_end_and_rerun(tmp_path, prepared_dir, capsys):
    out = tmp_path / "qs"
    argv = ["quickstart", "--dataset", str(prepared_dir), "--model", "tiny-qwen2", "--dtype", "float32",
            "--rows", "4", "--beams", "3", "--batch-size", "4", "--train-rows", "8", "--grpo-rows", "4",
            "--output-dir", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for stage in ("== latent SFT", "== latent GRPO", "== evaluate: sft_latent", "== evaluate: grpo_latent"):
        assert stage in text, stage
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
