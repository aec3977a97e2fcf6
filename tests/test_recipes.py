"""Every recipe in recipes/ loads against its config schema (so recipes never rot), and every
recipe opens with a comment giving the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmrec.config import parse_config
from llmrec.resources import resource_dir

RECIPES = sorted(resource_dir("recipes").rglob("*.yaml"))


def schema_for(path: Path):
    name, folder = path.name, path.parent.name
    if folder == "seqrec":
        from llmrec.seqrec.config import SeqRecConfig

        return [SeqRecConfig]
    if name.startswith("eval"):
        from llmrec.evaluation.evaluator import EvalConfig

        return [EvalConfig]
    if name.startswith("sft"):
        from llmrec.training.sft import LatentSFTConfig

        return [LatentSFTConfig]
    if name.startswith("grpo"):
        from llmrec.training.grpo import LatentGRPOConfig

        return [LatentGRPOConfig]
    raise AssertionError(f"no schema known for recipe {path}")


def test_there_are_recipes():
    assert len(RECIPES) >= 10


@pytest.mark.parametrize("path", [p for p in RECIPES if p.parent.name != "accelerate"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_loads_against_its_schema(path):
    configs = parse_config(schema_for(path), path)
    assert len(configs) == 1
    assert path.read_text(encoding="utf-8").lstrip().startswith("#"), "a recipe opens with its launch command"


@pytest.mark.parametrize("path", [p for p in RECIPES if p.parent.name == "accelerate"], ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(yaml_file=str(path))
    assert cfg.num_processes >= 1
    assert "accelerate launch --config_file" in path.read_text(encoding="utf-8")
