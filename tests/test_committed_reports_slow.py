"""Slow test: every committed pipeline report regenerates, byte for byte, from its committed archive.

Run with ``pytest -m slow tests/test_committed_reports_slow.py`` (~1 min: the Games split is prepared from
``../shared/data`` into a temporary directory, then ``llmrec bench pipeline ... --report-only`` rebuilds each
``benchmarks/results/pipeline_*.md`` from ``benchmarks/results/<name>_runs`` with the command its "Reproduce:" line
records). A change to the report code, the metrics or the protocol checks that would alter a committed table, or
refuse one of its evaluations, fails here. Skipped without ``../shared/data/amazon_games_dealrec``.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from llmrec.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GAMES_SOURCE = ROOT.parent / "shared" / "data" / "amazon_games_dealrec"
REPORTS = sorted(p for p in RESULTS.glob("pipeline_*.md") if (RESULTS / f"{p.stem}_runs").is_dir())


def _reproduce_args(report: Path) -> list[str]:
    """The report's recorded command, as arguments after ``llmrec``."""
    found = re.search(r"^Reproduce: `llmrec (bench pipeline [^`]+)`$", report.read_text(), re.MULTILINE)
    assert found, f"{report} has no 'Reproduce:' line"
    return shlex.split(found.group(1))


def _without_reproduce(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("Reproduce:"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding ``data/games`` prepared as the README says (the archives record that relative path)."""
    if not GAMES_SOURCE.is_dir():
        pytest.skip(f"{GAMES_SOURCE} is not there")
    work = tmp_path_factory.mktemp("reports")
    assert main(["data", "prepare", "--format", "seq-txt", "--input", str(GAMES_SOURCE),
                 "--output", str(work / "data" / "games")]) == 0
    return work


def test_reports_are_found():
    assert {p.stem for p in REPORTS} >= {"pipeline_games_smollm2", "pipeline_games_qwen"}


@pytest.mark.parametrize("report", REPORTS, ids=[p.stem for p in REPORTS])
def test_committed_report_regenerates_from_its_archive(report, workdir, monkeypatch, capsys):
    name = report.stem
    results = workdir / f"results_{name}"
    results.mkdir()
    shutil.copytree(RESULTS / f"{name}_runs", results / f"{name}_runs")
    args = _reproduce_args(report)
    if "--output-dir" in args:  # a run directory of its own (the archive is what the report is made from)
        i = args.index("--output-dir")
        del args[i:i + 2]
    monkeypatch.chdir(workdir)
    assert main([*args, "--report-only", "--output-dir", str(workdir / f"run_{name}"),
                 "--results-dir", str(results)]) == 0
    capsys.readouterr()
    assert _without_reproduce((results / f"{name}.md").read_text()) == _without_reproduce(report.read_text())
