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
    # every option it ran with (seed, warm-up, batches, LoRA settings were missing)
    assert last["args"]["num_batches"] == 1 and last["args"]["warmup"] == 0 and last["args"]["model"] == "tiny-llama"
    # the efficient form is exact against the naive two-pass form (float32)
    assert last["max_abs_logit_diff_vs_naive"] < 1e-4 and last["max_rel_grad_diff_vs_naive"] < 1e-4


def test_bench_grpo_tiny(tmp_path, capsys):
    out = tmp_path / "grpo.json"
    rc = main(["bench", "grpo", "--model", "tiny-qwen2", "--group-size", "4", "--prompts", "2", "--steps", "1",
               "--warmup", "0", "--num-batches", "1", "--dtype", "float32", "--train-lora", "--output", str(out)])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    for key in ("ours_step_s", "naive_step_s", "ours_over_naive", "ours_over_naive_paired", "max_rel_grad_diff_vs_naive"):
        assert key in last
    assert last["max_rel_grad_diff_vs_naive"] < 1e-4
    # each path the timed loop and the trainer take, and the batched naive form, against the per-member form
    by_path = last["max_rel_grad_diff_vs_naive_by_path"]
    assert set(by_path) == {"ours_timed_path", "ours_plain_forward", "naive_batched_timed_path"}
    assert max(by_path.values()) < 1e-4
    assert last["max_rel_grad_diff_vs_naive"] == max(by_path["ours_timed_path"], by_path["ours_plain_forward"])
    # the JSON records how the batches were drawn
    assert last["seed"] == 0 and last["noise_scale"] == 1.5 and last["warmup_steps"] == 0
    assert last["prompt_len_range"] == [150, 250] and last["completion_len_range"] == [15, 25]


def test_bench_decoding_tiny(tmp_path, capsys, prepared_dir):
    """Ours, ours with one cache row per beam, ours on length-sorted batches and generate + prefix_allowed_tokens_fn
    give the same rankings on the same rows; the JSON records the arguments and how it was timed."""
    out = tmp_path / "decoding.json"
    rc = main(["bench", "decoding", "--model", "tiny-qwen2", "--dataset", str(prepared_dir), "--rows", "6",
               "--beams", "3", "--batch-size", "2", "--dtype", "float32", "--noun", "items", "--output", str(out)])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    assert last["rows"] == 6 and last["identical_rankings"] == 1.0 and last["identical_rankings_per_beam"] == 1.0
    # Length-sorted batches rank each row as row-order batches do (mapped back to the rows) and pad less.
    assert last["identical_rankings_length_sorted"] == 1.0 and last["length_sorted_over_ours"] > 0
    assert last["mean_prompt_tokens"] <= last["mean_padded_prompt_tokens_length_sorted"] \
        <= last["mean_padded_prompt_tokens"]
    assert last["ours_shares_prompt_cache"] is True
    assert last["dataset"] == str(prepared_dir) and last["seed"] == 0 and last["length_penalty"] == 1.0
    for key in ("ours_rows_per_s", "reference_rows_per_s", "floor_rows_per_s", "per_beam_rows_per_s",
                "speedup_vs_reference", "ours_over_floor", "ours_over_per_beam", "mean_steps_per_batch"):
        assert last[key] > 0


def test_a_bad_output_is_refused_before_the_benchmark_runs(tmp_path, capsys):
    """It ran the whole benchmark, then failed on the write with a traceback and printed no result."""
    (tmp_path / "afile").write_text("")
    for argv in (["grpo", "--model", "tiny-qwen2"], ["seqrec", "--dataset", str(tmp_path / "none")]):
        assert main(["bench", *argv, "--output", str(tmp_path / "afile" / "x.json")]) != 0
        err = capsys.readouterr().err
        assert "--output" in err and "afile" in err


def test_bench_seqrec_help_says_seeds_is_a_count(capsys):
    """`--seeds 42` (meant as "seed 42", as the docs name seeds 42, 43, 44) queued 42 seeds per model: the help
    said nothing about the option."""
    import pytest

    with pytest.raises(SystemExit):
        main(["bench", "seqrec", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "number of seeds per model (a count, not a seed): run s uses seed 42 + s" in text


def test_bench_counts_below_their_bound_are_usage_errors(capsys):
    """`bench grpo --num-batches 0` ended in a ZeroDivisionError, `--steps 0` in "no median for empty data", and
    `bench latent-sft --exact-batches 0` reported exactness numbers it never measured: argparse refuses them now."""
    import pytest

    for argv in (["grpo", "--num-batches", "0"], ["grpo", "--steps", "0"], ["grpo", "--prompts", "0"],
                 ["grpo", "--group-size", "1"], ["grpo", "--warmup", "-1"],
                 ["latent-sft", "--exact-batches", "0"], ["latent-sft", "--num-batches", "0"],
                 ["latent-sft", "--steps", "0"], ["latent-sft", "--batch-size", "0"], ["latent-sft", "--lora-r", "0"],
                 ["latent-sft", "--num-latent", "0"], ["latent-sft", "--threads", "-1"],
                 ["decoding", "--rows", "0"], ["decoding", "--rows", "-3"], ["decoding", "--beams", "0"],
                 ["decoding", "--batch-size", "0"]):  # decoding --rows 0 timed every test row
        with pytest.raises(SystemExit) as info:
            main(["bench", *argv, "--model", "tiny-qwen2"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and f"argument {argv[1]}: must be >= " in err, (argv, err)


def test_bench_length_ranges_are_checked_at_parse_time(capsys):
    """`--prompt-len 250 150` (or non-positive lengths) failed only after the model had loaded, naming no option."""
    import pytest

    from llmrec.bench_latent_sft import add_arguments

    for bench in ("grpo", "latent-sft"):
        for flag in ("--prompt-len", "--completion-len"):
            for low, high in (("250", "150"), ("0", "3"), ("-5", "-1")):
                with pytest.raises(SystemExit) as info:
                    main(["bench", bench, flag, low, high, "--model", "tiny-qwen2"])
                err = capsys.readouterr().err
                assert info.value.code == 2 and f"{flag}: expected MIN MAX with 1 <= MIN <= MAX, got {low} {high}" \
                    in err, (bench, flag, err)
    import argparse

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    assert ap.parse_args(["--prompt-len", "7", "7"]).prompt_len == (7, 7)
    assert ap.parse_args([]).completion_len == (15, 25)


def test_bench_latent_sft_records_the_batches_its_exactness_compares(tmp_path, capsys):
    """The JSON says over how many batches the max diffs are taken: --exact-batches capped by --num-batches."""
    rc = main(["bench", "latent-sft", "--model", "tiny-qwen2", "--steps", "1", "--warmup", "0", "--num-batches", "1",
               "--batch-size", "1", "--dtype", "float32", "--exact-batches", "3", "--lora-targets", "q_proj,v_proj"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["exactness_batches_compared"] == 1 and last["args"]["exact_batches"] == 3


def test_bench_exactness_maxima_do_not_drop_a_nan():
    """Python's max keeps whichever of a number and a NaN came first: a NaN gradient difference in any tensor but
    the first was reported as 0 (exact)."""
    import math

    import torch

    from llmrec.bench_grpo import _max_rel_diff

    ok, nan = torch.ones(3), torch.full((3,), float("nan"))
    assert math.isnan(_max_rel_diff({"a": ok, "b": nan}, {"a": ok, "b": ok}))
    assert math.isnan(_max_rel_diff({"a": nan, "b": ok}, {"a": ok, "b": ok}))


def _tiny_latent_sft_batches():
    """``bench latent-sft``'s arguments for one one-row batch on the tiny Qwen2, and that batch."""
    import argparse

    import llmrec.bench_latent_sft as bls

    ap = argparse.ArgumentParser()
    bls.add_arguments(ap)
    args = ap.parse_args(["--model", "tiny-qwen2", "--batch-size", "1", "--num-batches", "1",
                          "--lora-targets", "q_proj,v_proj"])
    return args, bls.make_batches(bls.build(args, "float32", random_lora_b=False)[2], args)


def test_bench_latent_sft_exactness_reports_nan_outputs_as_nan(monkeypatch):
    """A model whose outputs are NaN gave NaN in both forms; exactness() reported (0.0, 0.0), i.e. exact."""
    import math

    import torch

    import llmrec.bench_latent_sft as bls

    real = bls.build

    def nan_head(*a, **k):
        latent, plain, tok = real(*a, **k)
        with torch.no_grad():
            latent.latent_head.v_proj.bias.fill_(float("nan"))
        return latent, plain, tok

    args, batches = _tiny_latent_sft_batches()
    monkeypatch.setattr(bls, "build", nan_head)
    logit_diff, grad_diff = bls.exactness(args, batches)
    assert math.isnan(logit_diff) and math.isnan(grad_diff)


def test_bench_decoding_floor_warmup_decodes_the_steps_of_its_timed_run(tmp_path, monkeypatch, prepared_dir):
    """The floor's warm-up took its step count from a forward counter that the reference search had also run up:
    it decoded about twice the steps that the timed floor then decoded on the same batch."""
    import llmrec.bench as bench

    steps: list[int] = []
    real = bench.floor_decode

    def spy(model, ids, mask, num_beams, n):
        steps.append(n)
        return real(model, ids, mask, num_beams, n)

    monkeypatch.setattr(bench, "floor_decode", spy)
    assert main(["bench", "decoding", "--model", "tiny-qwen2", "--dataset", str(prepared_dir), "--rows", "4",
                 "--beams", "3", "--batch-size", "2", "--dtype", "float32", "--noun", "items"]) == 0
    # calls: the warm-up on batch 0, then the timed batch 0, batch 1
    assert len(steps) == 3 and steps[0] == steps[1] > 0


def test_bench_latent_sft_exactness_refuses_forms_that_train_different_tensors(monkeypatch):
    """Gradients were compared over the naive form's tensors only: one that only the efficient form trained was
    left out of the reported maximum."""
    import pytest
    import torch

    import llmrec.bench_latent_sft as bls

    real = bls.build

    def extra_grad(*a, **k):
        latent, plain, tok = real(*a, **k)
        loss = latent.loss
        extra = torch.nn.Parameter(torch.ones(2))
        latent.register_parameter("only_efficient", extra)

        def spied(**kw):
            out = loss(**kw)
            if "labels" not in kw:  # the efficient form's call (the naive one passes labels)
                out.loss = out.loss + extra.sum()
            return out

        latent.loss = spied
        return latent, plain, tok

    args, batches = _tiny_latent_sft_batches()
    monkeypatch.setattr(bls, "build", extra_grad)
    with pytest.raises(RuntimeError, match=r"only efficient \['only_efficient'\]"):
        bls.exactness(args, batches)
