"""Matplotlib without a display, and figures written atomically (the reports' PNG plots)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed: reports are written on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Write ``fig`` as PNG to ``path`` through a temporary file and a durable rename (never half-written), then
    close it."""
    from llmrec.data.canonical import (
        _remove_leftovers,
        _writer_tag,
        give_default_permissions,
        replace_durably,
    )

    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named as atomic_write_text's temporaries (writer's pid and host), so a killed plot's file is removed by the
    # next write beside it; "tmpXXXX.png.tmp" names were never removed (a review).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{_writer_tag()}-")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        give_default_permissions(tmp)  # mkstemp's 0600 would make the report's plot private
        replace_durably(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    _remove_leftovers(path)
