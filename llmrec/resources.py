"""Locate files shipped beside the package: prompt templates, recipes and the embedded data sample.

A regular install carries copies of the repository's top-level ``prompts/`` and ``recipes/`` in
``llmrec/_resources`` (see setup.py); an editable install or a source checkout reads the top-level
folders directly.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """Return the directory holding ``name`` ("prompts" or "recipes")."""
    installed = PACKAGE_DIR / "_resources" / name
    if installed.is_dir():
        return installed
    source = PACKAGE_DIR.parent / name
    if source.is_dir():
        return source
    raise FileNotFoundError(
        f"llmrec resource folder '{name}' not found (looked in {installed} and {source}); "
        "reinstall the package with `pip install .`"
    )


def resolve_resource(path: str | Path, kind: str) -> Path:
    """Resolve ``path`` as given, else relative to the shipped ``kind`` folder.

    ``resolve_resource("recipes/games/eval.yaml", "recipes")`` works from any working directory.
    """
    p = Path(path)
    if p.exists():
        return p
    base = resource_dir(kind)
    parts = p.parts[1:] if p.parts and p.parts[0] == kind else p.parts
    candidate = base.joinpath(*parts) if parts else base
    if candidate.exists():
        return candidate
    raise FileNotFoundError(f"{kind[:-1]} file '{path}' not found (also looked in {base})")
