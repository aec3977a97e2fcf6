"""README and experiment-log tables are copies of the generated files in benchmarks/results
(scripts/update_readme_results.py)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


def _module():
    return load_script("update_readme_results")


def test_render_replaces_blocks_and_keeps_missing(tmp_path):
    mod = _module()
    (tmp_path / "a.md").write_text("| x |\n|---|\n| 1 |\n")
    text = "intro\n<!-- results:a -->\nold\n<!-- /results:a -->\n<!-- results:b -->\nkeep\n<!-- /results:b -->\n"
    new, missing = mod.render(text, tmp_path)
    assert new == ("intro\n<!-- results:a -->\n| x |\n|---|\n| 1 |\n<!-- /results:a -->\n"
                   "<!-- results:b -->\nkeep\n<!-- /results:b -->\n")
    assert missing == ["b"]


def test_documents_tables_match_results_files():
    mod = _module()
    assert [d.relative_to(ROOT).as_posix() for d in mod.DOCUMENTS] == ["README.md", "benchmarks/README.md"]
    for doc in mod.DOCUMENTS:
        text = doc.read_text(encoding="utf-8")
        new, missing = mod.render(text, ROOT / "benchmarks" / "results")
        assert new == text and not missing, f"{doc}: run python scripts/update_readme_results.py"


def test_check_covers_every_document(tmp_path):
    mod = _module()
    (tmp_path / "a.md").write_text("| 1 |\n")
    good, stale = tmp_path / "README.md", tmp_path / "LOG.md"
    good.write_text("<!-- results:a -->\n| 1 |\n<!-- /results:a -->\n")
    stale.write_text("<!-- results:a -->\n| 2 |\n<!-- /results:a -->\n")
    args = ["--results-dir", str(tmp_path), "--readme", str(good), "--readme", str(stale)]
    assert mod.main(["--check", *args]) == 1
    assert mod.main(args) == 0
    assert stale.read_text() == good.read_text()
    assert mod.main(["--check", *args]) == 0


def test_check_fails_on_a_block_without_its_file_or_its_closing_marker(tmp_path):
    mod = _module()
    (tmp_path / "a.md").write_text("| 1 |\n")
    readme = tmp_path / "README.md"
    ok = "<!-- results:a -->\n| 1 |\n<!-- /results:a -->\n"
    for text, rc in ((ok, 0),
                     (ok.replace("| 1 |", "| 2 |"), 1),  # stale
                     (ok + "<!-- results:gone -->\nhand-typed\n<!-- /results:gone -->\n", 1),  # no file
                     (ok.replace("| 1 |", "| 2 |").replace("/results:a", "/results: a"), 1)):  # broken marker
        readme.write_text(text)
        assert mod.main(["--check", "--readme", str(readme), "--results-dir", str(tmp_path)]) == rc, text


def test_check_and_update_fail_on_a_stray_or_malformed_marker(tmp_path, capsys):
    """A closing marker whose opening was deleted leaves a hand-typed table above it; a malformed marker is not
    seen by the block pattern: both are errors naming the file and line, in both modes."""
    mod = _module()
    (tmp_path / "a.md").write_text("| 1 |\n")
    readme = tmp_path / "README.md"
    ok = "<!-- results:a -->\n| 1 |\n<!-- /results:a -->\n"
    for text, line, what in (
            (ok + "intro\n| a | 999 (hand-typed) |\n<!-- /results:a -->\n", 6, "closing marker without its opening"),
            (ok + "<!-- results:a-->\n| 999 |\n", 4, "malformed results marker '<!-- results:a-->'"),
            (ok + "<!--results:a -->\n| 999 |\n", 4, "malformed results marker"),
            (ok + "<!-- Results:b -->\n| 999 |\n<!-- /results:b -->\n", 4, "malformed results marker"),
            ("<!-- results:a -->\n<!-- results:a -->\n| 1 |\n<!-- /results:a -->\n", 2,
             "opening marker without its closing")):
        for check in (["--check"], []):
            readme.write_text(text)
            assert mod.main([*check, "--readme", str(readme), "--results-dir", str(tmp_path)]) == 1, (text, check)
            err = capsys.readouterr().err
            assert f"{readme}:{line}: error: " in err and what in err, (text, err)
    readme.write_text(ok)
    assert mod.main(["--check", "--readme", str(readme), "--results-dir", str(tmp_path)]) == 0
    assert mod.marker_errors(ok) == []
