"""Read ``.safetensors`` files with errors that name the file.

A truncated or overwritten file (a run killed while copying a checkpoint, a disk that filled up, a file of
another kind given the name) made safetensors raise its own ``SafetensorError`` ("incomplete metadata",
"header too small", ...): a traceback that names no file. Here such a file is a :class:`SafetensorsFileError`,
a ``ValueError`` (the CLI prints ``llmrec: error: <message>`` for it) naming the path, what is wrong and, when
the caller knows one, what to do about it (e.g. remove the checkpoint, or retrain).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


class SafetensorsFileError(ValueError):
    """A ``.safetensors`` file that cannot be read: damaged (e.g. truncated), not a safetensors file, or not a file.

    ``path`` is the file, ``problem`` what safetensors (or the system) reported.
    """

    def __init__(self, path: str | os.PathLike, problem: str, remedy: str | None = None):
        self.path, self.problem, self.remedy = str(path), problem, remedy
        message = f"{path}: damaged or not a safetensors file ({problem})"
        if remedy:
            message += f"; {remedy}"
        super().__init__(message)


def _problem(error: Exception) -> str:
    # safetensors prefixes every header problem with this; the rest ("incomplete metadata, file not fully
    # covered", "header too small", ...) is what tells a truncated file from a file of another kind.
    return str(error).removeprefix("Error while deserializing header: ") or type(error).__name__


def _is_safetensor_error(error: Exception) -> bool:
    # The class lives in the compiled module (safetensors._safetensors_rust / safetensors_rust, depending on the
    # version); matched by name so that no private import path is relied on.
    return type(error).__name__ == "SafetensorError"


def _checked(path: Path, remedy: str | None) -> None:
    """Refuse what safetensors reports unhelpfully: a missing file (its message is fine, but ours names the
    remedy too) and a directory ("No such device (os error 19)", no path)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: safetensors file not found" + (f"; {remedy}" if remedy else ""))
    if path.is_dir():
        raise SafetensorsFileError(path, "a directory, not a file", remedy)


def open_safetensors(path: str | os.PathLike, framework: str = "pt", device: str = "cpu",
                     remedy: str | None = None) -> Any:
    """``safetensors.safe_open(path, framework, device)`` (use it in a ``with`` block, as safe_open's handle).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SafetensorsFileError: ``path`` is damaged (truncated, ...), not a safetensors file, or unreadable; the
            message names it and ends with ``remedy`` when given (e.g. "remove it and retrain").
    """
    from safetensors import safe_open

    p = Path(path)
    _checked(p, remedy)
    try:
        # safe_open reads and validates the header (and that it covers the whole file) when it is created
        return safe_open(str(p), framework=framework, device=device)
    except FileNotFoundError:
        raise
    except OSError as e:  # permissions, I/O errors: safetensors' message does not name the file
        raise SafetensorsFileError(p, f"cannot be read: {e.strerror or e}", remedy) from None
    except Exception as e:
        if _is_safetensor_error(e):
            raise SafetensorsFileError(p, _problem(e), remedy) from None
        raise


def load_safetensors(path: str | os.PathLike, device: str = "cpu", remedy: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` (``safetensors.torch.load_file``) with errors that name the file.

    ``remedy`` is appended to the message of a damaged file: what the user can do about it, e.g. "remove it to
    train from scratch" for a checkpoint.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SafetensorsFileError: (a ``ValueError``) ``path`` is damaged, not a safetensors file, or unreadable.
    """
    with open_safetensors(path, "pt", device, remedy) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def check_safetensors(path: str | os.PathLike, remedy: str | None = None) -> None:
    """Read ``path``'s header (cheap) so that a damaged file is named before a library that reads it itself (peft's
    adapter loading, say) reports it without a path. A missing file is left to that library."""
    if Path(path).exists():
        with open_safetensors(path, remedy=remedy):
            pass
