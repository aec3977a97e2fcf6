"""Atomic writes flush their data to the disk before the rename that publishes it, and clean up after killed writers.

A rename can reach the disk before the data it names: after a power loss the published file would be empty or
partial, which is what the atomic writes exist to prevent. These tests record the order of ``fsync`` and
``os.replace`` calls (the fsync'd file is named through /proc/self/fd, so Linux only).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmrec.data import canonical

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fsync'd files via /proc/self/fd")


@pytest.fixture
def events(monkeypatch):
    """The fsync and replace calls, in order: ("fsync", path) and ("replace", src, dst)."""
    log: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        log.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_atomic_write_text_syncs_the_data_then_renames_then_syncs_the_folder(tmp_path, events):
    target = tmp_path / "results.json"
    canonical.atomic_write_text(target, "{}\n")
    assert target.read_text() == "{}\n"
    replaces = [e for e in events if e[0] == "replace"]
    assert len(replaces) == 1 and replaces[0][2] == str(target)
    tmp = replaces[0][1]
    assert events.index(("fsync", tmp)) < events.index(replaces[0])  # the data is on the disk before it is named
    assert events.index(replaces[0]) < events.index(("fsync", str(tmp_path)))  # and the new name after
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_atomic_directory_syncs_every_file_before_the_rename(tmp_path, events):
    final = tmp_path / "checkpoint-10"
    with canonical.atomic_directory(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 10)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "state.json").write_text("{}")
    publish = next(e for e in events if e[0] == "replace" and e[2] == str(final))
    synced = [e[1] for e in events[: events.index(publish)] if e[0] == "fsync"]
    assert {str(Path(tmp) / "model.safetensors"), str(Path(tmp) / "sub" / "state.json")} <= set(synced)
    assert (final / "sub" / "state.json").read_text() == "{}"


def test_replace_durably_syncs_a_file_another_library_wrote(tmp_path, events):
    tmp, target = tmp_path / "w.safetensors.tmp", tmp_path / "w.safetensors"
    tmp.write_bytes(b"weights")
    canonical.replace_durably(tmp, target)
    assert events[:2] == [("fsync", str(tmp)), ("replace", str(tmp), str(target))]
    assert target.read_bytes() == b"weights" and not tmp.exists()


def test_atomic_write_text_removes_the_temporaries_of_killed_writers_only(tmp_path):
    # A SIGKILLed writer cannot remove its temporary: the next write of the same file removes those of dead
    # processes (the pid is in the name), never a live writer's, nor other files.
    dead = tmp_path / f".results.json.tmp-{_dead_pid()}-abc"
    live = tmp_path / f".results.json.tmp-{os.getppid()}-xyz"  # this test's parent: alive
    other = tmp_path / f".other.json.tmp-{_dead_pid()}-abc"
    for p in (dead, live, other):
        p.write_text("partial")
    canonical.atomic_write_text(tmp_path / "results.json", "{}\n")
    assert not dead.exists() and live.exists() and other.exists()


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old\n")

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        canonical.atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_rewritten_file_keeps_the_permissions_its_owner_gave_it(tmp_path):
    import stat

    target = tmp_path / "results.json"
    canonical.atomic_write_text(target, "{}\n")
    os.chmod(target, 0o600)  # made private by its owner
    canonical.atomic_write_text(target, '{"a": 1}\n')
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_text() == '{"a": 1}\n'


def test_a_failed_sync_removes_the_temporary_folder(tmp_path, monkeypatch):
    # fsync_tree ran after the clean-up: a failure there (EIO) left a temporary as large as the output (review)
    def fail(root):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(canonical, "fsync_tree", fail)
    with pytest.raises(OSError, match="Input/output error"):
        with canonical.atomic_directory(tmp_path / "out") as tmp:
            (tmp / "data").write_text("x")
    assert list(tmp_path.iterdir()) == []


def test_symlinks_in_an_output_folder_are_not_followed_when_syncing(tmp_path):
    final = tmp_path / "out"
    with canonical.atomic_directory(final) as tmp:
        (tmp / "weights").write_text("w")
        os.symlink(tmp_path / "nowhere", tmp / "dangling")  # a dangling link failed the whole write
    assert (final / "weights").read_text() == "w" and os.path.islink(final / "dangling")


def test_a_symlink_loop_as_target_is_replaced_as_before(tmp_path):
    loop = tmp_path / "results.json"
    os.symlink(loop, loop)  # stat() fails with ELOOP; the write went on before permissions were kept
    canonical.atomic_write_text(loop, "{}\n")
    assert loop.read_text() == "{}\n" and not loop.is_symlink()


def test_temporaries_of_another_machine_are_left_alone(tmp_path):
    # On a file system shared by several machines a pid says nothing about another node's writer, which may be
    # alive: only this machine's leftovers (the host is in the name) are judged by their pid.
    from llmrec.data.canonical import _writer_tag

    pid, host = _writer_tag().split("@")
    assert pid == str(os.getpid()) and len(host) == 8
    dead = _dead_pid()
    here = tmp_path / f".results.json.tmp-{dead}@{host}-abc"
    elsewhere = tmp_path / f".results.json.tmp-{dead}@{'0' * 8 if host != '0' * 8 else '1' * 8}-abc"
    for p in (here, elsewhere):
        p.write_text("partial")
    canonical.atomic_write_text(tmp_path / "results.json", "{}\n")
    assert not here.exists() and elsewhere.exists()
    with canonical.atomic_directory(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}@{host}-")


def test_a_killed_plots_temporary_is_removed_by_the_next_plot_beside_it(tmp_path):
    """save_figure's temporaries were "tmpXXXX.png.tmp", which nothing removed after a kill (a review)."""
    pytest.importorskip("matplotlib")
    from llmrec.data.canonical import _writer_tag
    from llmrec.plotting import pyplot, save_figure

    host = _writer_tag().split("@")[1]
    left = tmp_path / f".plot.png.tmp-{_dead_pid()}@{host}-abc"
    left.write_bytes(b"partial png")
    fig = pyplot().figure()
    save_figure(fig, tmp_path / "plot.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
