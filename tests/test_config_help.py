"""``--help`` of the recipe commands lists their config fields with each field's help string."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from llmrec.cli import main
from llmrec.config_help import add_config_fields_help, config_fields_help


@dataclasses.dataclass
class _Base:
    lr: float = dataclasses.field(default=1e-3, metadata={"help": "Learning rate."})
    epochs: int = dataclasses.field(default=3, metadata={"help": "Epochs."})


@dataclasses.dataclass
class _Config(_Base):
    epochs: int = dataclasses.field(default=5, metadata={"help": "Epochs."})
    data: str = dataclasses.field(default=None, metadata={"help": "Dataset   directory\n (prepared)."})
    ks: list = dataclasses.field(default_factory=lambda: [1, 10], metadata={"help": "Cut-offs."})
    flag: bool = False
    _private: int = 0


def test_own_fields_are_described_and_changed_defaults_of_the_base_named():
    text = config_fields_help(_Config, _Base, width=200)
    lines = text.splitlines()
    assert lines[0] == "_Config fields (recipe keys, or --name value on the command line):"
    assert "  --data VALUE  (default: null)" in lines
    assert "      Dataset directory (prepared)." in lines  # whitespace of the help string normalised
    assert "  --ks VALUE [VALUE ...]  (default: [1, 10])" in lines  # a default_factory's product
    assert "  --flag true|false  (default: false)" in lines  # a field without help: its line alone
    assert "--_private" not in text and "--lr" not in text and "--epochs" not in text
    assert lines[-1].endswith("._Base field is accepted too, as a recipe key or --name value (see its "
                              "documentation), with these defaults changed here: epochs=5.")


def test_without_a_base_every_field_is_described_and_required_ones_say_so():
    @dataclasses.dataclass
    class Needs:
        path: str = dataclasses.field(metadata={"help": "Where."})

    text = config_fields_help(Needs, width=80)
    assert "  --path VALUE  (default: required)\n      Where.\n" in text
    assert "accepted too" not in text


def test_the_config_classes_are_loaded_only_when_help_is_printed():
    parser = argparse.ArgumentParser(prog="x")

    def load():
        raise AssertionError("loaded while building or parsing")

    add_config_fields_help(parser, load)
    parser.parse_args([])
    loaded = []
    add_config_fields_help(parser2 := argparse.ArgumentParser(prog="y"), lambda: loaded.append(1) or (_Config, None))
    assert "--data VALUE" in parser2.format_help() and loaded == [1]


@pytest.mark.parametrize(
    "command, module, class_name",
    [
        (["sft"], "llmrec.training.sft", "LatentSFTConfig"),
        (["grpo"], "llmrec.training.grpo", "LatentGRPOConfig"),
        (["evaluate"], "llmrec.evaluation.evaluator", "EvalConfig"),
        (["seqrec", "train"], "llmrec.seqrec.config", "SeqRecConfig"),
    ],
)
def test_every_recipe_command_lists_each_of_its_own_fields_with_its_help(command, module, class_name, capsys):
    import importlib

    config_class = getattr(importlib.import_module(module), class_name)
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"{class_name} fields (recipe keys, or --name value on the command line):" in out
    fields_text = out.split(f"{class_name} fields", 1)[1]
    bases = [b for b in config_class.__mro__[1:] if dataclasses.is_dataclass(b) and not b.__module__.startswith("llmrec")]
    inherited = {f.name for f in dataclasses.fields(bases[0])} if bases else set()
    own = [f for f in dataclasses.fields(config_class) if f.init and f.name not in inherited]
    assert own
    options_text = out.split(f"{class_name} fields", 1)[0]
    for f in own:
        if f"  --{f.name} " in options_text:  # an option of the command itself (evaluate --checkpoint): there only
            assert f"--{f.name} " not in fields_text, f.name
            continue
        assert re.search(rf"^  --{f.name} (VALUE|VALUE \[VALUE \.\.\.\]|true\|false)  \(default: ", fields_text,
                         re.MULTILINE), f.name
        first_words = " ".join(str(f.metadata.get("help", "")).split()[:3])
        assert first_words in " ".join(fields_text.split()), f.name


def test_grpo_help_does_not_offer_the_fields_it_refuses(capsys):
    from llmrec.training.grpo import IGNORED_TRL_FIELDS, NO_EFFECT_FIELDS

    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    tail = " ".join(capsys.readouterr().out.split("LatentGRPOConfig fields", 1)[1].split())
    assert "(but the ones refused: see above)" in tail
    for name in set(IGNORED_TRL_FIELDS) | set(NO_EFFECT_FIELDS):  # bf16=false was listed as a changed default
        assert f" {name}=" not in tail and f"--{name} " not in tail, name


def test_docstring_example():
    import doctest

    import llmrec.config_help

    assert doctest.testmod(llmrec.config_help).failed == 0


def test_the_top_level_help_is_plain_text(capsys):
    """It showed the module docstring's first line, RST markup included ("The ``llmrec`` command.")."""
    import pytest

    from llmrec.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "sequential recommenders" in out
