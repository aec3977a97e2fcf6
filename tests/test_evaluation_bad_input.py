"""Bad input to ``llmrec evaluate`` / ``llmrec compare``: a clear error naming the file, row and field (never a
silent wrong number), and an output directory a failed start does not block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmrec.evaluation.compare import compare_runs
from llmrec.evaluation.evaluator import EvalConfig, evaluate


def _run(path: Path, item_ranks: list[int | None], protocol: dict | None = None, users: str = "u") -> Path:
    """An evaluation output directory as `llmrec evaluate` writes it (one record per row, in row order)."""
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({} if protocol is None else {"protocol": protocol}))
    with open(path / "rankings.jsonl", "w") as f:
        for row, rank in enumerate(item_ranks):
            f.write(json.dumps({"row": row, "user_id": f"{users}{row}", "target_item_id": 100 + row,
                                "item_rank": rank, "title_rank": rank}) + "\n")
    return path


# ------------------------------------------------------------------ compare


def test_a_k_beyond_a_popularity_list_is_refused(tmp_path):
    """Popularity keeps the top max(ks) items: @10 of a ks=[1, 5] run would count ranks 5..9 as misses."""
    a = _run(tmp_path / "a", [0, 1, 2], {"method": "seqrec", "ks": [1, 5, 10], "rows": 3})
    b = _run(tmp_path / "b", [0, None, None], {"method": "popularity", "ks": [1, 5], "rows": 3})
    assert compare_runs([a, b], ["hr@5"], n_resamples=50)["rows"] == 3
    with pytest.raises(ValueError, match=r"b ranks 5 .*hr@10 would count"):
        compare_runs([a, b], ["hr@5", "hr@10"], n_resamples=50)


def test_a_k_beyond_a_seqrec_title_list_is_refused(tmp_path):
    """seqrec's item rank is its full-catalogue rank (any K), its title list only the first max(ks) titles."""
    a = _run(tmp_path / "a", [0, 1, 2], {"method": "seqrec", "ks": [1, 5], "rows": 3})
    b = _run(tmp_path / "b", [0, 7, 2], {"method": "seqrec", "ks": [1, 10], "rows": 3})
    assert compare_runs([a, b], ["hr@10"], n_resamples=50)["metrics"]["hr@10"] == [1.0, 1.0]  # item level: fine
    with pytest.raises(ValueError, match=r"a ranks 5 titles .*hr@10 would count"):
        compare_runs([a, b], ["hr@10"], level="title", n_resamples=50)


def test_duplicate_rows_in_a_rankings_file_are_refused(tmp_path):
    a, b = _run(tmp_path / "a", [0, 1, 2]), _run(tmp_path / "b", [0, 1, 2])
    with open(b / "rankings.jsonl", "a") as f:  # row 1 again, now a miss: which one counts?
        f.write(json.dumps({"row": 1, "user_id": "u1", "target_item_id": 101, "item_rank": None,
                            "title_rank": None}) + "\n")
    with pytest.raises(ValueError, match=r"b/rankings.jsonl, line 4: row 1 is also on line 2"):
        compare_runs([a, b], ["hr@10"], n_resamples=50)


def test_a_truncated_rankings_file_is_refused(tmp_path):
    a = _run(tmp_path / "a", [0, 1, 2], {"method": "seqrec", "ks": [10], "rows": 3})
    b = _run(tmp_path / "b", [0, 1, 2], {"method": "seqrec", "ks": [10], "rows": 3})
    lines = (b / "rankings.jsonl").read_text().splitlines(keepends=True)
    (b / "rankings.jsonl").write_text("".join(lines[:2]) + lines[2][:20])  # cut in the middle of the last line
    with pytest.raises(ValueError, match=r"b/rankings.jsonl, line 3"):
        compare_runs([a, b], ["hr@10"], n_resamples=50)
    (b / "rankings.jsonl").write_text("".join(lines[:2]))  # cut at a line end: a row is gone
    with pytest.raises(ValueError, match=r"b/rankings.jsonl has 2 rows, .*results.json.* 3"):
        compare_runs([a, b], ["hr@10"], n_resamples=50)


@pytest.mark.parametrize("record,field", [({"user_id": "u0", "target_item_id": 100, "item_rank": 0, "title_rank": 0},
                                           "row"),
                                          ({"row": "0", "target_item_id": 100, "item_rank": 0, "title_rank": 0}, "row"),
                                          ({"row": 0, "target_item_id": 100, "title_rank": 0}, "item_rank"),
                                          ({"row": 0, "target_item_id": 100, "item_rank": "3", "title_rank": 0},
                                           "item_rank"),
                                          ({"row": 0, "item_rank": 0, "title_rank": 0}, "target_item_id"),
                                          ([0, 1], "row")])
def test_a_damaged_ranking_record_names_the_file_line_and_field(tmp_path, record, field):
    a, b = _run(tmp_path / "a", [0, 1]), _run(tmp_path / "b", [0, 1])
    lines = (b / "rankings.jsonl").read_text().splitlines(keepends=True)
    (b / "rankings.jsonl").write_text(json.dumps(record) + "\n" + lines[1])
    with pytest.raises(ValueError, match=rf"b/rankings.jsonl, line 1.*{field}"):
        compare_runs([a, b], ["hr@10"], n_resamples=50)


def test_a_run_without_title_ranks_compares_at_item_level_only(tmp_path):
    """scripts/rank_fusion.py writes item ranks only: fine at item level, a clear error at title level."""
    a, b = _run(tmp_path / "a", [0, 1]), _run(tmp_path / "b", [1, 0])
    lines = [json.loads(x) for x in (b / "rankings.jsonl").read_text().splitlines()]
    (b / "rankings.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "title_rank"}) + "\n"
                                              for r in lines))
    assert compare_runs([a, b], ["hr@1"], n_resamples=50)["metrics"]["hr@1"] == [0.5, 0.5]
    with pytest.raises(ValueError, match=r"b/rankings.jsonl has no title_rank"):
        compare_runs([a, b], ["hr@1"], level="title", n_resamples=50)


def test_runs_of_different_splits_or_users_are_not_paired(tmp_path):
    a = _run(tmp_path / "a", [0, 1], {"method": "popularity", "ks": [10], "split": "test", "rows": 2})
    b = _run(tmp_path / "b", [0, 1], {"method": "popularity", "ks": [10], "split": "valid", "rows": 2})
    with pytest.raises(ValueError, match=r"split.*test.*valid"):
        compare_runs([a, b], ["hr@10"], n_resamples=50)
    c = _run(tmp_path / "c", [0, 1], users="v")  # same targets, other users: another dataset
    with pytest.raises(ValueError, match=r"row 0 .*different users"):
        compare_runs([a, c], ["hr@10"], n_resamples=50)


@pytest.mark.parametrize("metric", ["ndcg10", "ndcg@x", "ndcg@0", "recall@10", "@10"])
def test_a_malformed_metric_name_is_a_clear_error(tmp_path, metric):
    a, b = _run(tmp_path / "a", [0, 1]), _run(tmp_path / "b", [1, 0])
    with pytest.raises(ValueError, match=r"metric .*e\.g\. ndcg@10"):
        compare_runs([a, b], ["hr@10", metric], n_resamples=50)
    with pytest.raises(ValueError, match="no metric"):
        compare_runs([a, b], [], n_resamples=50)


# ------------------------------------------------------------------ evaluate


def _config(data: Path, out: Path, **kw) -> EvalConfig:
    base = dict(dataset=str(data), split="test", method="beam", model_name_or_path="tiny-qwen2", dtype="float32",
                prompt="d3", noun="video games", num_beams=4, batch_size=3, ks=[1, 3], output_dir=str(out), max_rows=3)
    base.update(kw)
    return EvalConfig(**base)


def test_an_unknown_tokenization_fails_before_anything_is_written(prepared_dir, tmp_path):
    with pytest.raises(ValueError, match="tokenization must be one of"):
        _config(prepared_dir, tmp_path / "ev", tokenization="sep")
    with pytest.raises(ValueError, match="length_penalty"):
        _config(prepared_dir, tmp_path / "ev", length_penalty=float("nan"))
    for extreme in (700.0, -700.0):  # an OverflowError in the search / every row's ranking empty
        with pytest.raises(ValueError, match="length_penalty must be between -10 and 10"):
            _config(prepared_dir, tmp_path / "ev", length_penalty=extreme)
    assert not (tmp_path / "ev").exists()


def test_a_start_that_failed_before_any_row_does_not_block_the_corrected_rerun(prepared_dir, tmp_path):
    """A typo (here a prompt name) stops the run after protocol.json is written but before any row is ranked: the
    corrected rerun starts afresh instead of refusing the directory as "a partial evaluation of a different
    protocol". Once a row is ranked, a different protocol is still refused."""
    out = tmp_path / "ev"
    with pytest.raises(Exception, match="not found"):
        evaluate(_config(prepared_dir, out, prompt="no-such-prompt"))
    assert (out / "protocol.json").exists() and not (out / "results.json").exists()
    res = evaluate(_config(prepared_dir, out))
    assert res["protocol"]["prompt"] == "d3"
    assert json.loads((out / "protocol.json").read_text())["fingerprint"] == res["fingerprint"]
    # A partial evaluation with ranked rows is not overwritten by another protocol.
    (out / "results.json").unlink()
    with pytest.raises(ValueError, match="partial evaluation of a different protocol"):
        evaluate(_config(prepared_dir, out, num_beams=3))


def test_finished_results_of_a_dataset_prepared_again_are_not_returned(prepared_dir, tmp_path):
    """The fingerprint names the dataset directory, not its contents: finished results whose rows are not the
    dataset's rows any more are refused, as a partial evaluation's are."""
    from tests.conftest import write_prepared

    out = tmp_path / "pop"
    first = evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))
    assert evaluate(_config(prepared_dir, out, method="popularity", max_rows=0)) == first  # unchanged: reused
    write_prepared(prepared_dir, seed=1)  # same directory, same row count, other rows
    with pytest.raises(ValueError, match=r"rankings.jsonl: .*row \d+ is user .*was the dataset prepared again"):
        evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))


def test_popularity_results_of_another_training_split_are_not_returned(prepared_dir, tmp_path):
    """Popularity's fingerprint names the test rows only: after train.jsonl changed (prepared again with another
    cut-off) the finished and the partial popularity lists were returned as they were."""
    out = tmp_path / "pop"
    evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))
    train = prepared_dir / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    for row in rows:  # every training target becomes item 29: the most popular item is another one now
        row["target_item_id"] = 29
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"rankings\.jsonl: the finished evaluation's popularity list .* not the "
                                         r"one .*train\.jsonl gives now .*training split changed since"):
        evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))
    (out / "results.json").unlink()  # a cut run: its parts are not resumed either
    (out / "rankings.jsonl").unlink()
    with pytest.raises(ValueError, match=r"rankings: the partial evaluation's popularity list"):
        evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))


def test_a_zero_shot_result_of_an_older_converted_copy_is_not_returned(prepared_dir, tmp_path, monkeypatch):
    """SmolLM2's converted copy changed (conversion version 2: its digit split): a zero-shot evaluation made with
    the copy before was returned as this model's result. The version is in the protocol once above 1."""
    from llmrec.models import backbone

    out = tmp_path / "zs"
    first = evaluate(_config(prepared_dir, out))
    assert "backbone_conversion_version" not in first["protocol"]  # version 1 (and tiny models): not recorded
    monkeypatch.setattr(backbone, "alias_conversion_version", lambda name: 2 if name == "tiny-qwen2" else None)
    with pytest.raises(ValueError, match=r"different protocol \(backbone_conversion_version=None \(here 2\)\)"):
        evaluate(_config(prepared_dir, out))
    assert evaluate(_config(prepared_dir, tmp_path / "zs2"))["protocol"]["backbone_conversion_version"] == 2


def test_rankings_over_a_catalogue_prepared_again_are_not_reused(prepared_dir, tmp_path):
    """The fingerprint names the dataset directory: a catalogue prepared again in place (other titles, the same split
    rows) passed the row checks, and finished or partial rankings over the old titles were reused. Now refused by the
    catalogue's recorded SHA-256; results recorded before it was are not compared."""
    import hashlib

    from conftest import make_titles

    from llmrec.data.catalog import ItemCatalog

    out = tmp_path / "pop"
    catalog = prepared_dir / "catalog.jsonl"

    def run() -> dict:
        return evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))

    first = run()
    original = catalog.read_bytes()
    ItemCatalog([str(i) for i in range(1, 31)], [f"Renamed {t}" for t in make_titles(30)]).save(catalog)
    with pytest.raises(ValueError, match=r"results\.json: the finished evaluation was ranked over another catalogue "
                                         r"than .*catalog\.jsonl holds now .*prepared again since; remove"):
        run()
    assert first["catalog_sha256"] == hashlib.sha256(original).hexdigest()  # recorded beside the fingerprint
    (out / "results.json").unlink()  # a partial evaluation: protocol.json and the part files
    with pytest.raises(ValueError, match=r"rankings: the partial evaluation was ranked over another catalogue"):
        run()
    catalog.write_bytes(original)
    assert run()["metrics"] == first["metrics"]  # the same catalogue: resumed
    recorded = json.loads((out / "results.json").read_text())
    del recorded["catalog_sha256"]  # finished before the digest was recorded
    (out / "results.json").write_text(json.dumps(recorded))
    ItemCatalog([str(i) for i in range(1, 31)], [f"Renamed {t}" for t in make_titles(30)]).save(catalog)
    assert run() == recorded


def _drop(name: str):
    return lambda rec: {k: v for k, v in rec.items() if k != name}


def _set(name: str, value):
    return lambda rec: {**rec, name: value}


@pytest.mark.parametrize("damage,field", [(_drop("row"), "row"), (_set("row", "1"), "row"),
                                          (_drop("user_id"), "user_id"), (_set("target_item_id", "5"),
                                                                          "target_item_id"),
                                          (_set("item_rank", "3"), "item_rank"), (_drop("title_rank"), "title_rank"),
                                          (_set("item_ranking", None), "item_ranking")])
def test_a_damaged_record_of_a_finished_or_partial_run_names_the_file_line_and_field(prepared_dir, tmp_path, damage,
                                                                                      field):
    """A damaged record in a finished rankings.jsonl or a resume part file was a bare KeyError / TypeError (or
    passed, to fail in the metrics), naming neither the file nor the line."""
    from llmrec.data.canonical import DataFormatError

    out = tmp_path / "pop"
    evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))
    lines = (out / "rankings.jsonl").read_text().splitlines(keepends=True)
    bad = json.dumps(damage(json.loads(lines[1]))) + "\n"
    (out / "rankings.jsonl").write_text(lines[0] + bad + "".join(lines[2:]))
    with pytest.raises(DataFormatError, match=rf"rankings\.jsonl, row 2, field '{field}': expected .*remove "):
        evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))
    (out / "results.json").unlink()  # resumed from the part files: one damaged on its third line
    for part in (out / "rankings").glob("part-*.jsonl"):
        part.unlink()
    (out / "rankings" / "part-0.jsonl").write_text(lines[0] + "\n" + bad)
    with pytest.raises(DataFormatError, match=rf"part-0\.jsonl, row 3, field '{field}': .*remove this part file"):
        evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))


def test_bytes_that_are_not_utf8_in_a_part_file_name_the_file_and_line(prepared_dir, tmp_path):
    """A bare UnicodeDecodeError before."""
    from llmrec.data.canonical import DataFormatError

    out = tmp_path / "pop"
    evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))
    lines = (out / "rankings.jsonl").read_bytes().splitlines(keepends=True)
    (out / "results.json").unlink()
    (out / "rankings" / "part-0.jsonl").write_bytes(lines[0] + lines[1].replace(b'"user_id":"', b'"user_id":"\xff'))
    with pytest.raises(DataFormatError, match=r"part-0\.jsonl, row 2: bytes that are not UTF-8"):
        evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))


def test_output_and_option_mistakes_are_named_before_any_work(prepared_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):  # a NotADirectoryError traceback at the first write before
        with pytest.raises(ValueError, match="is a file, not a directory"):
            _config(prepared_dir, out)
    with pytest.raises(ValueError, match="row_seed must be >= 0, got -1"):  # numpy's "expected non-negative"
        _config(prepared_dir, tmp_path / "ev", max_rows=3, row_seed=-1)
    with pytest.raises(ValueError, match="^batch_size must be >= 1"):  # it said "num_beams and batch_size"
        _config(prepared_dir, tmp_path / "ev", batch_size=0)


def test_an_empty_split_is_refused_before_anything_is_written(prepared_dir, tmp_path):
    """An empty train.jsonl gave popularity results of all zeros (exit 0); an empty test split failed only after
    protocol.json and rankings/ were written, without naming the file."""
    import shutil

    data = tmp_path / "emptied"
    shutil.copytree(prepared_dir, data)
    (data / "train.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"train\.jsonl has no rows: nothing to count popularity from"):
        evaluate(_config(data, tmp_path / "pop", method="popularity"))
    (data / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"test\.jsonl has no rows: nothing to evaluate"):
        evaluate(_config(data, tmp_path / "beam"))
    assert not (tmp_path / "pop").exists() and not (tmp_path / "beam").exists()


def test_damaged_or_shortened_outputs_of_a_finished_run_are_named(prepared_dir, tmp_path):
    out = tmp_path / "pop"
    evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))
    ranked = (out / "rankings.jsonl").read_text().splitlines(keepends=True)
    (out / "rankings.jsonl").write_text("".join(ranked[:-1]))  # a copy that lost its last line
    with pytest.raises(ValueError, match=r"rankings\.jsonl lacks 1 of the \d+ rows .*results\.json was computed"):
        evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))
    (out / "rankings.jsonl").unlink()  # returned the stored metrics; the report's archive then failed on the file
    with pytest.raises(ValueError, match=r"rankings\.jsonl is missing beside the finished .*results\.json: remove"):
        evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))
    (out / "results.json").write_text('{"protocol": ')
    with pytest.raises(ValueError, match=r"results\.json is damaged"):
        evaluate(_config(prepared_dir, out, method="popularity", max_rows=0))


def test_a_prompt_budget_too_small_names_the_split_file_and_rows(prepared_dir, tmp_path):
    from llmrec.prompts import PromptError

    with pytest.raises(ValueError, match="max_prompt_length must be >= 1"):
        _config(prepared_dir, tmp_path / "neg", max_prompt_length=-1)
    with pytest.raises(PromptError, match=r"test\.jsonl rows 0\.\.\d+ \(0-based\): .*\(max_prompt_length 12\)"):
        evaluate(_config(prepared_dir, tmp_path / "small", max_prompt_length=12, max_rows=0))
    # batch_order length measures every prompt first: the same file and row named
    with pytest.raises(PromptError, match=r"test\.jsonl row 0 \(0-based\): .*\(max_prompt_length 12\)"):
        evaluate(_config(prepared_dir, tmp_path / "small_by_length", max_prompt_length=12, max_rows=0,
                         batch_order="length"))
