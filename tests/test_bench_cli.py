"""``llmrec bench latent-sft`` end to end on a tiny model: the last line is the JSON the issue names."""

from __future__ import annotations

import json

from llmrec.cli import main


def test_bench_latent_sft_tiny(tmp_path, capsys):
    out = tmp_path / "latent_sft.json"
    rc = main(["bench", "latent-sft", "--model", "tiny-llama", "--steps", "1", "--warmup", "0", "--num-batches", "1",
               "--batch-size", "2", "--num-latent", "2", "--dtype", "float32", "--output", str(out)])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    for key in ("plain_step_s", "latent_step_s", "naive_latent_step_s", "latent_over_plain", "naive_over_plain",
                "max_abs_logit_diff_vs_naive", "max_rel_grad_diff_vs_naive"):
        assert key in last
    assert last["num_latent_tokens"] == 2
    # the efficient form is exact against the naive two-pass form (float32)
    assert last["max_abs_logit_diff_vs_naive"] < 1e-4 and last["max_rel_grad_diff_vs_naive"] < 1e-4


def test_bench_grpo_tiny(tmp_path, capsys):
    out = tmp_path / "grpo.json"
    rc = main(["bench", "grpo", "--model", "tiny-qwen2", "--group-size", "4", "--prompts", "2", "--steps", "1",
               "--warmup", "0", "--num-batches", "1", "--dtype", "float32", "--train-lora", "--output", str(out)])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    for key in ("ours_step_s", "naive_step_s", "ours_over_naive", "max_rel_grad_diff_vs_naive"):
        assert key in last
    assert last["max_rel_grad_diff_vs_naive"] < 1e-4
