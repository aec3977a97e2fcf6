"""``llmrec.safetensors_io``: damaged ``.safetensors`` files are errors naming the file, not safetensors' own
``SafetensorError`` ("incomplete metadata") naming none."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmrec.safetensors_io import SafetensorsFileError, load_safetensors, open_safetensors


def _saved(path: Path) -> bytes:
    from safetensors.torch import save_file

    save_file({"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2, dtype=torch.int64)}, str(path),
              metadata={"kind": "test"})
    return path.read_bytes()


def test_a_whole_file_loads_as_safetensors_does(tmp_path):
    from safetensors.torch import load_file

    p = tmp_path / "ok.safetensors"
    _saved(p)
    got, want = load_safetensors(p), load_file(str(p))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with open_safetensors(p) as f:
        assert f.metadata() == {"kind": "test"} and sorted(f.keys()) == ["b", "w"]


@pytest.mark.parametrize("damage,problem", [
    (lambda b: b[: len(b) - 7], "incomplete metadata"),  # cut while copied: the header promises more data
    (lambda b: b[:20], "invalid header length"),
    (lambda b: b"", "header too small"),
    (lambda b: b"not a safetensors file at all, just some text", "header too large"),
    (lambda b: b + b"junk", "incomplete metadata"),
])
def test_a_damaged_file_is_named(tmp_path, damage, problem):
    p = tmp_path / "last-0.safetensors"
    p.write_bytes(damage(_saved(p)))
    with pytest.raises(SafetensorsFileError) as caught:
        load_safetensors(p, remedy="remove it and train again")
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)  # the CLI prints it as `llmrec: error: ...`, no traceback
    assert message.startswith(f"{p}: damaged or not a safetensors file (")
    assert problem in message and message.endswith("; remove it and train again")
    assert "Error while deserializing header" not in message
    with pytest.raises(SafetensorsFileError, match="damaged or not a safetensors file"):
        open_safetensors(p)


def test_a_missing_file_or_a_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope.safetensors'}: safetensors file not found; retrain"):
        load_safetensors(tmp_path / "nope.safetensors", remedy="retrain")
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(SafetensorsFileError, match="d.safetensors: damaged or not a safetensors file \\(a directory"):
        load_safetensors(tmp_path / "d.safetensors")  # safetensors said "No such device (os error 19)", no path
