"""Recommending with a trained model (llmrec.recommend): LLMs, ID models, histories, CLI. Tiny models, seconds."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import train_tiny_sasrec, write_prepared

from llmrec.data.canonical import load_prepared
from llmrec.data.catalog import ItemCatalog
from llmrec.evaluation.evaluator import EvalConfig, evaluate
from llmrec.models.checkpoint import CheckpointError
from llmrec.recommend import (
    HistoryError,
    Recommendation,
    Recommender,
    UnknownItemError,
    _TitleIndex,
    normalize_title,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("recommend") / "data")


@pytest.fixture(scope="module")
def zero_shot(data_dir) -> Recommender:
    return Recommender.from_pretrained("tiny-qwen2", dataset=data_dir, dtype="float32", batch_size=3)


@pytest.fixture(scope="module")
def seqrec_run(data_dir, tmp_path_factory) -> Path:
    return train_tiny_sasrec(data_dir, tmp_path_factory.mktemp("seqrec") / "run", max_history=10, epochs=2,
                             lr=1e-3, patience=10, seed=42)


@pytest.fixture(scope="module")
def sft_run(data_dir, tmp_path_factory) -> Path:
    from llmrec.training.sft import LatentSFTConfig, run_sft

    out = tmp_path_factory.mktemp("sft") / "run"
    run_sft(LatentSFTConfig(
        output_dir=str(out), model_name_or_path="tiny-qwen2", model_dtype="float32", dataset=str(data_dir),
        max_train_rows=4, eval_split=None, max_length=384, history_length=2, learning_rate=1e-2, warmup_steps=0,
        per_device_train_batch_size=2, max_steps=2, logging_steps=1, save_strategy="no", lora_dropout=0.0,
        lora_r=4, lora_alpha=8, seed=0, disable_tqdm=True, num_latent_tokens=1, dataloader_num_workers=0,
    ))
    return out


def copy_with_reversed_titles(data: Path, out: Path) -> Path:
    """A copy of a prepared dataset whose catalogue has as many items, with the titles in reverse order."""
    shutil.copytree(data, out)
    rows = (out / "catalog.jsonl").read_text().splitlines()
    titles = [json.loads(r)["title"] for r in rows][::-1]
    (out / "catalog.jsonl").write_text("".join(json.dumps({**json.loads(r), "title": t}) + "\n"
                                               for r, t in zip(rows, titles)))
    return out


def eval_config(data: Path, out: Path, **kw) -> EvalConfig:
    base = dict(dataset=str(data), split="test", method="beam", model_name_or_path="tiny-qwen2", dtype="float32",
                prompt="d3", noun="video games", num_beams=4, batch_size=3, ks=[1, 3], output_dir=str(out))
    base.update(kw)
    return EvalConfig(**base)


def read_rankings(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rankings.jsonl").read_text().splitlines()]


# -- LLM -------------------------------------------------------------------------------------------------


def assert_same_as_evaluator(recs: list[list[Recommendation]], ranked: list[dict], k: int) -> None:
    for got, want in zip(recs, ranked, strict=True):
        assert [r.item_id for r in got] == want["item_ranking"][:k]
        score_of = dict(zip(want["title_ranking"], want["scores"]))
        assert [r.score for r in got] == [score_of[r.title] for r in got]


def test_llm_recommendations_equal_the_evaluator_ranking(data_dir, zero_shot, tmp_path):
    """Same model, same beams, same batches: recommend() returns the evaluator's item ranking and scores."""
    evaluate(eval_config(data_dir, tmp_path / "ev"))
    ranked = read_rankings(tmp_path / "ev")
    histories = list(load_prepared(data_dir, splits=["test"]).splits["test"]["history_item_ids"])
    recs = zero_shot.recommend(histories, k=4)
    assert len(recs) == 12 and all(len(r) == 4 for r in recs)
    assert_same_as_evaluator(recs, ranked, 4)
    assert zero_shot.info["kind"] == "llm" and zero_shot.info["source"] == "base model"


def test_d3_guided_recommendations_equal_the_guided_evaluator_ranking(data_dir, seqrec_run, tmp_path, capsys):
    """D3 decoding through recommend (it had no guidance option, so a D3-guided evaluation could not be reproduced
    by a user): same rankings and scores as `llmrec evaluate` with the same guidance checkpoint and weight."""
    # The prompt shows 3 items; the ID model reads up to its own max_history (10), as in the evaluator.
    evaluate(eval_config(data_dir, tmp_path / "ev", guidance_checkpoint=str(seqrec_run), guidance_weight=2.0,
                         history_length=3))
    ranked = read_rankings(tmp_path / "ev")
    histories = list(load_prepared(data_dir, splits=["test"]).splits["test"]["history_item_ids"])
    guided = Recommender.from_pretrained("tiny-qwen2", dataset=data_dir, dtype="float32", batch_size=3,
                                         history_length=3, guidance_checkpoint=seqrec_run, guidance_weight=2.0)
    assert guided.info["guidance"] == {"checkpoint": str(seqrec_run), "weight": 2.0, "id_model": "sasrec",
                                       "id_max_history": 10}
    recs = guided.recommend(histories, k=4)
    assert_same_as_evaluator(recs, ranked, 4)
    plain = Recommender.from_pretrained("tiny-qwen2", dataset=data_dir, dtype="float32", batch_size=3,
                                        history_length=3).recommend(histories, k=4)
    assert [[r.item_id for r in x] for x in recs] != [[r.item_id for r in x] for x in plain]  # the guidance acts

    from llmrec.cli import main

    assert main(["recommend", "--checkpoint", "tiny-qwen2", "--dataset", str(data_dir), "--dtype", "float32",
                 "--history-length", "3", "--item-ids", "--history", *map(str, histories[0]), "--k", "4",
                 "--guidance-checkpoint",
                 str(seqrec_run), "--guidance-weight", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [int(line.split()[1]) for line in table[2:]] == [r.item_id for r in recs[0]]

    for kw, why in (({"guidance_checkpoint": seqrec_run}, "needs guidance_weight"),
                    ({"guidance_weight": 1.0}, "without guidance_checkpoint"),
                    ({"guidance_checkpoint": seqrec_run, "guidance_weight": -1.0}, "finite number >= 0"),
                    ({"guidance_checkpoint": seqrec_run, "guidance_weight": float("nan")}, "finite number >= 0")):
        with pytest.raises(ValueError, match=why):
            Recommender.from_pretrained("tiny-qwen2", dataset=data_dir, **kw)
    with pytest.raises(ValueError, match="is an ID-model run: guidance_checkpoint guides an LLM"):
        Recommender.from_pretrained(seqrec_run, guidance_checkpoint=seqrec_run, guidance_weight=1.0)
    for not_a_run in (tmp_path / "no_such_run", data_dir):  # said "a seqrec run without results.json" before
        with pytest.raises(FileNotFoundError, match="is not a `llmrec seqrec train` run directory"):
            Recommender.from_pretrained("tiny-qwen2", dataset=data_dir, guidance_checkpoint=not_a_run,
                                        guidance_weight=1.0)


def test_a_lares_guide_with_a_random_initial_state_is_warned_about(data_dir, tmp_path, caplog):
    run = train_tiny_sasrec(data_dir, tmp_path / "lares", model="lares", state_init="normal", rpt_epochs=0,
                            max_history=10, epochs=1, seed=42)
    with caplog.at_level("WARNING", logger="llmrec.recommend"):
        Recommender.from_pretrained("tiny-qwen2", dataset=data_dir, dtype="float32", guidance_checkpoint=run,
                                    guidance_weight=1.0)
    assert "state_init: normal" in caplog.text and "can differ from the evaluation's" in caplog.text


def test_titles_ids_and_normalised_titles_give_the_same_result(zero_shot):
    cat = zero_shot.catalog
    by_id = [[1, 5, 9], [12, 2]]
    by_title = [[cat.title(i) for i in h] for h in by_id]
    messy = [["  " + t.upper().replace(" ", "   ") + " " for t in h] for h in by_title]
    mixed = [[by_title[0][0], 5, by_title[0][2]], [12, by_title[1][1]]]
    want = zero_shot.recommend(by_id, k=3)
    assert len(want) == 2 and all(len(r) == 3 for r in want)
    assert zero_shot.recommend(by_title, k=3) == want
    assert zero_shot.recommend(messy, k=3) == want
    assert zero_shot.recommend(mixed, k=3) == want
    # One history (not wrapped in a batch) gives its list directly.
    assert zero_shot.recommend(by_title[0], k=3) == zero_shot.recommend([by_title[0]], k=3)[0]
    assert all(isinstance(r, Recommendation) and r.title == cat.title(r.item_id) for r in want[0])


def test_unknown_title_is_an_error_naming_the_title_and_its_position(zero_shot):
    history = [zero_shot.catalog.title(1), "Halo Infinite Deluxe 99", zero_shot.catalog.title(3)]
    with pytest.raises(UnknownItemError, match=r"position 2: title 'Halo Infinite Deluxe 99' is not in the catalogue"):
        zero_shot.recommend(history, k=3)
    with pytest.raises(UnknownItemError, match=r"history 1, position 1: title 'nope'"):
        zero_shot.recommend([[1], ["nope"]], k=3)


def test_skip_drops_unknown_titles_with_a_warning_and_records_them(zero_shot, caplog):
    cat = zero_shot.catalog
    history = [cat.title(1), "Halo Infinite Deluxe 99", cat.title(3)]
    with caplog.at_level(logging.WARNING, logger="llmrec.recommend"):
        got = zero_shot.recommend(history, k=3, on_unknown="skip")
    assert "position 2: skipping title 'Halo Infinite Deluxe 99'" in caplog.text
    assert [[s.position for s in h] for h in zero_shot.last_skipped] == [[2]]
    assert got == zero_shot.recommend([1, 3], k=3)
    assert zero_shot.last_skipped == [[]]  # reset by the last call ...
    zero_shot.recommend([history, [2]], k=3, on_unknown="skip")
    (skipped,), none = zero_shot.last_skipped  # ... and one list per history
    assert none == [] and skipped.position == 2 and skipped.value == "Halo Infinite Deluxe 99"
    with pytest.raises(HistoryError, match="all 2 of its items were unknown"):
        zero_shot.recommend(["nope", "neither"], k=3, on_unknown="skip")


def test_bad_histories_are_clear_errors(zero_shot):
    n = len(zero_shot.catalog)
    with pytest.raises(HistoryError, match="history is empty"):
        zero_shot.recommend([], k=3)
    with pytest.raises(HistoryError, match="history 1 is empty"):
        zero_shot.recommend([[1, 2], []], k=3)
    for bad in (0, n + 1, -3):
        with pytest.raises(UnknownItemError, match=rf"position 2: item id {bad} is not in the catalogue \(ids 1..{n}\)"):
            zero_shot.recommend([1, bad], k=3)
    with pytest.raises(UnknownItemError, match="item id"):
        zero_shot.recommend([1, n + 1], k=3, on_unknown="skip")  # unknown ids are never skipped
    with pytest.raises(HistoryError, match="position 2: expected an item title"):
        zero_shot.recommend([1, 2.5], k=3)
    with pytest.raises(HistoryError, match="position 1: expected an item title"):
        zero_shot.recommend([True], k=3)
    with pytest.raises(TypeError, match="single string"):
        zero_shot.recommend(zero_shot.catalog.title(1), k=3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        zero_shot.recommend([1], k=0)
    with pytest.raises(ValueError, match="on_unknown"):
        zero_shot.recommend([1], k=3, on_unknown="ignore")


def test_title_matching_is_exact_then_normalised_and_refuses_ambiguity():
    assert normalize_title("  Super  MARIO\tbros ") == "super mario bros"
    index = _TitleIndex(ItemCatalog(["a", "b", "c", "d"], ["Halo", "HALO", "Tetris", "Halo"]))
    assert index.lookup("Halo") == (1, "") and index.lookup("HALO") == (2, "")  # exact first; shared -> smallest id
    assert index.lookup(" tetris ") == (3, "")
    item, reason = index.lookup("halo")
    assert item is None and "matches 2 catalogue titles" in reason


def test_title_matching_decodes_html_character_references():
    """A scraped catalogue's "Orcs &amp; Humans" is found as the "Orcs & Humans" a user types, and a normalised
    catalogue's "Orcs & Humans" as the source's escaped form; a bare "&" or "&copy" without ";" is no reference."""
    assert normalize_title("Don&#39;t  STARVE&nbsp;") == "don't starve"
    index = _TitleIndex(ItemCatalog(["a", "b", "c"], ["Orcs &amp; Humans", "AT&T Phone", "Mouse \u2013 PC"]))
    assert index.lookup("orcs & humans") == (1, "") and index.lookup("Orcs &amp; Humans") == (1, "")
    assert index.lookup("AT&T phone") == (2, "") and index.lookup("Mouse &ndash; PC") == (3, "")
    item, reason = index.lookup("Orcs Humans")
    assert item is None and "HTML character references" in reason
    assert index.suggestions("Orcs & Humanz") == ["Orcs &amp; Humans"]
    # A catalogue prepared with text=keep can hold both forms (Games: "Sid Meier&#39;s Civilization IV" and
    # "Sid Meier's Civilization IV"): exact first, then case/whitespace folding alone, and only then decoding,
    # where the two forms are one key and so ambiguous.
    both = _TitleIndex(ItemCatalog(["a", "b", "c"], ["A &amp; B", "A & B", "C"]))
    assert both.lookup("A & B") == (2, "") and both.lookup("A &amp; B") == (1, "")
    assert both.lookup("a & b") == (2, "") and both.lookup("a  &amp; B ") == (1, "")
    item, reason = both.lookup("a &#38; b")
    assert item is None and "matches 2 catalogue titles" in reason


def test_exclude_history_llm(zero_shot):
    history = [12, 7, 23]  # among the tiny model's favourite titles, so they would be recommended
    plain = zero_shot.recommend(history, k=5)
    assert set(history) & {r.item_id for r in plain}
    got = zero_shot.recommend(history, k=5, exclude_history=True)
    assert len(got) == 5 and not set(history) & {r.item_id for r in got}


def test_exclude_history_llm_does_not_depend_on_the_batch_and_covers_the_whole_history(data_dir):
    """Each history's beam is widened by its own number of history titles: alone or batched with histories that
    need wider beams, it gets the same recommendations. Items older than the history_length the model reads are
    excluded too."""
    from llmrec.data.canonical import load_prepared

    rec = Recommender.from_pretrained("tiny-qwen2", dataset=data_dir, dtype="float32", batch_size=8,
                                      history_length=2, exclude_history=True)
    histories = [list(r["history_item_ids"]) for r in load_prepared(data_dir, splits=["test"]).splits["test"]]
    assert len({len(set(h)) for h in histories}) > 1  # histories of different widths share a batch
    batched = rec.recommend(histories, k=3)
    for h, recs in zip(histories, batched):
        alone = rec.recommend(h, k=3)
        assert [r.item_id for r in alone] == [r.item_id for r in recs]
        assert [r.score for r in alone] == pytest.approx([r.score for r in recs], abs=1e-4)  # padding: float noise
        assert len(recs) == 3 and not set(h) & {r.item_id for r in recs}
    long = [12, 7, 23, 5]  # the model reads [23, 5]; 12 and 7 are among the tiny model's favourite titles
    assert {12, 7} & {r.item_id for r in rec.recommend(long[-2:], k=5)}
    assert not set(long) & {r.item_id for r in rec.recommend(long, k=5)}


def test_sft_checkpoint_loads_and_recommends(data_dir, sft_run, tmp_path, capsys):
    """A saved latent SFT checkpoint: settings and dataset come from it; rankings equal the evaluator's."""
    rec = Recommender.from_pretrained(sft_run, batch_size=3)
    assert rec.info["source"] == "llmrec SFT checkpoint" and rec.info["num_latent_tokens"] == 1
    assert rec.history_length == 2 and rec.info["dtype"] == "float32" and rec.info["model"] == "tiny-qwen2"
    assert Path(rec.info["dataset"]) == data_dir
    evaluate(eval_config(data_dir, tmp_path / "ev", checkpoint=str(sft_run), history_length=2))
    histories = list(load_prepared(data_dir, splits=["test"]).splits["test"]["history_item_ids"])
    recs = rec.recommend(histories, k=4)  # the recommender keeps the 2 most recent items, as the evaluator
    assert_same_as_evaluator(recs, read_rankings(tmp_path / "ev"), 4)

    from llmrec.cli import main

    assert main(["recommend", "--checkpoint", str(sft_run), "--item-ids", "--history", "1", "2", "--k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [int(line.split()[1]) for line in table[2:]] == [r.item_id for r in rec.recommend([1, 2], k=3)]


def test_another_catalogue_is_warned_about_and_a_guide_of_another_catalogue_names_the_fix(data_dir, sft_run, tmp_path,
                                                                                          caplog):
    """An LLM trained on one catalogue ranked another without a word (the evaluator warns); a guide trained on
    another catalogue was refused with "pass the dataset the run was trained on", which would make the LLM rank
    the ID model's catalogue instead of its own."""
    other = write_prepared(tmp_path / "other", n_items=40)
    with caplog.at_level("WARNING", logger="llmrec.recommend"):
        Recommender.from_pretrained(sft_run, dataset=other, batch_size=3)
    assert "was trained on" in caplog.text and "another catalogue" in caplog.text
    guide = train_tiny_sasrec(other, tmp_path / "guide", max_history=10, epochs=1, seed=42)
    with pytest.raises(ValueError, match=r"guide with an ID model trained on .*the catalogue the LLM ranks"):
        Recommender.from_pretrained(sft_run, batch_size=3, guidance_checkpoint=guide, guidance_weight=1.0)


def test_a_checkpoint_on_another_base_model_is_a_clear_error(sft_run):
    from llmrec.models.checkpoint import load_for_inference

    with pytest.raises(ValueError, match="was trained on base model 'tiny-qwen2'.*not 'tiny-llama'"):
        load_for_inference("tiny-llama", str(sft_run), "float32", torch.device("cpu"))


def test_full_model_checkpoint_without_llmrec_config(data_dir, tmp_path):
    """A plain save_pretrained directory is a checkpoint too (dataset required); it ranks as the evaluator."""
    from llmrec.models.tiny import build_tiny

    model, tok = build_tiny("tiny-qwen2")
    model.save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match="records no dataset"):
        Recommender.from_pretrained(tmp_path / "full")
    rec = Recommender.from_pretrained(tmp_path / "full", dataset=data_dir, dtype="float32", batch_size=3)
    assert rec.info["source"] == "checkpoint (full)"
    evaluate(eval_config(data_dir, tmp_path / "ev", checkpoint=str(tmp_path / "full")))
    histories = list(load_prepared(data_dir, splits=["test"]).splits["test"]["history_item_ids"])
    assert_same_as_evaluator(rec.recommend(histories, k=4), read_rankings(tmp_path / "ev"), 4)


# -- ID models -------------------------------------------------------------------------------------------


def test_seqrec_recommendations_are_the_top_k_of_its_scores(data_dir, seqrec_run):
    from safetensors.torch import load_file

    from llmrec.seqrec.config import SeqRecConfig
    from llmrec.seqrec.data import left_pad
    from llmrec.seqrec.models import build_model

    rec = Recommender.from_pretrained(seqrec_run)
    assert rec.kind == "seqrec" and rec.info["model"] == "sasrec" and rec.history_length == 10
    assert rec.exclude_history is False  # the run's mask_history
    cfg = SeqRecConfig(**json.loads((seqrec_run / "results.json").read_text())["config"])
    model = build_model(cfg, 30)
    model.load_state_dict(load_file(str(seqrec_run / "train" / "best.safetensors")))
    model.eval()
    histories = [[1, 2, 3], [30], list(range(1, 16))]
    scores = model.score(torch.from_numpy(left_pad(histories, 10)))
    got = rec.recommend(histories, k=5)
    for row, recs in zip(scores, got):
        order = sorted(range(30), key=lambda j: (-row[j].item(), j))[:5]
        assert [r.item_id for r in recs] == [j + 1 for j in order]
        assert [r.score for r in recs] == pytest.approx([row[j].item() for j in order])
    # Titles give the same as ids; k beyond the catalogue returns every item; exclusion masks history ids.
    assert rec.recommend([rec.catalog.title(i) for i in histories[0]], k=5) == rec.recommend(histories[0], k=5)
    assert rec.catalog.title(3) == rec.catalog.title(4)  # a shared title stands for its smallest id
    assert rec.recommend([rec.catalog.title(4)], k=5) == rec.recommend([3], k=5) != rec.recommend([4], k=5)
    assert len(rec.recommend([1], k=100)) == 30
    excluded = rec.recommend(histories[0], k=30, exclude_history=True)
    assert len(excluded) == 27 and not {1, 2, 3} & {r.item_id for r in excluded}
    # exclusion covers the whole given history, also the items older than the history_length the model reads
    short = Recommender.from_pretrained(seqrec_run, history_length=1, exclude_history=True)
    everything = short.recommend([3], k=30, exclude_history=False)
    assert short.recommend([1, 2, 3], k=30) == [r for r in everything if r.item_id not in {1, 2, 3}]


def test_seqrec_dataset_mismatch_and_bad_checkpoints_are_clear_errors(data_dir, seqrec_run, tmp_path):
    other = write_prepared(tmp_path / "small", n_items=20)
    with pytest.raises(ValueError, match="trained on a catalogue of 30 items, but .* has 20"):
        Recommender.from_pretrained(seqrec_run, dataset=other)
    # As many items but other titles: the ids would be right and the titles wrong.
    shuffled = copy_with_reversed_titles(data_dir, tmp_path / "shuffled")
    with pytest.raises(ValueError, match="catalogue differs"):
        Recommender.from_pretrained(seqrec_run, dataset=shuffled)
    unfinished = tmp_path / "unfinished"
    (unfinished / "train").mkdir(parents=True)
    (unfinished / "train" / "best.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has not finished"):
        Recommender.from_pretrained(unfinished)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="nor is it a `llmrec seqrec train` run"):
        Recommender.from_pretrained(junk)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        Recommender.from_pretrained(tmp_path / "missing" / "run")
    with pytest.raises(ValueError, match="records no dataset"):
        Recommender.from_pretrained("tiny-qwen2")


# -- CLI -------------------------------------------------------------------------------------------------


def test_cli_jsonl_in_and_out(seqrec_run, tmp_path, capsys):
    from llmrec.cli import main

    rec = Recommender.from_pretrained(seqrec_run)
    cat = rec.catalog
    inp = tmp_path / "histories.jsonl"
    inp.write_text(
        json.dumps({"user": "u1", "history": [1, 2, 3]}) + "\n\n"
        + json.dumps({"history": [cat.title(4), cat.title(5).upper()]}) + "\n"
        + json.dumps({"user": 7, "history": [cat.title(6), "No Such Game", 8]}) + "\n"
    )
    out = tmp_path / "out" / "recs.jsonl"
    assert main(["recommend", "--checkpoint", str(seqrec_run), "--input", str(inp), "--output", str(out),
                 "--k", "4", "--on-unknown", "skip"]) == 0
    assert "wrote 3 lines" in capsys.readouterr().out
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    # Items 3 and 4 share a title: the title stands for the smaller id.
    want = rec.recommend([[1, 2, 3], [3, 5], [6, 8]], k=4)
    assert [x.get("user") for x in lines] == ["u1", None, 7] and "user" not in lines[1]
    assert [x["line"] for x in lines] == [1, 3, 4]  # the input lines answered (line 2 is blank)
    for line, recs in zip(lines, want):
        assert line["recommendations"] == [r.to_dict() for r in recs]
    assert lines[0]["skipped"] == [] and lines[2]["skipped"][0]["position"] == 2
    assert lines[2]["skipped"][0]["value"] == "No Such Game"
    assert sorted(p.name for p in out.parent.iterdir()) == ["recs.jsonl"]  # atomic: no temporary left behind
    # Without --output the same lines go to stdout.
    assert main(["recommend", "--checkpoint", str(seqrec_run), "--input", str(inp), "--k", "4",
                 "--on-unknown", "skip"]) == 0
    assert capsys.readouterr().out == out.read_text()

    # Default on_unknown=error: the file, its line and the title are named; nothing is written.
    out2 = tmp_path / "out2.jsonl"
    assert main(["recommend", "--checkpoint", str(seqrec_run), "--input", str(inp), "--output", str(out2)]) == 1
    err = capsys.readouterr().err
    assert "histories.jsonl, row 4, field 'history': position 2: title 'No Such Game'" in err
    assert not out2.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "x", "items": [1]}\n')
    assert main(["recommend", "--checkpoint", str(seqrec_run), "--input", str(bad), "--output", str(out2)]) == 1
    assert "bad.jsonl, row 1, field 'history': missing" in capsys.readouterr().err
    bad.write_bytes(b'{"history": [1]}\n\n{"history": ["Caf\xe9"]}\n')  # latin-1, not UTF-8
    assert main(["recommend", "--checkpoint", str(seqrec_run), "--input", str(bad), "--output", str(out2)]) == 1
    assert "bad.jsonl, row 3" in capsys.readouterr().err and not out2.exists()
    # "user" is echoed into the output: NaN or Infinity (read by Python's json) would make an output line not JSON.
    for value in ("NaN", "-Infinity", '{"id": Infinity}'):
        bad.write_text(f'{{"history": [1], "user": "u"}}\n{{"history": [1], "user": {value}}}\n')
        assert main(["recommend", "--checkpoint", str(seqrec_run), "--input", str(bad), "--output", str(out2)]) == 1
        assert "bad.jsonl, row 2, field 'user': holds NaN or Infinity" in capsys.readouterr().err, value
        assert not out2.exists()


def test_cli_history_prints_a_table(data_dir, zero_shot, capsys):
    from llmrec.cli import main

    titles = [zero_shot.catalog.title(2), zero_shot.catalog.title(9)]
    want = zero_shot.recommend(titles, k=3)
    args = ["recommend", "--checkpoint", "tiny-qwen2", "--dataset", str(data_dir), "--dtype", "float32", "--k", "3"]
    assert main([*args, "--history", *titles]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:2] == ["rank", "item_id"]
    for line, r in zip(table[2:], want, strict=True):
        assert line.split(maxsplit=3) == [str(want.index(r) + 1), str(r.item_id), f"{r.score:.4f}", r.title]
    assert main([*args, "--item-ids", "--history", "2", "9"]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == table[2:]
    assert main([*args, "--history", "Not A Title"]) == 1
    assert "--history, position 1: title 'Not A Title' is not in the catalogue" in capsys.readouterr().err
    # The decoding settings of an evaluation can be given on the command line too (D3's length penalty 0, ...).
    d3 = Recommender.from_pretrained("tiny-qwen2", dataset=data_dir, dtype="float32", length_penalty=0.0,
                                     max_prompt_length=400).recommend(titles, k=3)
    assert main([*args, "--length-penalty", "0", "--max-prompt-length", "400", "--history", *titles]) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [int(line.split()[1]) for line in lines] == [r.item_id for r in d3]
    assert [f"{r.score:.4f}" for r in d3] == [line.split()[2] for line in lines] != [x.split()[2] for x in table[2:]]


# -- bad input: checkpoint files, options, histories ------------------------------------------------------


def test_damaged_checkpoint_json_is_an_error_naming_the_file(data_dir, seqrec_run, tmp_path):
    """results.json, llmrec_config.json and adapter_config.json that are not JSON objects, and a stored seqrec config
    with a value of the wrong type, are errors naming the file (not a bare JSON error or an AttributeError)."""
    run = tmp_path / "run"
    shutil.copytree(seqrec_run, run)
    results = json.loads((run / "results.json").read_text())
    for text in ("{", "[1]"):
        (run / "results.json").write_text(text)
        with pytest.raises(ValueError, match=re.escape(str(run / "results.json"))):
            Recommender.from_pretrained(run)
    results["config"]["hidden_size"] = "16"
    (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match=re.escape(str(run / "results.json")) + ".*'config'"):
        Recommender.from_pretrained(run)
    llm = tmp_path / "llm"
    llm.mkdir()
    for text in ("{oops", "[1]"):
        (llm / "llmrec_config.json").write_text(text)
        with pytest.raises(ValueError, match=re.escape(str(llm / "llmrec_config.json"))):
            Recommender.from_pretrained(llm, dataset=data_dir)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("[]")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(adapter / "adapter_config.json"))):
        Recommender.from_pretrained(adapter, dataset=data_dir)


def test_batch_size_zero_is_an_error_for_id_models_too(seqrec_run):
    """batch_size=0 was silently replaced by the default for ID models (LLMs refused it)."""
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        Recommender.from_pretrained(seqrec_run, batch_size=0)


def test_one_history_with_a_bad_first_entry_is_reported_at_its_position(zero_shot):
    """A history whose first entry is neither a title nor an id is one history with a bad entry, not a batch whose
    "history 0" is not a list."""
    for bad, got in (([None, 1], "NoneType None"), ([2.5, 3], "float 2.5"), ([b"Halo", 1], "bytes b'Halo'")):
        with pytest.raises(HistoryError, match=rf"^history, position 1: expected an item title \(str\) or id "
                                               rf"\(int\), got {re.escape(got)}$"):
            zero_shot.recommend(bad, k=3)
    with pytest.raises(TypeError, match="history 1: a history is a list"):
        zero_shot.recommend([[1], None], k=3)  # a batch is still recognised by its first history
    assert zero_shot.recommend([(1, 2), [3]], k=3) == zero_shot.recommend([[1, 2], [3]], k=3)


def test_cli_refuses_item_ids_with_input_and_an_input_without_histories(seqrec_run, tmp_path, capsys):
    """--item-ids with --input was silently ignored (JSON strings stay titles, and titles such as "1942" exist); an
    input file without histories wrote an empty output and succeeded."""
    from llmrec.cli import main

    inp = tmp_path / "histories.jsonl"
    out = tmp_path / "recs.jsonl"
    inp.write_text(json.dumps({"history": ["1", "2"]}) + "\n")
    args = ["recommend", "--checkpoint", str(seqrec_run), "--input", str(inp), "--output", str(out)]
    assert main([*args, "--item-ids"]) == 1
    assert "--item-ids applies to --history only" in capsys.readouterr().err and not out.exists()
    for text in ("", "\n  \n"):
        inp.write_text(text)
        assert main(args) == 1
        assert f"{inp}: no histories" in capsys.readouterr().err and not out.exists()


def test_cli_warns_about_input_fields_it_does_not_read(seqrec_run, tmp_path, caplog):
    """A misspelt "user" ("users") was dropped from the output without a word: fields other than "history" and
    "user" are named in a warning with their line counts; the recommendations are still written."""
    from llmrec.cli import main

    inp = tmp_path / "histories.jsonl"
    out = tmp_path / "recs.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in (
        {"history": [1, 2], "user": "a"}, {"history": [2, 3], "users": "b"}, {"history": [3], "users": "c", "x": 1})))
    with caplog.at_level("WARNING", logger="llmrec.recommend"):
        assert main(["recommend", "--checkpoint", str(seqrec_run), "--input", str(inp), "--output", str(out)]) == 0
    assert "ignoring field(s)" in caplog.text
    assert "'users' on 2 line(s), first line 2" in caplog.text and "'x' on 1 line(s), first line 3" in caplog.text
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x.get("user") for x in lines] == ["a", None, None]


def test_cli_output_that_is_a_directory_is_refused_before_recommending(seqrec_run, tmp_path, capsys):
    """--output naming a directory failed only when writing, after every recommendation was computed, with an
    IsADirectoryError traceback."""
    from llmrec.cli import main

    inp = tmp_path / "histories.jsonl"
    inp.write_text(json.dumps({"history": [1, 2]}) + "\n")
    assert main(["recommend", "--checkpoint", str(seqrec_run), "--input", str(inp), "--output", str(tmp_path)]) == 1
    assert f"--output {tmp_path} is a directory" in capsys.readouterr().err
    # ...or under a file (a FileExistsError after every recommendation before)
    (tmp_path / "afile").write_text("x")
    assert main(["recommend", "--checkpoint", str(seqrec_run), "--input", str(inp), "--output",
                 str(tmp_path / "afile" / "x.jsonl")]) == 1
    assert "afile is a file, not a directory" in capsys.readouterr().err
    # a device name torch does not know, and a non-finite length penalty, are clear errors
    for extra, message in ((["--device", "gpu7"], "device 'gpu7' is not a torch device"),
                           (["--length-penalty", "nan"], "length_penalty must be a finite number")):
        assert main(["recommend", "--checkpoint", str(seqrec_run), "--input", str(inp), *extra]) == 1
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("length_penalty", [700.0, -700.0])
def test_an_extreme_length_penalty_is_refused_before_loading(tmp_path, length_penalty):
    """At 700 the beam search overflowed (OverflowError); at -700 every recommendation list came back empty."""
    with pytest.raises(ValueError, match="length_penalty must be between -10 and 10"):
        Recommender.from_pretrained(tmp_path / "not-loaded", length_penalty=length_penalty)


def test_llm_k_beyond_the_catalogue_does_not_widen_the_beam_past_its_titles(zero_shot, monkeypatch):
    """A beam wider than the number of distinct titles finds nothing more (every title is already kept), but its
    buffers grow with the width: ``k=10**9`` asked for gigabytes per history. The beam is capped at the titles;
    the result is every item, as for an exact ``k``."""
    import llmrec.decoding.search as search

    n_titles = len(set(zero_shot.catalog.titles))
    widths: list[int] = []
    real = search.rank_batch

    def spy(model, tokenizer, trie, template, examples, config, *args, **kw):
        widths.append(config.num_beams)
        if config.num_beams > n_titles:  # fail here rather than allocate for 10**9 beams
            raise AssertionError(f"beam width {config.num_beams} > {n_titles} distinct titles")
        return real(model, tokenizer, trie, template, examples, config, *args, **kw)

    monkeypatch.setattr(search, "rank_batch", spy)
    everything = zero_shot.recommend([[1, 2], [5]], k=len(zero_shot.catalog))
    assert zero_shot.recommend([[1, 2], [5]], k=10**9) == everything
    assert [len(r) for r in everything] == [len(zero_shot.catalog)] * 2
    alone = zero_shot.recommend([1, 2], k=len(zero_shot.catalog))  # alone: no batch padding, same scores
    excluded = zero_shot.recommend([1, 2], k=10**9, exclude_history=True)
    assert excluded == [r for r in alone if r.item_id not in {1, 2}]
    assert max(widths) == n_titles


def test_a_history_whose_prompt_cannot_fit_is_named(data_dir, tmp_path, capsys):
    """The newest item's title alone overflows the prompt budget: the error names that history (and, from a
    file, its row), not just "a prompt"."""
    from llmrec.cli import main
    from llmrec.recommend import PromptFitError

    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    cat = ItemCatalog.load(d / "catalog.jsonl")
    titles = list(cat.titles)
    titles[4] = " ".join(["Super Mario"] * 45) + " X"  # item 5
    ItemCatalog(cat.raw_ids, titles).save(d / "catalog.jsonl")
    rec = Recommender.from_pretrained("tiny-qwen2", dataset=d, dtype="float32", batch_size=2)
    assert len(rec.recommend([5, 1], k=2)) == 2  # an old long title is left out of the prompt: fine
    with pytest.raises(PromptFitError, match=r"history 2 \(newest item 'Super Mario Super Mario") as e:
        rec.recommend([[1, 2], [3], [1, 5]], k=2)  # the third history, in the second batch of 2
    assert e.value.index == 2
    # the budget it was held to is explained: max_prompt_length less the room kept for the longest answer
    assert "the prompt's budget is max_prompt_length 512 minus" in str(e.value) and "raise max_prompt_length" in str(e.value)
    inp = tmp_path / "histories.jsonl"
    inp.write_text("".join(json.dumps({"user": u, "history": h}) + "\n\n"
                           for u, h in (("a", [1, 2]), ("b", [3]), ("c", [1, 5]))))
    out = tmp_path / "recs.jsonl"
    assert main(["recommend", "--checkpoint", "tiny-qwen2", "--dataset", str(d), "--dtype", "float32",
                 "--input", str(inp), "--output", str(out), "--k", "2", "--batch-size", "2"]) == 1
    assert "histories.jsonl, row 5, field 'history': history 2" in capsys.readouterr().err
    assert not out.exists()


def test_lares_with_a_random_initial_state_recommends_the_same_alone_batched_and_again(data_dir, tmp_path, caplog):
    """``state_init: normal`` draws LARES's initial state at evaluation too: keyed by the history's content, a
    history gets the same list alone, in a batch and on every call (before: the global generator's next draws)."""
    run = train_tiny_sasrec(data_dir, tmp_path / "lares", model="lares", state_init="normal", rpt_epochs=0,
                            epochs=1)
    with caplog.at_level(logging.WARNING, logger="llmrec.recommend"):
        rec = Recommender.from_pretrained(run, batch_size=2)
    assert "draws a random initial state (state_init: normal)" in caplog.text  # not the evaluator's draws
    histories = [[1, 2, 3], [5, 9], [12, 7, 23, 4]]
    torch.manual_seed(0)
    batched = rec.recommend(histories, k=5)
    torch.manual_seed(1)
    for history, got in zip(histories, batched):
        alone = rec.recommend(history, k=5)
        assert rec.recommend(history, k=5) == alone  # again: bit for bit
        assert [r.item_id for r in alone] == [r.item_id for r in got]  # in a batch: float rounding only
        assert [r.score for r in alone] == pytest.approx([r.score for r in got], abs=1e-5)
    # The draws are the model's: another history content gets other initial states (scores differ).
    s = rec._backend.scores([[1, 2, 3], [1, 2, 3], [2, 1, 3]])
    assert torch.equal(s[0], s[1]) and not torch.equal(s[0], s[2])


def test_a_moved_dataset_is_still_checked_against_the_recorded_catalogue_digest(data_dir, tmp_path):
    """Once the dataset a run was trained on has moved, another catalogue of as many items was accepted (wrong
    titles for the right ids); the run's recorded SHA-256 of its catalogue now decides -- in recommend, in
    `llmrec evaluate --method seqrec` and for D3 guidance alike."""
    from llmrec.evaluation.evaluator import EvalConfig, evaluate

    shutil.copytree(data_dir, tmp_path / "data")
    run = train_tiny_sasrec(tmp_path / "data", tmp_path / "run", max_history=10, epochs=1, seed=42)
    shutil.move(str(tmp_path / "data"), str(tmp_path / "moved"))
    other = copy_with_reversed_titles(tmp_path / "moved", tmp_path / "other")
    with pytest.raises(ValueError, match="recorded SHA-256 differs"):
        Recommender.from_pretrained(run, dataset=other)
    assert Recommender.from_pretrained(run, dataset=tmp_path / "moved").recommend([1, 2], k=3)
    for kw in (dict(method="seqrec", checkpoint=str(run)),
               dict(method="beam", model_name_or_path="tiny-qwen2", guidance_checkpoint=str(run), guidance_weight=1.0,
                    num_beams=3, length_penalty=0.0)):
        with pytest.raises(ValueError, match="recorded SHA-256 differs"):
            evaluate(EvalConfig(dataset=str(other), split="test", max_rows=3, ks=[1, 3], history_length=2,
                                output_dir=str(tmp_path / f"eval-{kw['method']}"), **kw))


def test_a_dataset_prepared_again_in_place_is_checked_against_the_recorded_catalogue_digest(data_dir, tmp_path):
    """The recorded directory still there, but prepared again in place (same path, as many items, other titles): it
    was compared with itself and passed, giving the right ids with the wrong titles."""
    shutil.copytree(data_dir, tmp_path / "data")
    run = train_tiny_sasrec(tmp_path / "data", tmp_path / "run", max_history=10, epochs=1, seed=42)
    assert Recommender.from_pretrained(run).recommend([1, 2], k=3)
    copy_with_reversed_titles(tmp_path / "data", tmp_path / "reversed")
    shutil.rmtree(tmp_path / "data")
    shutil.move(str(tmp_path / "reversed"), str(tmp_path / "data"))
    with pytest.raises(ValueError, match=r"catalogue differs from the one the ID model was trained on .*recorded "
                                         r"SHA-256 differs"):
        Recommender.from_pretrained(run)


def test_dtype_is_checked_before_loading_and_recorded_as_used(data_dir):
    # "fast" was recorded as "fast" (not the dtype used), and an unknown name was refused only by the model load
    from llmrec.models.backbone import concrete_dtype_name

    rec = Recommender.from_pretrained("tiny-qwen2", dataset=data_dir, dtype="fast", batch_size=3)
    assert rec.info["dtype"] == concrete_dtype_name("fast") in ("bfloat16", "float32")
    with pytest.raises(ValueError, match=r"^dtype: unsupported dtype 'bogus'"):
        Recommender.from_pretrained("tiny-qwen2", dataset=data_dir, dtype="bogus")


def test_cli_options_take_the_underscore_spelling_too(seqrec_run, capsys):
    """`evaluate --guidance_checkpoint` works (config commands accept both spellings); `recommend` refused
    `--guidance_checkpoint` / `--history_length` with the top-level usage."""
    from llmrec.cli import main

    head, tail = ["recommend", "--checkpoint", str(seqrec_run)], ["--k", "3", "--history", "1", "2"]
    assert main(head + ["--item-ids", "--history-length", "1"] + tail) == 0
    hyphen = capsys.readouterr().out
    assert main(head + ["--item_ids", "--history_length", "1"] + tail) == 0
    assert capsys.readouterr().out == hyphen and "top 3" in hyphen


def test_early_stopping_reaches_the_beam_search(data_dir, capsys, early_stopping_seen):
    """early_stopping=False (generate's default, as `llmrec evaluate --early_stopping false`) is what the search
    runs with, from Python and from the command line (--no-early-stopping); the default stays True."""
    from llmrec.cli import main

    seen = early_stopping_seen
    rec = Recommender.from_pretrained("tiny-qwen2", dataset=data_dir, dtype="float32", early_stopping=False)
    title = rec.catalog.title(2)
    rec.recommend([title], k=3)
    assert seen == [False] and rec.info["early_stopping"] is False
    seen.clear()
    args = ["recommend", "--checkpoint", "tiny-qwen2", "--dataset", str(data_dir), "--dtype", "float32", "--k", "3"]
    assert main([*args, "--no-early-stopping", "--history", title]) == 0
    assert main([*args, "--history", title]) == 0
    capsys.readouterr()
    assert seen == [False, True]


# --------------------------------------------------------------------------- review 2026-12-06


def _shared_title(catalog) -> tuple[str, list[int]]:
    ids: dict[str, list[int]] = {}
    for item in range(1, len(catalog) + 1):
        ids.setdefault(catalog.title(item), []).append(item)
    title, items = next((t, i) for t, i in ids.items() if len(i) > 1)
    return title, items


@pytest.mark.parametrize("kind", ["seqrec", "llm"])
def test_a_shared_title_is_warned_listed_and_excluded_whole(kind, seqrec_run, zero_shot, caplog):
    rec = Recommender.from_pretrained(seqrec_run) if kind == "seqrec" else zero_shot
    title, items = _shared_title(rec.catalog)
    other = next(i for i in range(1, len(rec.catalog) + 1) if i not in items)
    with caplog.at_level(logging.WARNING, logger="llmrec.recommend"):
        resolved = rec.resolve_history([other, title])
    assert resolved.item_ids == [other, items[0]]  # the smallest id, as before
    assert [t.to_dict() for t in resolved.shared_titles] == [{"position": 2, "value": title, "item_ids": items}]
    assert f"title {title!r} is shared by items {items}" in caplog.text
    everything = len(rec.catalog)
    by_title = rec.recommend([other, title], k=everything, exclude_history=True)
    # which of the items the user meant is not known: none of them comes back (item 4 was recommended here)
    assert not {other, *items} & {r.item_id for r in by_title}
    by_id = rec.recommend([other, items[0]], k=everything, exclude_history=True)
    assert {r.item_id for r in by_id} & set(items) == set(items[1:])  # an id names one item: only it goes
    assert rec.recommend([other, title], k=5) == rec.recommend([other, items[0]], k=5)  # no exclusion: the same


def test_cli_lists_shared_titles_and_gives_a_row_without_known_items_no_recommendations(seqrec_run, tmp_path,
                                                                                         capsys):
    from llmrec.cli import main

    rec = Recommender.from_pretrained(seqrec_run)
    title, items = _shared_title(rec.catalog)
    inp = tmp_path / "histories.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in [
        {"user": "a", "history": [1, title]}, {"user": "b", "history": ["No Such Game"]},
        {"user": "c", "history": ["Nor This", "Nor That"]}, {"user": "d", "history": [2]}]))
    out = tmp_path / "recs.jsonl"
    # --on-unknown skip used to stop at user b ("all 1 of its items were unknown titles"), writing nothing and
    # never reaching user c
    assert main(["recommend", "--checkpoint", str(seqrec_run), "--input", str(inp), "--output", str(out),
                 "--k", "3", "--on-unknown", "skip"]) == 0
    assert "3 unknown titles skipped; 2 histories with no known item, given no recommendations" in capsys.readouterr().out
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["user"] for x in lines] == ["a", "b", "c", "d"]
    assert lines[0]["shared_titles"] == [{"position": 2, "value": title, "item_ids": items}]
    assert "shared_titles" not in lines[3]
    assert lines[1]["recommendations"] == [] and [s["value"] for s in lines[1]["skipped"]] == ["No Such Game"]
    assert lines[2]["recommendations"] == [] and len(lines[2]["skipped"]) == 2
    want = rec.recommend([[1, items[0]], [2]], k=3)
    assert [lines[0]["recommendations"], lines[3]["recommendations"]] == [[r.to_dict() for r in w] for w in want]
    # the Python API and a single --history still refuse an emptied history
    with pytest.raises(HistoryError, match="all 1 of its items were unknown titles"):
        rec.recommend(["No Such Game"], on_unknown="skip")


def test_tensor_and_array_histories_are_ids(seqrec_run):
    import numpy as np

    rec = Recommender.from_pretrained(seqrec_run)
    want = rec.recommend([1, 2, 3], k=4)
    # a 1-D tensor was "iteration over a 0-d tensor", a 2-D one "got Tensor tensor(1)"
    assert rec.recommend(torch.tensor([1, 2, 3]), k=4) == want == rec.recommend(np.array([1, 2, 3]), k=4)
    assert rec.recommend(torch.tensor([[1, 2, 3], [4, 5, 6]]), k=4) == rec.recommend([[1, 2, 3], [4, 5, 6]], k=4)
    # lists of 0-d tensors / numpy scalars (what iterating a tensor gives): "iteration over a 0-d tensor" before
    assert rec.recommend([torch.tensor(1), torch.tensor(2), torch.tensor(3)], k=4) == want
    assert rec.recommend(list(np.array([1, 2, 3])), k=4) == want
    assert rec.recommend([list(torch.tensor([1, 2, 3])), [4, 5, 6]], k=4) == rec.recommend([[1, 2, 3], [4, 5, 6]], k=4)
    with pytest.raises(HistoryError, match="position 2: expected an item title"):
        rec.recommend([torch.tensor(1), torch.tensor(2.5)], k=4)  # a float id is refused, not truncated
    with pytest.raises(HistoryError, match="position 2: expected an item title"):
        rec.recommend([1, np.timedelta64(5, "ns")], k=4)  # its .item() is the int 5 (a review)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_refused_before_loading(seqrec_run, capsys):
    from llmrec.cli import main

    with pytest.raises(ValueError, match="'cuda': this machine has 0 usable CUDA devices"):
        Recommender.from_pretrained(seqrec_run, device="cuda")
    # it was an AssertionError traceback from torch after the model had loaded
    assert main(["recommend", "--checkpoint", str(seqrec_run), "--history", "1", "2", "--item-ids",
                 "--device", "cuda:1"]) == 1
    assert "usable CUDA devices" in capsys.readouterr().err


def test_digit_titles_hint_at_ids_and_a_failed_call_leaves_no_stale_skips(seqrec_run):
    rec = Recommender.from_pretrained(seqrec_run)
    with pytest.raises(UnknownItemError, match=r"title '12' .*to give item id 12, pass an int \(CLI: --item-ids with --history"):
        rec.recommend(["12", 40])
    rec.recommend([1, "No Such Game"], k=2, on_unknown="skip")
    assert [s.value for s in rec.last_skipped[0]] == ["No Such Game"]
    with pytest.raises(UnknownItemError):
        rec.recommend([999999])
    assert rec.last_skipped == []  # it kept the previous call's entries


# --------------------------------------------------------------------------- review 2026-12-07


def test_non_finite_logits_name_the_history_and_its_input_line(data_dir, tmp_path, monkeypatch, capsys):
    """NaN logits (a float16 overflow) for one history were reported as "prompt row(s) (0-based) 0": the row of its
    beam-search batch, not the history (here the third, in the second batch of 2), nor the --input file's line."""
    from llmrec.cli import main
    from llmrec.decoding.beam_search import NonFiniteLogitsError

    rec = Recommender.from_pretrained("tiny-qwen2", dataset=data_dir, dtype="float32", batch_size=2)
    tok, cat = rec._backend.tokenizer, rec.catalog

    def tokens(text: str) -> set[int]:
        return set(tok(text, add_special_tokens=False)["input_ids"])

    common = tokens(rec._backend.template.render_prompt([cat.title(1)])) | tokens(cat.title(2)) | tokens(cat.title(3))
    item = next(i for i in range(4, len(cat) + 1) if tokens(cat.title(i)) - common)
    marker = min(tokens(cat.title(item)) - common)  # in the prompt of the history holding `item` only

    def poison(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:  # the prompt's prefill
            output.logits[(ids == marker).any(dim=1)] = float("nan")
        return output

    handle = rec.model.register_forward_hook(poison, with_kwargs=True)
    try:
        histories = [[1, 2], [3], [item]]
        with pytest.raises(NonFiniteLogitsError, match=r"for histories \(0-based, in the order given\) 2 at") as e:
            rec.recommend(histories, k=2)
        assert e.value.rows == [2]
        inp = tmp_path / "histories.jsonl"
        inp.write_text("".join(json.dumps({"history": h}) + "\n\n" for h in histories))  # lines 1, 3, 5
        monkeypatch.setattr(Recommender, "from_pretrained", classmethod(lambda cls, *a, **kw: rec))
        out = tmp_path / "recs.jsonl"
        assert main(["recommend", "--checkpoint", "tiny-qwen2", "--dataset", str(data_dir), "--input", str(inp),
                     "--output", str(out), "--k", "2"]) == 1
        assert f"for {inp} line(s) 5 at decoding step 0" in capsys.readouterr().err and not out.exists()
    finally:
        handle.remove()


def test_unordered_histories_and_options_of_the_wrong_type_are_refused(seqrec_run, tmp_path):
    """A set was read in hash order (titles: another order in every process), exclude_history="no" excluded (a
    truthy string), and history_length=2.5 loaded fine and failed at the first recommend as a bare slice error."""
    rec = Recommender.from_pretrained(seqrec_run)
    titles = [rec.catalog.title(i) for i in (9, 2, 5)]
    with pytest.raises(TypeError, match="history is a set, which has no order: give a list, oldest item first"):
        rec.resolve_history(set(titles))
    for bad, what in (({9, 2, 5}, "histories is a set"), ([[1], frozenset({9, 2})], "history 1 is a frozenset"),
                      ({9: 1, 2: 1}, "histories is a dict")):
        with pytest.raises(TypeError, match=f"{what}, which has no order"):
            rec.recommend(bad, k=3)
    with pytest.raises(TypeError, match="exclude_history must be True or False .* got str 'no'"):
        rec.recommend([9, 2, 5], k=3, exclude_history="no")
    for kw, message in (({"exclude_history": "false"}, "exclude_history must be True or False"),
                        ({"history_length": 2.5}, "history_length must be an integer, got float 2.5"),
                        ({"batch_size": "8"}, "batch_size must be an integer, got str '8'"),
                        ({"num_beams": True}, "num_beams must be an integer, got bool True")):
        with pytest.raises(TypeError, match=message):
            Recommender.from_pretrained(seqrec_run, **kw)
        with pytest.raises(TypeError, match=message):  # an LLM too, before anything loads
            Recommender.from_pretrained(tmp_path / "not-loaded", **kw)


def test_a_digit_title_in_an_input_file_hints_at_a_json_number(seqrec_run, tmp_path, capsys):
    """The hint said "(CLI: --item-ids)", which --input refuses: a file gives ids as JSON numbers."""
    from llmrec.cli import main

    inp = tmp_path / "histories.jsonl"
    inp.write_text(json.dumps({"history": [1, "5"]}) + "\n")
    assert main(["recommend", "--checkpoint", str(seqrec_run), "--input", str(inp)]) == 1
    assert "row 1, field 'history': position 2: title '5'" in (err := capsys.readouterr().err)
    assert "in an --input file, the JSON number 5 without quotes" in err


def test_rank_resolved_refuses_histories_resolve_history_would_have_refused(seqrec_run, zero_shot):
    """``rank_resolved`` is public: an empty or out-of-catalogue ResolvedHistory built by hand failed with a bare
    IndexError (LLM) or scored padding, not as a named history."""
    from llmrec.recommend import HistoryError, ResolvedHistory

    for rec in (Recommender.from_pretrained(seqrec_run), zero_shot):
        n = len(rec.catalog)
        assert len(rec.rank_resolved([ResolvedHistory([1, 2], [])], k=2)[0]) == 2
        with pytest.raises(HistoryError, match="history 1 has no item ids"):
            rec.rank_resolved([ResolvedHistory([1], []), ResolvedHistory([], [])], k=2)
        for bad in (0, n + 1, True):
            with pytest.raises(HistoryError, match=rf"history 0: item id {bad!r} is not a catalogue id \(1..{n}\)"):
                rec.rank_resolved([ResolvedHistory([1, bad], [])], k=2)
