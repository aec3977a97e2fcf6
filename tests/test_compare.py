"""``llmrec compare``: paired differences of evaluation runs and the rows a comparison would need."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llmrec.evaluation.compare import compare_runs, comparison_table
from llmrec.evaluation.metrics import rows_for_power


def _run(path, item_ranks: list[int | None]):
    path.mkdir(parents=True)
    (path / "results.json").write_text("{}")
    with open(path / "rankings.jsonl", "w") as f:
        for row, rank in enumerate(item_ranks):
            f.write(json.dumps({"row": row, "target_item_id": 100 + row, "item_rank": rank, "title_rank": rank}) + "\n")
    return path


def test_rows_for_power_by_hand():
    # differences 1, 0, 0, 0: sd = 0.5; (z_0.975 + z_0.8) = 1.959964 + 0.841621 = 2.801585
    assert rows_for_power([1, 0, 0, 0], [0, 0, 0, 0], effect=0.1) == pytest.approx((2.801585 * 0.5 / 0.1) ** 2, rel=1e-6)
    # halving the effect quadruples the rows; the sign of the effect does not matter
    assert rows_for_power([1, 0, 0, 0], [0, 0, 0, 0], effect=-0.05) == pytest.approx(
        4 * rows_for_power([1, 0, 0, 0], [0, 0, 0, 0], effect=0.1))
    # 90% power, 1% level: z = 2.575829 + 1.281552
    assert rows_for_power(np.array([2.0, 0, 1, 1]), np.zeros(4), 0.5, alpha=0.01, power=0.9) == pytest.approx(
        (3.857381 * math.sqrt(2 / 3) / 0.5) ** 2, rel=1e-6)
    assert math.isnan(rows_for_power([1, 0, 1], [1, 0, 1], effect=0.1))  # no row differs: no spread to go by
    for bad in (dict(effect=0.0), dict(effect=0.1, power=1.0), dict(effect=0.1, alpha=0.0)):
        with pytest.raises(ValueError):
            rows_for_power([1, 0], [0, 0], **bad)
    with pytest.raises(ValueError, match="at least 2"):
        rows_for_power([1], [0], effect=0.1)


def test_compare_reports_rows_needed_relative_to_the_baseline(tmp_path):
    base = _run(tmp_path / "a", [0, None, 3, None, 12, 1])  # hr@10 mean 1/2
    other = _run(tmp_path / "b", [0, 2, None, 4, 12, 1])  # hr@10 mean 2/3: a scale by its mean would differ
    same = _run(tmp_path / "c", [0, None, 3, None, 12, 1])  # identical to the baseline: no spread
    res = compare_runs([base, other, same], ["hr@10", "ndcg@10"], power_rel=[0.1, 0.5])
    for metric in ("hr@10", "ndcg@10"):
        per = {}
        for name, ranks in (("a", [0, None, 3, None, 12, 1]), ("b", [0, 2, None, 4, 12, 1])):
            found = [r is not None and r < 10 for r in ranks]
            per[name] = np.array([(1.0 if metric == "hr@10" else 1 / math.log2(r + 2)) if f else 0.0
                                  for r, f in zip(ranks, found)])
        for rel in (0.1, 0.5):
            want = math.ceil(rows_for_power(per["b"], per["a"], rel * per["a"].mean()))
            assert res["differences"][metric][0]["rows_for_power"][f"{rel:g}"] == want
        assert res["differences"][metric][1]["rows_for_power"] == {"0.1": None, "0.5": None}
    json.dumps(res, allow_nan=False)  # no NaN in the JSON result
    table = comparison_table(res)
    assert "| 10% | 50% |" in table and "| - | - |" in table
    assert f"{res['differences']['hr@10'][0]['rows_for_power']['0.1']:,}" in table
    assert "rows_for_power" not in compare_runs([base, other], ["hr@10"])["differences"]["hr@10"][0]
    for bad in ([-0.1], [float("nan")], [float("inf")]):
        with pytest.raises(ValueError, match="power_rel"):
            compare_runs([base, other], ["hr@10"], power_rel=bad)


def test_rows_for_power_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="same length"):
        rows_for_power([1.0], [0.0, 0.0, 1.0, 0.0], effect=0.1)


def test_seed_groups_average_each_row_over_the_seeds_first(tmp_path):
    a0 = _run(tmp_path / "a0", [0, None, 3, None])
    a1 = _run(tmp_path / "a1", [None, None, 3, 1])
    b0 = _run(tmp_path / "b0", [0, 2, None, None])
    b1 = _run(tmp_path / "b1", [1, 2, 0, None])
    res = compare_runs([a0, a1, b0, b1], ["hr@10", "ndcg@10"], seeds_per_run=2, n_resamples=200)

    def ndcg(ranks):
        return np.array([0.0 if r is None else 1 / math.log2(r + 2) for r in ranks])

    a = (ndcg([0, None, 3, None]) + ndcg([None, None, 3, 1])) / 2
    b = (ndcg([0, 2, None, None]) + ndcg([1, 2, 0, None])) / 2
    assert res["metrics"]["ndcg@10"] == pytest.approx([a.mean(), b.mean()])
    assert res["metrics"]["hr@10"] == pytest.approx([(2 + 2) / 8, (2 + 3) / 8])
    assert res["differences"]["ndcg@10"][0]["diff"] == pytest.approx(b.mean() - a.mean())
    assert res["runs"] == [f"{a0} + {a1}", f"{b0} + {b1}"] and res["seeds_per_run"] == 2
    assert "averaged over the 2 seeds" in comparison_table(res)
    # the seeds+rows interval pairs seed i with the baseline's seed i and reports each seed's difference
    d = res["differences"]["ndcg@10"][0]
    per_seed = [(ndcg([0, 2, None, None]) - ndcg([0, None, 3, None])).mean(),
                (ndcg([1, 2, 0, None]) - ndcg([None, None, 3, 1])).mean()]
    assert d["per_seed_diff"] == pytest.approx(per_seed)
    assert d["ci95_seeds_rows"][0] <= d["diff"] <= d["ci95_seeds_rows"][1]
    assert "seeds+rows [" in comparison_table(res)
    assert "ci95_seeds_rows" not in compare_runs([a0, b0], ["hr@10"], n_resamples=200)["differences"]["hr@10"][0]
    # one seed per run is the plain comparison; the directories must split into whole groups of two runs or more
    assert compare_runs([a0, b0], ["hr@10"], n_resamples=200)["metrics"]["hr@10"] == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="groups of seeds_per_run = 3"):
        compare_runs([a0, a1, b0, b1], ["hr@10"], seeds_per_run=3)
    with pytest.raises(ValueError, match="at least two runs"):
        compare_runs([a0, a1], ["hr@10"], seeds_per_run=2)


def test_a_k_beyond_what_a_run_reports_is_refused(tmp_path):
    """@20 of a 10-beam run would count every target ranked past the list as a miss: refused, naming the run."""
    import json

    from llmrec.evaluation.compare import compare_runs

    dirs = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "rankings.jsonl").write_text("".join(json.dumps({"row": r, "user_id": "u", "target_item_id": 1,
                                                              "item_rank": r, "title_rank": r}) + "\n"
                                                  for r in (0, 1)))
        proto = {"method": "beam", "num_beams": 10} if name == "b" else {"method": "seqrec"}
        (d / "results.json").write_text(json.dumps({"protocol": proto}))
        dirs.append(d)
    assert compare_runs(dirs, ["ndcg@10"])["rows"] == 2
    with pytest.raises(ValueError, match=r"b ranks 10 titles per row .*ndcg@20 would count"):
        compare_runs([dirs[0], dirs[1]], ["ndcg@10", "ndcg@20"])



def test_a_k_beyond_the_stored_list_of_a_rank_fusion_run_is_refused(tmp_path):
    """A rank_fusion run (scripts/rank_fusion.py) records no ks: its K was not checked, so @K past the fused top it
    stores (the depth it is scored at) gave a number from the union of lists cut at other depths (10 beams and an ID
    model's top 20), beside an ID model's full-catalogue @K. Refused, naming the fusion, its two runs and the depth."""
    seqrec = tmp_path / "sasrec"
    seqrec.mkdir()
    (seqrec / "results.json").write_text(json.dumps({"protocol": {"method": "seqrec", "ks": [10, 20]}}))
    (seqrec / "rankings.jsonl").write_text("".join(json.dumps({"row": r, "target_item_id": 100 + r, "item_rank": rank})
                                                   + "\n" for r, rank in enumerate([0, 14, 3])))
    fusion = tmp_path / "fusion"
    fusion.mkdir()
    (fusion / "results.json").write_text(json.dumps({"protocol": {
        "method": "rank_fusion", "runs": ["eval_lm", "eval_sasrec"], "c": 60.0, "rows": 3, "matching": ["item"]}}))
    # its top 10 stored; item_rank is the target's position in the whole union (12 on row 1: past the stored top)
    (fusion / "rankings.jsonl").write_text("".join(
        json.dumps({"row": r, "target_item_id": 100 + r, "item_ranking": list(range(1, 11)), "item_rank": rank}) + "\n"
        for r, rank in enumerate([1, 12, None])))
    assert compare_runs([seqrec, fusion], ["hr@10", "ndcg@10"])["metrics"]["hr@10"] == [2 / 3, 1 / 3]
    with pytest.raises(ValueError, match=r"fusion is a rank fusion of eval_lm and eval_sasrec scored on its top 10 "
                                         r"items .*hr@20 would be another number .*compare at K <= 10"):
        compare_runs([seqrec, fusion], ["hr@10", "hr@20"])

def test_a_truncated_results_file_is_named(tmp_path):
    a, b = _run(tmp_path / "a", [0, 1]), _run(tmp_path / "b", [1, 0])
    (b / "results.json").write_text('{"protocol": {"meth')
    with pytest.raises(ValueError, match=r"b/results.json: not a results file of `llmrec evaluate`"):
        compare_runs([a, b], ["ndcg@10"])


def test_cli_writes_the_printed_table_and_the_json(tmp_path, capsys):
    from llmrec.cli import main

    a, b = _run(tmp_path / "a", [0, None, 3, None]), _run(tmp_path / "b", [1, 2, None, None])
    md, js = tmp_path / "out" / "cmp.md", tmp_path / "out" / "cmp.json"
    md.parent.mkdir()
    assert main(["compare", str(a), str(b), "--markdown", str(md), "--output", str(js), "--resamples", "200"]) == 0
    printed = capsys.readouterr().out
    assert md.read_text() == comparison_table(json.loads(js.read_text()))
    assert printed.startswith(md.read_text()) and "| run | hr@10 | ndcg@10 |" in md.read_text()


@pytest.mark.parametrize("value,problem", [("abc", "'abc' is not a number"), ("0.03,x", "'x' is not a number"),
                                           ("-0.1", "'-0.1': a relative effect must be finite and > 0"),
                                           ("nan", "'nan': a relative effect must be finite and > 0")])
def test_cli_refuses_a_power_rel_that_is_not_positive_numbers_naming_the_option(tmp_path, capsys, value, problem):
    """`--power-rel abc` printed a bare "could not convert string to float: 'abc'" (no option named)."""
    from llmrec.cli import main

    a, b = _run(tmp_path / "a", [0, None, 3, 1]), _run(tmp_path / "b", [1, 0, None, 1])
    with pytest.raises(SystemExit) as caught:
        main(["compare", str(a), str(b), "--power-rel", value])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --power-rel: {problem}" in err and "could not convert" not in err
    assert main(["compare", str(a), str(b), "--power-rel", "0.03, 0.17", "--resamples", "50"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert list(result["differences"]["hr@10"][0]["rows_for_power"]) == ["0.03", "0.17"]


def test_runs_sharing_part_of_their_rows_or_other_datasets_are_warned_about(tmp_path, caplog):
    """A 3-row and a 6-row run compared on their shared rows only: said, as are runs recording other datasets."""
    import logging

    small = _run(tmp_path / "small", [0, None, 2])
    big = _run(tmp_path / "big", [1, 0, None, 3, 0, 2])
    with caplog.at_level(logging.WARNING, logger="llmrec.evaluation.compare"):
        assert compare_runs([small, big], ["ndcg@10"])["rows"] == 3
    assert not caplog.records  # all 3 rows of the smaller run are shared
    part = _run(tmp_path / "part", [None, None, None, 0, 1])
    (part / "results.json").write_text(json.dumps({"protocol": {"dataset": "data/other"}}))
    (big / "results.json").write_text(json.dumps({"protocol": {"dataset": "data/games"}}))
    with caplog.at_level(logging.WARNING, logger="llmrec.evaluation.compare"):
        compare_runs([part, big], ["ndcg@10"])
    assert "different datasets (data/games, data/other)" in caplog.text
    sparse = _run(tmp_path / "sparse", [])
    with open(sparse / "rankings.jsonl", "w") as f:  # rows 0, 1 and 9 only: two shared with the 6-row run
        for row in (0, 1, 9):
            f.write(json.dumps({"row": row, "target_item_id": 100 + row, "item_rank": 0, "title_rank": 0}) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmrec.evaluation.compare"):
        assert compare_runs([sparse, big], ["ndcg@10"])["rows"] == 2
    assert "the runs share 2 of the 3 rows of the smallest run" in caplog.text


def test_cli_output_paths_that_cannot_be_written_are_refused_first(tmp_path, capsys):
    """--output / --markdown naming a directory (or a path under a file) failed after the bootstrap, with a
    traceback."""
    from llmrec.cli import main

    a, b = _run(tmp_path / "a", [0, None, 3, None]), _run(tmp_path / "b", [1, 2, None, None])
    (tmp_path / "afile").write_text("x")
    for flag, path, message in (("--output", tmp_path, "is a directory"),
                                ("--markdown", tmp_path / "afile" / "t.md", "afile is a file, not a directory")):
        assert main(["compare", str(a), str(b), flag, str(path)]) == 1
        assert message in capsys.readouterr().err


def test_labels_name_the_runs_in_the_table_and_the_directories_follow_it(tmp_path, capsys):
    from llmrec.cli import main

    dirs = [_run(tmp_path / n, ranks) for n, ranks in (("a0", [0, None, 3]), ("a1", [None, None, 3]),
                                                         ("b0", [0, 2, None]), ("b1", [1, 2, None]))]
    plain = compare_runs(dirs, ["hr@10"], seeds_per_run=2)
    named = compare_runs(dirs, ["hr@10"], seeds_per_run=2, labels=["base", "other"])
    assert named.pop("labels") == ["base", "other"] and named == plain  # labels change no number
    table = comparison_table(dict(named, labels=["base", "other"]))
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| base | ") and rows[2].startswith("| other | ")
    assert f"- other: `{dirs[2]} + {dirs[3]}`" in table  # each label's directories, below the table
    assert str(dirs[0]) not in "\n".join(rows)
    for bad, problem in ((["base"], "1 labels for 2 runs"), (["x", "x"], "distinct"), (["x", ""], "non-empty"),
                         (["a|b", "c"], "free of")):
        with pytest.raises(ValueError, match=problem):
            compare_runs(dirs, ["hr@10"], seeds_per_run=2, labels=bad)
    assert main(["compare", *map(str, dirs), "--seeds-per-run", "2", "--labels", "base,other",
                 "--metrics", "hr@10"]) == 0
    assert "| other | " in capsys.readouterr().out


def test_lm_runs_of_other_numerics_are_warned_about(tmp_path, caplog):
    """LM runs in different dtypes, or in bfloat16 with different batch sizes: part of their difference is
    arithmetic (in bf16 a row's batch-mates reorder many top-10 lists), which compare now says."""
    import logging

    def proto(run, **kw):
        (run / "results.json").write_text(json.dumps({"protocol": {"method": "beam", **kw}}))

    a, b = _run(tmp_path / "a", [0, None, 2]), _run(tmp_path / "b", [1, 0, None])
    ids = _run(tmp_path / "ids", [0, 1, 2])
    (ids / "results.json").write_text(json.dumps({"protocol": {"method": "seqrec", "batch_size": 256}}))
    cases = [
        (dict(dtype="bfloat16", batch_size=8), dict(dtype="bfloat16", batch_size=8), None),
        (dict(dtype="float32", batch_size=1), dict(dtype="float32", batch_size=8), None),
        (dict(dtype="bfloat16", batch_size=1), dict(dtype="bfloat16", batch_size=8), "different batch sizes (1, 8)"),
        (dict(dtype="bfloat16", batch_size=8), dict(dtype="float32", batch_size=8), "different dtypes (bfloat16, float32)"),
    ]
    for pa, pb, want in cases:
        proto(a, **pa)
        proto(b, **pb)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="llmrec.evaluation.compare"):
            compare_runs([a, b, ids], ["ndcg@10"])
        assert (want in caplog.text) if want else not caplog.records, (pa, pb, caplog.text)


def test_one_shared_row_gives_no_bootstrap_interval(tmp_path):
    from llmrec.evaluation.metrics import paired_bootstrap_ci

    # it was a zero-width interval [-1, -1] marked excludes_zero: "significant" from one row
    with pytest.raises(ValueError, match="at least 2 paired rows, got 1"):
        paired_bootstrap_ci([0.0], [1.0])
    a, b = _run(tmp_path / "a", [0]), _run(tmp_path / "b", [None])
    with pytest.raises(ValueError, match="at least 2 paired rows"):
        compare_runs([a, b], ["ndcg@10"])
    assert paired_bootstrap_ci([0.0, 1.0], [1.0, 1.0])[0] == -0.5


def test_the_power_table_says_it_sizes_the_rows_only_interval_when_seeds_are_averaged(tmp_path):
    ranks = [[0, None, 3, None, 1, 2], [None, 0, 3, 4, None, 2], [0, 0, None, 1, 2, None], [1, None, 0, 0, 2, 5]]
    runs = [_run(tmp_path / f"r{i}", r) for i, r in enumerate(ranks)]
    two_seeds = comparison_table(compare_runs(runs, ["ndcg@10"], seeds_per_run=2, power_rel=[0.5]))
    assert "for the rows-only interval with these 2 seeds per row" in two_seeds
    one_seed = comparison_table(compare_runs(runs[:2], ["ndcg@10"], power_rel=[0.5]))
    assert "rows-only interval" not in one_seed and "Rows a paired comparison would need" in one_seed


def test_a_difference_on_a_few_rows_says_how_many(tmp_path):
    """Two runs differing on 2 of 60 rows: the bootstrap interval over 2 rows covers ~86% (a review); the cell says
    how many rows differ and the text what that means. Many differing rows: no such remark."""
    base = [None] * 60
    few = list(base)
    few[3], few[7] = 0, 2
    res = compare_runs([_run(tmp_path / "a", base), _run(tmp_path / "b", few)], metrics=["ndcg@10"])
    assert res["differences"]["ndcg@10"][0]["rows_differing"] == 2
    text = comparison_table(res)
    assert "; 2 row(s) differ)" in text and "Where fewer than 10 rows differ" in text
    many = [0 if i % 2 else None for i in range(60)]
    res = compare_runs([_run(tmp_path / "c", base), _run(tmp_path / "d", many)], metrics=["ndcg@10"])
    assert res["differences"]["ndcg@10"][0]["rows_differing"] == 30
    assert "row(s) differ" not in comparison_table(res)


def test_runs_masking_history_differently_are_warned_about_and_named_in_the_table(tmp_path, caplog):
    """A masked run cannot hit a target already in the history and ranks the others higher: compared with an
    unmasked run, the difference includes the masking, which the warning and the table say."""
    import logging

    plain = _run(tmp_path / "plain", [0, 3, 12, None, 2])
    masked = _run(tmp_path / "masked", [0, 2, 11, 1, 1])
    (masked / "results.json").write_text(json.dumps({"protocol": {"history_masked": True}}))
    with caplog.at_level(logging.WARNING, logger="llmrec.evaluation.compare"):
        res = compare_runs([plain, masked], ["ndcg@10"], labels=["plain", "masked"])
    assert f"rank history items differently (masked: {masked}; not masked: {plain})" in caplog.text
    assert res["history_masked"] == [False, True]
    assert "History items ranked last (masked) in: masked; the other runs" in comparison_table(res)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmrec.evaluation.compare"):
        res = compare_runs([plain, _run(tmp_path / "plain2", [1, 3, 12, None, 2])], ["ndcg@10"])
    assert not caplog.records and "history_masked" not in res and "masked" not in comparison_table(res)


def test_cli_refuses_too_few_resamples_for_a_95_percent_interval(tmp_path, capsys):
    """`--resamples 1` printed a "95% interval" that excluded the observed difference: below 40 resamples the 2.5%
    tails of the percentile interval hold none."""
    from llmrec.cli import main

    a, b = _run(tmp_path / "a", [0, None, 3]), _run(tmp_path / "b", [1, 0, None])
    for n in ("1", "39"):
        with pytest.raises(SystemExit):
            main(["compare", str(a), str(b), "--resamples", n])
        assert "argument --resamples: must be >= 40" in capsys.readouterr().err
    assert main(["compare", str(a), str(b), "--resamples", "40"]) == 0
