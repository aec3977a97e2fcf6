"""The evaluator: popularity and beam methods, resume, bad input, and 1 vs 2 processes."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from llmrec.data.canonical import write_jsonl
from llmrec.evaluation.evaluator import EvalConfig, evaluate, popularity_ranking, select_rows
from llmrec.models.checkpoint import CheckpointError


def tiny_config(data: Path, out: Path, **kw) -> EvalConfig:
    base = dict(dataset=str(data), split="test", method="beam", model_name_or_path="tiny-qwen2", dtype="float32",
                prompt="d3", noun="video games", num_beams=4, batch_size=3, ks=[1, 3, 5], output_dir=str(out))
    base.update(kw)
    return EvalConfig(**base)


def test_popularity_ranking_orders_by_count_then_id():
    assert popularity_ranking([5, 3, 3, 9, 5, 1], 3) == [3, 5, 1]


def test_select_rows_is_seeded_and_sorted():
    a = select_rows(100, 10, seed=1)
    assert a == select_rows(100, 10, seed=1) and a == sorted(a) and len(set(a)) == 10
    assert select_rows(5, 0, 0) == list(range(5))


def test_popularity_evaluation_writes_results(prepared_dir, tmp_path):
    res = evaluate(tiny_config(prepared_dir, tmp_path / "pop", method="popularity"))
    out = tmp_path / "pop"
    assert (out / "results.json").exists() and (out / "results.md").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"] == res["metrics"]
    assert saved["protocol"]["split"] == "test" and saved["protocol"]["rows"] == 12
    rankings = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rankings] == list(range(12))
    # metrics recomputed from the saved rankings agree
    hits = sum(r["item_rank"] is not None and r["item_rank"] < 5 for r in rankings) / len(rankings)
    assert res["metrics"]["item"]["hr@5"] == pytest.approx(hits)


def test_beam_evaluation_and_resume_give_the_same_rankings(prepared_dir, tmp_path):
    full = evaluate(tiny_config(prepared_dir, tmp_path / "full"))
    assert "hr@5" not in full["metrics"]["item"]  # K > beams is not reported
    ranked = [json.loads(x) for x in (tmp_path / "full" / "rankings.jsonl").read_text().splitlines()]
    assert all(1 <= len(r["title_ranking"]) <= 4 for r in ranked)
    # Simulate an interruption after the first batch: keep only its rows in a part file.
    part_dir = tmp_path / "resumed" / "rankings"
    part_dir.mkdir(parents=True)
    write_jsonl(part_dir / "part-0.jsonl", ranked[:3])
    resumed = evaluate(tiny_config(prepared_dir, tmp_path / "resumed"))
    assert resumed["metrics"] == full["metrics"]
    again = [json.loads(x) for x in (tmp_path / "resumed" / "rankings.jsonl").read_text().splitlines()]
    assert [r["item_ranking"] for r in again] == [r["item_ranking"] for r in ranked]
    # Killed in the middle of writing a record: the partial last line is dropped, the file truncated, and the
    # resumed run ends with the same rankings (and a part file of complete lines).
    cut_dir = tmp_path / "cut" / "rankings"
    cut_dir.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in ranked[:3]) + json.dumps(ranked[3])[:25]
    (cut_dir / "part-0.jsonl").write_text(text)
    cut = evaluate(tiny_config(prepared_dir, tmp_path / "cut"))
    assert cut["metrics"] == full["metrics"]
    again = [json.loads(x) for x in (tmp_path / "cut" / "rankings.jsonl").read_text().splitlines()]
    assert [r["item_ranking"] for r in again] == [r["item_ranking"] for r in ranked]
    assert all(json.loads(x) for x in (cut_dir / "part-0.jsonl").read_text().splitlines())
    # A malformed complete line is an error naming the file and line, not a silent skip.
    bad_dir = tmp_path / "bad" / "rankings"
    bad_dir.mkdir(parents=True)
    (bad_dir / "part-0.jsonl").write_text(json.dumps(ranked[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"part-0.jsonl.*2.*not valid JSON"):
        evaluate(tiny_config(prepared_dir, tmp_path / "bad"))
    # Records of other rows (the dataset prepared again in place: same directory, other targets) are refused,
    # not merged into the new evaluation.
    stale_dir = tmp_path / "stale" / "rankings"
    stale_dir.mkdir(parents=True)
    write_jsonl(stale_dir / "part-0.jsonl", [dict(ranked[0], target_item_id=ranked[0]["target_item_id"] % 30 + 1)])
    with pytest.raises(ValueError, match=rf"row {ranked[0]['row']} is user .*was the dataset prepared again"):
        evaluate(tiny_config(prepared_dir, tmp_path / "stale"))
    # A finished evaluation is not redone; a different protocol in the same dir is refused.
    assert evaluate(tiny_config(prepared_dir, tmp_path / "full"))["metrics"] == full["metrics"]
    with pytest.raises(ValueError, match=r"different protocol \(num_beams=4 \(here 3\)\)"):  # names what differs
        evaluate(tiny_config(prepared_dir, tmp_path / "full", num_beams=3))


def test_a_model_that_cannot_be_loaded_is_a_message_not_a_traceback(prepared_dir, tmp_path, monkeypatch, capsys):
    import llmrec.models.checkpoint as checkpoint
    from llmrec.cli import main
    from llmrec.models.backbone import BackboneLoadError

    def fail(*args, **kwargs):
        raise BackboneLoadError("could not load 'nope-model': no such model (a hint)")

    monkeypatch.setattr(checkpoint, "load_for_inference", fail)
    assert main(["evaluate", "--dataset", str(prepared_dir), "--model_name_or_path", "nope-model", "--max_rows", "1",
                 "--output_dir", str(tmp_path / "ev")]) == 1
    assert "llmrec: error: could not load 'nope-model'" in capsys.readouterr().err


def test_popularity_with_a_checkpoint_is_refused(prepared_dir, tmp_path):
    # it was accepted and the checkpoint silently not used
    with pytest.raises(ValueError, match="method=popularity .* reads no checkpoint"):
        tiny_config(prepared_dir, tmp_path / "p", method="popularity", checkpoint=str(tmp_path / "ckpt"))


def test_target_not_in_catalogue_is_a_clear_error(prepared_dir, tmp_path):
    rows = [json.loads(x) for x in (prepared_dir / "test.jsonl").read_text().splitlines()]
    rows[2]["target_item_id"] = 999
    write_jsonl(prepared_dir / "test.jsonl", rows)
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=r"test.jsonl, row 3, field .target_item_id.: item 999 is not in the catalogue"):
        evaluate(tiny_config(prepared_dir, out))
    assert not (out / "results.json").exists()


def test_checkpoint_missing_files_is_a_clear_error(prepared_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text("{}")
    out = tmp_path / "ev"
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        evaluate(tiny_config(prepared_dir, out, checkpoint=str(ckpt)))
    assert not out.exists()


def test_an_unfinished_training_run_is_not_evaluated(prepared_dir, tmp_path):
    # A run killed during its final save: checkpoint-N folders and a complete-looking adapter at the top level
    # (head-only GRPO copies its SFT start there first), but no train_results.json / grpo_results.json. It was
    # evaluated, reporting the starting model's numbers under the run's name.
    run = tmp_path / "grpo"
    (run / "checkpoint-8").mkdir(parents=True)
    (run / "checkpoint-8" / "grpo_state.json").write_text("{}")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / name).write_text("{}")
    out = tmp_path / "ev"
    with pytest.raises(CheckpointError, match="has not finished"):
        evaluate(tiny_config(prepared_dir, out, checkpoint=str(run)))
    assert not out.exists()


def test_empty_catalogue_is_a_clear_error(prepared_dir, tmp_path):
    (prepared_dir / "catalog.jsonl").write_text("")
    with pytest.raises(ValueError, match="catalogue is empty"):
        evaluate(tiny_config(prepared_dir, tmp_path / "ev"))


@pytest.mark.parametrize("batch_order", ["rows", "length"])
def test_two_processes_give_the_same_results_as_one(prepared_dir, tmp_path, batch_order):
    from llmrec.cli import main
    from tests.launching import accelerate_launch

    common = ["--dataset", str(prepared_dir), "--model_name_or_path", "tiny-qwen2", "--dtype", "float32",
              "--num_beams", "4", "--batch_size", "2", "--ks", "1", "3", "--split", "test", "--batch_order", batch_order]
    assert main(["evaluate", *common, "--output_dir", str(tmp_path / "one")]) == 0  # 1 process: this one
    accelerate_launch(2, ["-m", "llmrec.cli", "evaluate", *common, "--output_dir", tmp_path / "two"])
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert one["metrics"] == two["metrics"]
    r1 = (tmp_path / "one" / "rankings.jsonl").read_text()
    r2 = (tmp_path / "two" / "rankings.jsonl").read_text()
    assert r1 == r2


def test_evaluator_loads_a_latent_sft_checkpoint(prepared_dir, tmp_path, caplog):
    """`llmrec evaluate --checkpoint` on a latent SFT checkpoint decodes with the latent in place and
    ranks exactly as the trained LatentReasoningLM does when driven by hand."""
    import torch

    from llmrec.data.canonical import load_prepared
    from llmrec.decoding.beam_search import PromptState, constrained_beam_search_from_state
    from llmrec.decoding.search import build_catalog_trie, encode_prompts, render_prompts
    from llmrec.prompts import PromptTemplate
    from llmrec.training.sft import LatentSFTConfig, load_sft_checkpoint, run_sft

    run = tmp_path / "sft"
    run_sft(LatentSFTConfig(
        output_dir=str(run), model_name_or_path="tiny-qwen2", model_dtype="float32", dataset=str(prepared_dir),
        max_train_rows=4, eval_split=None, max_length=384, history_length=2, learning_rate=1e-2, warmup_steps=0,
        per_device_train_batch_size=2, max_steps=2, logging_steps=1, save_strategy="no", lora_dropout=0.0,
        lora_r=4, lora_alpha=8, seed=0, disable_tqdm=True, num_latent_tokens=1))
    with caplog.at_level(logging.WARNING, logger="llmrec.evaluation.evaluator"):
        res = evaluate(tiny_config(prepared_dir, tmp_path / "ev", checkpoint=str(run), history_length=2,
                                   max_prompt_length=512))
    assert res["protocol"]["checkpoint"] == str(run)
    # trained with max_length 384: the evaluation's 512-token prompts (asked for) are said to differ
    # (history_length agrees)
    warned = [r.getMessage() for r in caplog.records if "was trained with" in r.getMessage()]
    assert len(warned) == 1 and "max_prompt_length=384 (here 512)" in warned[0] and "history_length" not in warned[0]
    saved = [json.loads(x) for x in (tmp_path / "ev" / "rankings.jsonl").read_text().splitlines()]
    # Left unset, the prompt settings are the checkpoint's: its history length and token budget, no warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmrec.evaluation.evaluator"):
        own = tiny_config(prepared_dir, tmp_path / "ev_own", checkpoint=str(run), prompt=None, noun=None)
        assert (own.history_length, own.max_prompt_length, own.prompt, own.tokenization) == (2, 384, "d3", "separate")
        res_own = evaluate(own)
    assert not [r for r in caplog.records if "was trained with" in r.getMessage()]
    assert res_own["protocol"]["history_length"] == 2
    # llmrec SFT trains on plain prompts: a chat-template evaluation of it is another prompt (it was not warned)
    from llmrec.evaluation.evaluator import prompt_setting_differences

    assert prompt_setting_differences(own) == {}
    assert prompt_setting_differences(dataclasses.replace(own, use_chat_template=True)) == {
        "use_chat_template": (False, True)}
    # The base model too: left unset it is the one the checkpoint records; another one is refused before anything
    # is written (it failed at model load, after protocol.json and rankings/ were made)
    assert tiny_config(prepared_dir, tmp_path / "unused", checkpoint=str(run),
                       model_name_or_path=None).model_name_or_path == "tiny-qwen2"
    with pytest.raises(ValueError, match="trained on base model 'tiny-qwen2'"):
        evaluate(tiny_config(prepared_dir, tmp_path / "other_base", checkpoint=str(run), model_name_or_path="tiny-llama"))
    assert not (tmp_path / "other_base").exists()
    # Evaluated on another dataset than it was trained on: said (the Games recipes train on the sample and evaluate
    # on data/games); its own dataset under another spelling is not
    import shutil

    shutil.copytree(prepared_dir, tmp_path / "other_data")
    for data, warned in ((tmp_path / "other_data", True), (Path(str(prepared_dir) + "/"), False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="llmrec.evaluation.evaluator"):
            evaluate(tiny_config(data, tmp_path / f"ev_{warned}", checkpoint=str(run), history_length=2,
                                 max_prompt_length=384, max_rows=1))
        assert ("is evaluated on" in caplog.text) == warned, caplog.text
    # ...and without a checkpoint, EvalConfig's documented defaults
    base = tiny_config(prepared_dir, tmp_path / "unused", prompt=None, noun=None, model_name_or_path=None)
    assert (base.prompt, base.noun, base.history_length, base.max_prompt_length, base.tokenization,
            base.model_name_or_path) == ("d3", "video games", 10, 512, "separate", "smollm2-135m")

    model, tok, _ = load_sft_checkpoint(run, "tiny-qwen2", dtype="float32")
    cfg = tiny_config(prepared_dir, tmp_path / "unused", history_length=2)
    data = load_prepared(prepared_dir, splits=["test"], max_history=2)
    template = PromptTemplate.load("d3")
    trie = build_catalog_trie(data.catalog, tok, template)
    rows = [data.splits["test"][i] for i in range(3)]
    ids, mask = encode_prompts(tok, render_prompts(template, tok, rows, cfg), "cpu")
    with torch.no_grad():
        cache, logits, m, pos = model.prefill_with_latents(ids, mask)
    outs = constrained_beam_search_from_state(model.causal_lm, trie, PromptState(logits, cache, m, pos), num_beams=4)
    assert [o.item_ranking for o in outs] == [r["item_ranking"] for r in saved[:3]]


def test_prompt_fit_longest_answer_is_recorded_and_the_default_fingerprint_is_unchanged(prepared_dir, tmp_path):
    default = evaluate(tiny_config(prepared_dir, tmp_path / "own", max_rows=4))
    assert "prompt_fit" not in default["protocol"]  # finished evaluations of the default stay reusable
    longest = evaluate(tiny_config(prepared_dir, tmp_path / "longest", max_rows=4, prompt_fit="longest_answer"))
    assert longest["protocol"]["prompt_fit"] == "longest_answer"
    assert longest["fingerprint"] != default["fingerprint"]
    with pytest.raises(ValueError, match="prompt_fit must be one of"):
        tiny_config(prepared_dir, tmp_path / "x", prompt_fit="answer")


def test_early_stopping_false_reaches_the_search_and_is_recorded(prepared_dir, tmp_path, early_stopping_seen):
    """early_stopping: false (generate's default, the papers' code) is passed to the beam search and recorded in
    the protocol; the default (true) leaves the fingerprints of finished evaluations as they were."""
    seen = early_stopping_seen
    default = evaluate(tiny_config(prepared_dir, tmp_path / "stop", max_rows=4))
    assert "early_stopping" not in default["protocol"] and seen and all(seen)
    seen.clear()
    on = evaluate(tiny_config(prepared_dir, tmp_path / "go_on", max_rows=4, early_stopping=False))
    assert on["protocol"]["early_stopping"] is False and seen and not any(seen)
    assert on["fingerprint"] != default["fingerprint"]



@pytest.mark.parametrize("bad,match", [(dict(ks=[0, 3]), "ks must be"), (dict(ks=[]), "ks must be"), (dict(ks=[5, 10]), "num_beams"),
                                       (dict(history_length=-1), "history_length"), (dict(max_rows=-2), "max_rows")])
def test_bad_settings_fail_before_any_row_is_ranked(prepared_dir, tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(prepared_dir, tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def test_rows_are_split_by_process_before_finished_rows_are_removed(prepared_dir, tmp_path):
    """Two processes read the part files at their own times: process 0 may append before process 1 reads. Each
    takes its share of the rows first, so process 1's share does not depend on what process 0 has written."""
    from llmrec.data.canonical import load_prepared
    from llmrec.evaluation.evaluator import Evaluator, select_rows

    class FakeState:  # one of 2 processes, without a process group (the interleaving is played out here)
        def __init__(self, index: int):
            self.process_index, self.num_processes, self.is_main_process, self.device = index, 2, index == 0, "cpu"

        def wait_for_everyone(self) -> None:
            pass

    cfg = tiny_config(prepared_dir, tmp_path / "ev", method="popularity")
    first, second = Evaluator(cfg), Evaluator(cfg)
    first.state, second.state = FakeState(0), FakeState(1)
    data = load_prepared(cfg.dataset, splits=["test", "train"], max_history=cfg.history_length)
    split = data.splits["test"]
    rows = select_rows(len(split), 0, 0)
    (tmp_path / "ev" / "rankings").mkdir(parents=True)
    first._run_popularity(data, split, rows, first._done_rows())  # process 0 appends its share ...
    second._run_popularity(data, split, rows, second._done_rows())  # ... before process 1 reads the part files
    assert sorted(first._done_rows()) == sorted(rows)


def test_dataset_defaults_to_the_one_the_checkpoint_was_trained_on(tmp_path, caplog):
    """Without --dataset, a checkpoint is evaluated on the dataset it records (not silently on the embedded
    sample); --dataset overrides; a checkpoint recording none falls back to the sample with a warning."""
    import logging

    from llmrec.evaluation.evaluator import EvalConfig

    llm = tmp_path / "sft"
    llm.mkdir()
    (llm / "llmrec_config.json").write_text(json.dumps({"dataset": "data/games", "num_latent_tokens": 1}))
    assert EvalConfig(checkpoint=str(llm)).dataset == "data/games"
    assert EvalConfig(checkpoint=str(llm), dataset="other").dataset == "other"
    seqrec = tmp_path / "sasrec"
    seqrec.mkdir()
    (seqrec / "results.json").write_text(json.dumps({"protocol": {"dataset_dir": "/data/ml100k"}, "config": {}}))
    assert EvalConfig(method="seqrec", checkpoint=str(seqrec)).dataset == "/data/ml100k"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "llmrec_config.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="llmrec.evaluation.evaluator"):
        assert EvalConfig(checkpoint=str(bare)).dataset == "games-sample"
    assert "records no dataset" in caplog.text
    assert EvalConfig().dataset == "games-sample"  # zero-shot without a checkpoint


def test_titles_with_unicode_line_separators_are_evaluated_resumed_and_compared(prepared_dir, tmp_path):
    """U+2028, U+2029 and U+0085 stay raw inside the JSON strings of the rankings (ensure_ascii=False), and
    str.splitlines() breaks lines at them: every reader of the rankings must split at "\\n" only."""
    from llmrec.data.catalog import ItemCatalog
    from llmrec.evaluation.compare import compare_runs, load_rankings

    seps = ["\u2028", "\u2029", "\x85"]
    n = 30
    ItemCatalog([str(i) for i in range(1, n + 1)],
                [f"Game{seps[i % 3]}{i}" for i in range(1, n + 1)]).save(prepared_dir / "catalog.jsonl")
    full = evaluate(tiny_config(prepared_dir, tmp_path / "full", method="popularity"))
    ranked = [json.loads(x) for x in (tmp_path / "full" / "rankings.jsonl").read_text(encoding="utf-8").split("\n")
              if x]
    assert len(ranked) == 12 and any(s in t for s in seps for t in ranked[0]["title_ranking"])
    # a rerun on the finished directory reads its rankings.jsonl back (to check its rows)
    assert evaluate(tiny_config(prepared_dir, tmp_path / "full", method="popularity")) == full
    # resumed from a part file of finished rows (written as the evaluator writes them), with CRLF line ends too
    part_dir = tmp_path / "resumed" / "rankings"
    part_dir.mkdir(parents=True)
    write_jsonl(part_dir / "part-0.jsonl", ranked[:4])
    with open(part_dir / "part-0.jsonl", "ab") as f:
        f.write(json.dumps(ranked[4], ensure_ascii=False).encode() + b"\r\n")
    resumed = evaluate(tiny_config(prepared_dir, tmp_path / "resumed", method="popularity"))
    assert resumed["metrics"] == full["metrics"]
    assert (tmp_path / "resumed" / "rankings.jsonl").read_bytes() == (tmp_path / "full" / "rankings.jsonl").read_bytes()
    assert sorted(load_rankings(tmp_path / "full")) == list(range(12))
    cmp = compare_runs([tmp_path / "full", tmp_path / "resumed"], ["hr@5"], n_resamples=50)
    assert cmp["rows"] == 12


def test_chat_template_separate_and_joint_tokenization_rank_the_same(prepared_dir, tmp_path, monkeypatch):
    """With a chat template the text before the answer is the answer prefix + the template's assistant header, not
    the whole wrapped prompt: `separate` (the default) worked never, and must rank as `joint` does."""
    import llmrec.models.checkpoint as ck

    load = ck.load_for_inference

    def with_chat_template(*args, **kwargs):
        model, tok = load(*args, **kwargs)
        tok.chat_template = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")
        return model, tok

    monkeypatch.setattr(ck, "load_for_inference", with_chat_template)
    runs = {}
    for tz in ("separate", "joint"):
        res = evaluate(tiny_config(prepared_dir, tmp_path / tz, use_chat_template=True, tokenization=tz, max_rows=6))
        assert res["protocol"]["use_chat_template"] is True
        runs[tz] = [json.loads(x) for x in (tmp_path / tz / "rankings.jsonl").read_text().splitlines()]
    assert len(runs["separate"]) == 6
    assert [(r["item_ranking"], r["scores"]) for r in runs["separate"]] == \
        [(r["item_ranking"], r["scores"]) for r in runs["joint"]]
    # and not the rankings without the chat template: the wrapped prompt did reach the model
    plain = evaluate(tiny_config(prepared_dir, tmp_path / "plain", max_rows=6))
    plain_ranked = [json.loads(x) for x in (tmp_path / "plain" / "rankings.jsonl").read_text().splitlines()]
    assert plain["fingerprint"] != res["fingerprint"]
    assert [r["scores"] for r in plain_ranked] != [r["scores"] for r in runs["separate"]]


def test_numeric_settings_are_floats_whatever_number_type_is_given(prepared_dir, tmp_path):
    """`length_penalty=1` from Python is the protocol of `length_penalty: 1.0` (one fingerprint), not "1"."""
    from llmrec.data.canonical import load_prepared
    from llmrec.evaluation.evaluator import Evaluator, protocol_fingerprint

    as_int = tiny_config(prepared_dir, tmp_path / "x", length_penalty=1, guidance_weight=2)
    as_float = tiny_config(prepared_dir, tmp_path / "x", length_penalty=1.0, guidance_weight=2.0)
    assert isinstance(as_int.length_penalty, float) and isinstance(as_int.guidance_weight, float)
    data = load_prepared(str(prepared_dir), splits=["test"])
    protocols = [Evaluator(c)._protocol(data, [0, 1]) for c in (as_int, as_float)]
    assert protocol_fingerprint(protocols[0]) == protocol_fingerprint(protocols[1])
    with pytest.raises(ValueError, match="length_penalty must be a number"):
        tiny_config(prepared_dir, tmp_path / "x", length_penalty=True)
    with pytest.raises(ValueError, match="guidance_weight must be a number"):
        tiny_config(prepared_dir, tmp_path / "x", guidance_weight="1")
    assert not (tmp_path / "x").exists()


def test_the_dataset_given_as_a_relative_or_absolute_path_is_one_protocol(prepared_dir, tmp_path, monkeypatch):
    """The protocol names the dataset as it was given: `data` and its absolute path gave two fingerprints, so a
    finished or partial evaluation of one dataset was "a different protocol" under the other spelling. Now compared
    by resolved path, the recorded spelling and fingerprint kept; another directory is still another protocol."""
    import shutil

    monkeypatch.chdir(prepared_dir.parent)
    out = tmp_path / "pop"

    def run(dataset: str) -> dict:
        return evaluate(tiny_config(Path(dataset), out, method="popularity"))

    first = run(prepared_dir.name)
    assert first["protocol"]["dataset"] == prepared_dir.name
    assert run(str(prepared_dir)) == first  # finished: reused as it is
    (out / "results.json").unlink()  # a partial evaluation (protocol.json and the part files are left)
    again = run(str(prepared_dir.resolve()))
    assert (again["fingerprint"], again["protocol"], again["metrics"]) == (first["fingerprint"], first["protocol"],
                                                                          first["metrics"])
    assert json.loads((out / "protocol.json").read_text())["fingerprint"] == first["fingerprint"]
    copy = shutil.copytree(prepared_dir, tmp_path / "copy")
    with pytest.raises(ValueError, match=r"holds results of a different protocol \(dataset='data'"):
        run(str(copy))


def test_a_finished_run_without_results_md_gets_it_written_again(prepared_dir, tmp_path, capsys):
    """`llmrec evaluate` on a finished run prints its results.md: a missing one was a FileNotFoundError."""
    from llmrec.cli import main

    args = ["evaluate", "--dataset", str(prepared_dir), "--method", "popularity", "--ks", "1", "5",
            "--output_dir", str(tmp_path / "pop")]
    assert main(args) == 0
    table = (tmp_path / "pop" / "results.md").read_text()
    capsys.readouterr()
    (tmp_path / "pop" / "results.md").unlink()
    assert main(args) == 0
    assert (tmp_path / "pop" / "results.md").read_text() == table
    assert table in capsys.readouterr().out


def test_non_finite_logits_stop_the_evaluation_naming_the_split_rows(prepared_dir, tmp_path, monkeypatch):
    """A NaN logit (a float16 overflow) gave its row an empty ranking, recorded as a miss; now an error naming the
    split's rows."""
    import llmrec.models.checkpoint as checkpoint

    real = checkpoint.load_for_inference

    def poisoned(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)

        def overflow(module, args, kwargs, output):  # the prefill of a batch's second prompt overflows
            if kwargs["input_ids"].shape[1] > 1:
                output.logits[1, -1, 0] = float("nan")

        model.register_forward_hook(overflow, with_kwargs=True)
        return model, tokenizer

    monkeypatch.setattr(checkpoint, "load_for_inference", poisoned)
    with pytest.raises(ValueError, match=r"test\.jsonl row\(s\) \(0-based\) 1 at decoding step 0"):
        evaluate(tiny_config(prepared_dir, tmp_path / "ev", batch_size=3))
    assert not (tmp_path / "ev" / "results.json").exists()


def test_rows_by_length_is_longest_first_ties_in_row_order():
    from llmrec.evaluation.evaluator import rows_by_length

    assert rows_by_length([4, 7, 9, 11, 20], [5, 9, 5, 12, 9]) == [11, 7, 20, 4, 9]
    assert rows_by_length([], []) == []
    with pytest.raises(ValueError, match="2 rows but 1 lengths"):
        rows_by_length([1, 2], [3])


def test_batch_order_length_batches_similar_prompts_and_ranks_as_row_order(prepared_dir, tmp_path, monkeypatch):
    """batch_order length changes which rows share a batch, nothing else: the same rankings as row order (float32),
    written in row order, resumable, and recorded in the protocol only when not the default."""
    from llmrec.decoding import search

    seen: list[list[int]] = []
    real = search.rank_batch

    def spy(model, tokenizer, trie, template, examples, config, guidance=None):
        seen.append(search.prompt_lengths(model, tokenizer, trie, template, examples, config))
        return real(model, tokenizer, trie, template, examples, config, guidance=guidance)

    monkeypatch.setattr(search, "rank_batch", spy)
    rows = evaluate(tiny_config(prepared_dir, tmp_path / "rows"))
    row_batches, seen[:] = list(seen), []
    by_length = evaluate(tiny_config(prepared_dir, tmp_path / "length", batch_order="length"))
    flat = [n for batch in seen for n in batch]
    assert flat == sorted(flat, reverse=True) and len(set(flat)) > 1  # longest first, and lengths do differ
    assert sorted(flat) == sorted(n for batch in row_batches for n in batch)
    # Less padding: each batch pads to its longest prompt.
    assert sum(max(b) * len(b) for b in seen) < sum(max(b) * len(b) for b in row_batches)
    assert "batch_order" not in rows["protocol"] and by_length["protocol"]["batch_order"] == "length"
    assert by_length["fingerprint"] != rows["fingerprint"]
    assert by_length["metrics"] == rows["metrics"]
    a = [json.loads(x) for x in (tmp_path / "rows" / "rankings.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "length" / "rankings.jsonl").read_text().splitlines()]
    assert [r["row"] for r in b] == [r["row"] for r in a] == sorted(r["row"] for r in a)
    assert [r["title_ranking"] for r in b] == [r["title_ranking"] for r in a]
    for x, y in zip(a, b):
        assert y["scores"] == pytest.approx(x["scores"], abs=1e-5)
    # Resumed with some rows finished: the same file.
    part = tmp_path / "resumed" / "rankings"
    part.mkdir(parents=True)
    write_jsonl(part / "part-0.jsonl", b[:3])  # rows 0-2, which length order may have put in other batches
    resumed = evaluate(tiny_config(prepared_dir, tmp_path / "resumed", batch_order="length"))
    assert resumed["metrics"] == by_length["metrics"]
    assert (tmp_path / "resumed" / "rankings.jsonl").read_text() == (tmp_path / "length" / "rankings.jsonl").read_text()
    # A finished evaluation in row order is another protocol.
    with pytest.raises(ValueError, match=r"different protocol \(batch_order='rows' \(here 'length'\)\)"):
        evaluate(tiny_config(prepared_dir, tmp_path / "rows", batch_order="length"))
    with pytest.raises(ValueError, match="batch_order must be one of"):
        tiny_config(prepared_dir, tmp_path / "x", batch_order="longest")
