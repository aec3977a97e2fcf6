"""Config schema: YAML recipes + command-line overrides parsed into dataclasses (llmrec.config)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from llmrec.config import ConfigError, check_keys, field_defaults, parse_config, read_recipe, to_dict


@dataclass
class DataCfg:
    dataset: str = field(metadata={"help": "prepared dataset directory"})
    max_history: int = field(default=10, metadata={"help": "history items kept"})
    noun: str = field(default="items", metadata={"help": "noun used in the prompt"})


@dataclass
class TrainCfg:
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    epochs: int = field(default=1, metadata={"help": "training epochs"})
    use_chat_template: bool = field(default=False, metadata={"help": "wrap prompts in the chat template"})
    ks: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={"help": "cut-offs of the metrics"})
    note: str | None = field(default=None, metadata={"help": "free text"})
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "compute dtype"})


CLASSES = [DataCfg, TrainCfg]


def recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_field_defaults_call_default_factories_and_leave_out_required_fields():
    assert field_defaults(DataCfg) == {"max_history": 10, "noun": "items"}  # `dataset` has no default
    defaults = field_defaults(TrainCfg)
    assert defaults["ks"] == [1, 5, 10] and defaults["note"] is None and defaults["epochs"] == 1
    assert defaults["ks"] is not field_defaults(TrainCfg)["ks"]  # a fresh list each call, as the dataclass gives


def test_recipe_only(tmp_path: Path):
    p = recipe(tmp_path, "dataset: data/games\nepochs: 3\nks: [1, 3]\nuse_chat_template: true\nnote: hi\n")
    data, train = parse_config(CLASSES, p)
    assert data == DataCfg(dataset="data/games", max_history=10, noun="items")
    assert train == TrainCfg(epochs=3, ks=[1, 3], use_chat_template=True, note="hi")


def test_recipe_plus_cli_overrides(tmp_path: Path):
    p = recipe(tmp_path, "dataset: data/games\nepochs: 3\nlearning_rate: 0.001\nnoun: video games\n")
    data, train = parse_config(CLASSES, p, ["--epochs", "5", "--ks", "1", "20", "--use_chat_template", "true",
                                            "--dtype", "bfloat16"])
    # the recipe's required field is not demanded again on the command line; the rest keep the recipe's values
    assert data == DataCfg(dataset="data/games", noun="video games")
    assert train.epochs == 5 and train.ks == [1, 20] and train.use_chat_template is True
    assert train.learning_rate == 0.001 and train.dtype == "bfloat16"
    # a CLI value beats the recipe's; the recipe beats the dataclass default
    data, _ = parse_config(CLASSES, p, ["--dataset", "other", "--max_history", "7"])
    assert data.dataset == "other" and data.max_history == 7 and data.noun == "video games"


def test_cli_only_and_extra(tmp_path: Path):
    data, train = parse_config(CLASSES, None, ["--dataset", "d", "--learning_rate", "2e-5"])
    assert data.dataset == "d" and train.learning_rate == pytest.approx(2e-5)
    # a negative number in scientific notation is a value, not an option (argparse before 3.13)
    for value in ("-1e-5", "-1E-5", "-.5", "-2", "-inf"):
        _, train = parse_config(CLASSES, None, ["--dataset", "d", "--learning_rate", value, "--epochs", "2"])
        assert train.learning_rate == float(value) and train.epochs == 2
    p = recipe(tmp_path, "dataset: d\nepochs: 2\n")
    _, train = parse_config(CLASSES, p, None, extra={"epochs": 4})
    assert train.epochs == 4
    _, train = parse_config(CLASSES, p, ["--epochs", "6"], extra={"epochs": 4})
    assert train.epochs == 6
    with pytest.raises(ConfigError, match=r"arguments: unknown option\(s\) 'epoch' \(did you mean 'epochs'\?\)"):
        parse_config(CLASSES, p, None, extra={"epoch": 4})


def test_recipe_values_are_typed_like_the_command_line(tmp_path: Path):
    # YAML 1.1 reads "1e-4" as a string: it must still land in the float field as a float
    p = recipe(tmp_path, "dataset: d\nlearning_rate: 1e-4\nepochs: '3'\n")
    _, train = parse_config(CLASSES, p)
    assert train.learning_rate == pytest.approx(1e-4) and isinstance(train.learning_rate, float)
    assert train.epochs == 3
    _, train2 = parse_config(CLASSES, p, ["--note", "x"])
    assert train2.learning_rate == train.learning_rate and train2.epochs == 3
    bad = recipe(tmp_path, "dataset: d\nepochs: three\n", "bad.yaml")
    for args in (None, ["--note", "x"]):
        with pytest.raises(ConfigError, match=r"bad.yaml: option 'epochs': cannot read 'three'"):
            parse_config(CLASSES, bad, args)
    bad = recipe(tmp_path, "dataset: d\ndtype: float16\n", "bad2.yaml")
    with pytest.raises(ConfigError, match=r"bad2.yaml: option 'dtype': 'float16' is not one of"):
        parse_config(CLASSES, bad)


def test_a_number_given_to_a_text_field_keeps_the_text_the_recipe_wrote(tmp_path: Path):
    """YAML 1.1 reads `0123` as octal 83, `0x10` as 16 and `1:30` as 90: text fields got str() of the number
    (`output_dir: 0123` wrote to '83'). Numeric fields still read the numbers, and no value keeps the YAML
    number's wrapper type."""
    p = recipe(tmp_path, "dataset: 0123\nnoun: 0x10\nnote: 1:30\nmax_history: 0x10\nlearning_rate: 1e-3\n"
                         "ks: [010, 10]\n", "numbers.yaml")
    data, train = parse_config(CLASSES, p)
    assert (data.dataset, data.noun, train.note) == ("0123", "0x10", "1:30")
    assert data.max_history == 16 and train.ks == [8, 10] and train.learning_rate == 1e-3
    assert type(data.max_history) is int and type(train.learning_rate) is float
    assert [type(k) for k in train.ks] == [int, int]
    p = recipe(tmp_path, "dataset: 1.50\nnote: .inf\n", "floats.yaml")
    data, train = parse_config(CLASSES, p)
    assert (data.dataset, train.note) == ("1.50", ".inf")
    # read_recipe gives plain values (scripts build configs from it directly); key=value pairs of the bench
    # commands read numbers as recipes do.
    assert [type(v) for v in read_recipe(tmp_path / "numbers.yaml").values()] == [int, int, int, int, float, list]
    from llmrec.bench_pipeline import _pairs
    from llmrec.config import coerce_fields

    assert coerce_fields(CLASSES, _pairs(["noun=0x10", "max_history=0x10"], "--sft"), "--sft") == {
        "noun": "0x10", "max_history": 16}


def test_yaml_values_of_the_wrong_type_and_repeated_keys_are_errors(tmp_path: Path):
    """Non-string YAML values are checked against the field as the command line would read them, and a key given
    twice is an error (plain YAML keeps the last one silently)."""
    p = recipe(tmp_path, "dataset: 1942\nks: 3\nlearning_rate: 1\nepochs: 2.0\n")
    data, train = parse_config(CLASSES, p)
    assert data.dataset == "1942" and train.ks == [3] and train.learning_rate == 1.0 and train.epochs == 2
    assert isinstance(train.learning_rate, float)
    for i, (text, why) in enumerate((("learning_rate: true", "expected a number"),
                                     ("epochs: 1.5", "expected an integer"),
                                     ("ks: [1.5]", "expected an integer"),
                                     ("noun: [a, b]", "expected one value"),
                                     ("noun: yes", "expected a string"),
                                     ("use_chat_template: 2", "expected true or false"),
                                     ("use_chat_template: 0.5", "expected true or false"))):
        bad = recipe(tmp_path, f"dataset: d\n{text}\n", f"bad{i}.yaml")
        with pytest.raises(ConfigError, match=rf"bad{i}.yaml: option '\w+': cannot read .*{why}"):
            parse_config(CLASSES, bad)
    # null only where the field admits None
    _, train = parse_config(CLASSES, recipe(tmp_path, "dataset: d\nnote: null\n", "none.yaml"))
    assert train.note is None
    for extra_args in (None, ["--epochs", "2"]):
        with pytest.raises(ConfigError, match=r"null.yaml: option 'learning_rate': null is not allowed"):
            parse_config(CLASSES, recipe(tmp_path, "dataset: d\nlearning_rate: null\n", "null.yaml"), extra_args)
    with pytest.raises(ConfigError, match=r"arguments: option 'epochs': null is not allowed"):
        parse_config(CLASSES, None, ["--dataset", "d"], extra={"epochs": None})
    twice = recipe(tmp_path, "dataset: d\nepochs: 1\nepochs: 2\n", "twice.yaml")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML .*option 'epochs' is given twice \(lines 2 and 3\)"):
        parse_config(CLASSES, twice)


def test_unknown_recipe_key_names_file_key_and_suggestion(tmp_path: Path):
    p = recipe(tmp_path, "dataset: d\nlearning_rat: 0.1\nzzz_unrelated: 1\n")
    with pytest.raises(ConfigError) as e:
        parse_config(CLASSES, p)
    msg = str(e.value)
    assert msg.startswith(str(p))
    assert "'learning_rat' (did you mean 'learning_rate'?)" in msg
    assert "'zzz_unrelated'" in msg and "'zzz_unrelated' (did you mean" not in msg


def test_unknown_cli_option(tmp_path: Path):
    p = recipe(tmp_path, "dataset: d\n")
    with pytest.raises(ConfigError, match=r"unknown command-line option\(s\): --bogus 1"):
        parse_config(CLASSES, p, ["--bogus", "1"])
    # no abbreviations: "--epoch" is not "--epochs"
    with pytest.raises(ConfigError, match=r"--epoch 3; --epoch \(did you mean --epochs\?\)$"):
        parse_config(CLASSES, p, ["--epoch", "3"])  # a typo gets the suggestion a recipe's key gets
    with pytest.raises(ConfigError, match=r"--bogus 1$"):  # nothing close: no suggestion
        parse_config(CLASSES, p, ["--bogus", "1"])
    with pytest.raises(ConfigError, match=r"^command line: argument --epochs: invalid int value: 'many'$"):
        parse_config(CLASSES, p, ["--epochs", "many"])


def test_a_bad_override_is_one_line_without_the_usage_of_every_field(tmp_path: Path, capsys):
    # argparse printed the usage of every field (hundreds of lines with TrainingArguments) before the message
    from llmrec.cli import main

    p = recipe(tmp_path, "dataset_dir: d\n")
    assert main(["seqrec", "train", "--config", str(p), "--epochs", "abc"]) == 1
    err = capsys.readouterr().err
    assert err == "llmrec: error: command line: argument --epochs: invalid int value: 'abc'\n"


def test_missing_required_field(tmp_path: Path):
    p = recipe(tmp_path, "epochs: 2\n")
    with pytest.raises(ConfigError, match="recipe.yaml"):
        parse_config(CLASSES, p)


def test_yaml_is_loaded_safely(tmp_path: Path):
    marker = tmp_path / "PWNED"
    p = recipe(tmp_path, f"dataset: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config(CLASSES, p)
    assert not marker.exists()
    p = recipe(tmp_path, "dataset: !!python/object:collections.OrderedDict {}\n", "obj.yaml")
    with pytest.raises(ConfigError, match=r"obj.yaml: not valid YAML.*python/object"):
        read_recipe(p)


def test_an_alias_bomb_gives_a_short_error(tmp_path: Path):
    # ~300 bytes of YAML aliases nest into a value whose full repr has 10^6 items (~6 MB): the message stays short.
    parts = ["&a0 [" + ", ".join(["x"] * 10) + "]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 6)]
    p = recipe(tmp_path, "dataset: d\nepochs: [" + ", ".join(parts) + "]\n")
    with pytest.raises(ConfigError, match="option 'epochs': cannot read") as err:
        parse_config(CLASSES, p)
    assert len(str(err.value)) < 1000 + len(str(p))


def test_read_recipe_errors_and_shipped_recipes(tmp_path: Path, monkeypatch):
    with pytest.raises(ConfigError, match="not found"):
        read_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        read_recipe(recipe(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_recipe(recipe(tmp_path, "a: [1, 2\n"))
    # an empty recipe (or one cut off to nothing) is refused, not read as "all defaults"; so is a directory
    with pytest.raises(ConfigError, match="the recipe is empty"):
        read_recipe(recipe(tmp_path, "# only a comment\n"))
    with pytest.raises(ConfigError, match="is a directory"):
        read_recipe(tmp_path)
    # shipped recipes resolve from any working directory
    monkeypatch.chdir(tmp_path)
    shipped = read_recipe("recipes/games/eval.yaml")
    assert shipped["prompt"] == "d3" and shipped["ks"] == [1, 3, 5, 10, 20]
    assert read_recipe("games/eval.yaml") == shipped


def test_check_keys_and_to_dict():
    check_keys({"dataset": "d", "epochs": 1}, CLASSES, "x")
    with pytest.raises(ConfigError, match="^x: unknown option"):
        check_keys({"epoch": 1}, CLASSES, "x")
    d = to_dict(DataCfg(dataset="d"), TrainCfg(note=None))
    assert d == {"dataset": "d", "max_history": 10, "noun": "items", "learning_rate": 1e-4, "epochs": 1,
                 "use_chat_template": False, "ks": [1, 5, 10], "note": None, "dtype": "float32"}
    assert to_dict(DataCfg(dataset=Path("a/b")))["dataset"] == "a/b"


@pytest.mark.parametrize("key", ["on", "yes", "1"])
def test_a_key_yaml_reads_as_a_boolean_or_a_number_is_a_config_error(tmp_path: Path, key):
    """`on:` is True and `1:` is 1 in YAML 1.1: they crashed in the suggestion code with a TypeError."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{key}: 3\n")
    with pytest.raises(ConfigError, match="option names must be text"):
        read_recipe(recipe)


def test_abbreviated_options_are_refused_on_every_command(capsys):
    """`llmrec evaluate --check ck` was read as --checkpoint, `bench seqrec --seed 7` as --seeds 7."""
    from llmrec.cli import build_parser, main

    assert main(["evaluate", "--check", "ck"]) != 0
    assert "--check" in capsys.readouterr().err

    def parsers(p):
        yield p
        for action in p._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for sub in action.choices.values():
                    yield from parsers(sub)

    assert all(not p.allow_abbrev for p in parsers(build_parser()))


@dataclass
class OptCfg:
    """Optional, list and dict fields typed the way transformers' TrainingArguments types them."""

    max_rows: int | None = field(default=None, metadata={"help": "row cap (None = all)"})
    checkpoint: str | None = field(default=None, metadata={"help": "checkpoint directory"})
    weights: list[float] = field(default_factory=lambda: [1.0], metadata={"help": "reward weights"})
    tokens: list[str] | None = field(default=None, metadata={"help": "added tokens"})
    scheduler_kwargs: dict | str | None = field(default=None, metadata={"help": "like lr_scheduler_kwargs"})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "like report_to"})
    backend: str | None = field(default=None, metadata={"help": "like ddp_backend", "choices": ["nccl", "gloo"]})


OPT = [DataCfg, TrainCfg, OptCfg]


def test_null_on_the_command_line_clears_an_optional_field(tmp_path: Path):
    """`--max_rows null` was "invalid int value" and `--checkpoint null` the path "null": the null words read as a
    YAML null does, for a field that admits None."""
    p = recipe(tmp_path, "dataset: d\nmax_rows: 5\ncheckpoint: runs/x\ntokens: [a]\nbackend: gloo\n")
    for word in ("null", "Null", "NULL", "~", "None"):
        *_, opt = parse_config(OPT, p, ["--max_rows", word, "--checkpoint", word, "--tokens", word,
                                        "--backend", word])
        assert (opt.max_rows, opt.checkpoint, opt.tokens, opt.backend) == (None, None, None, None), word
    *_, opt = parse_config(OPT, p, ["--max_rows", "3", "--backend", "nccl"])
    assert opt.max_rows == 3 and opt.checkpoint == "runs/x" and opt.tokens == ["a"] and opt.backend == "nccl"
    # the same words in a recipe (YAML reads `None` as text) and through `extra` (`llmrec evaluate --checkpoint`)
    *_, opt = parse_config(OPT, recipe(tmp_path, "dataset: d\ncheckpoint: None\nmax_rows: None\n", "n.yaml"))
    assert opt.checkpoint is None and opt.max_rows is None
    *_, opt = parse_config(OPT, p, None, extra={"checkpoint": "null"})
    assert opt.checkpoint is None
    # not "none" (transformers' report_to: no integrations) nor "" (an empty string, as `key: ''`)
    *_, opt = parse_config(OPT, p, ["--report_to", "none", "--checkpoint", ""])
    assert opt.report_to == "none" and opt.checkpoint == ""
    with pytest.raises(ConfigError, match="argument --epochs: invalid int value: 'null'"):  # a field that needs a value
        parse_config(OPT, p, ["--epochs", "null"])
    with pytest.raises(ConfigError, match=r"command line: option 'tokens': null is not a list item"):
        parse_config(OPT, p, ["--tokens", "a", "null"])
    with pytest.raises(ConfigError, match=r"l.yaml: option 'tokens': cannot read \[None\] \(null is not a list item"):
        parse_config(OPT, recipe(tmp_path, "dataset: d\ntokens: [null]\n", "l.yaml"))
    with pytest.raises(ConfigError, match=r"c.yaml: option 'backend': 'mpi' is not one of \['nccl', 'gloo'\]"):
        parse_config(OPT, recipe(tmp_path, "dataset: d\nbackend: mpi\n", "c.yaml"))


@pytest.mark.parametrize("values", [["-0.5", "1.0"], ["1.0", "-1e-1"], ["-1e-1", "-2"], ["-inf", "-.5", "3"],
                                    ["-1E+2"]])
def test_negative_numbers_are_values_of_a_list_option(tmp_path: Path, values):
    """`--weights -0.5 1.0` was "unknown command-line option(s): 1.0" and `--weights 1.0 -1e-1` took -1e-1 for an
    option; the same list in YAML parsed."""
    *_, opt = parse_config(OPT, None, ["--dataset", "d", "--weights", *values, "--max_rows", "-3"])
    assert opt.weights == [float(v) for v in values] and opt.max_rows == -3
    yaml_list = recipe(tmp_path, f"dataset: d\nweights: [{', '.join(values)}]\n")
    if "-inf" not in values:  # YAML's infinity is .inf
        assert parse_config(OPT, yaml_list)[2].weights == opt.weights
    # an option is still an option, after negative numbers too
    _, train, opt = parse_config(OPT, None, ["--dataset", "d", "--weights", *values, "--epochs", "2"])
    assert train.epochs == 2 and opt.weights == [float(v) for v in values]
    with pytest.raises(ConfigError, match=r"unknown command-line option\(s\): -x"):
        parse_config(OPT, None, ["--dataset", "d", "--weights", *values, "-x"])


def test_the_llmrec_command_passes_negative_list_values_on_in_order():
    from llmrec.cli import build_parser

    args, rest = build_parser().parse_known_args(["grpo", "--reward_weights", "-0.5", "-1e-1", "1", "--seed", "-2"])
    assert rest == ["--reward_weights", "-0.5", "-1e-1", "1", "--seed", "-2"]


def test_yaml_mappings_and_lists_where_the_type_admits_them(tmp_path: Path):
    """`lr_scheduler_kwargs: {num_cycles: 2}` and `report_to: [tensorboard]` were refused ("expected one value, got
    a dict"/"a list") although transformers types them `dict | str | None` and `None | str | list[str]`."""
    p = recipe(tmp_path, "dataset: d\nscheduler_kwargs: {num_cycles: 2, inner: {a: 1}}\nreport_to: [tensorboard, 3]\n")
    for args in (None, ["--max_rows", "1"]):
        *_, opt = parse_config(OPT, p, args)
        assert opt.scheduler_kwargs == {"num_cycles": 2, "inner": {"a": 1}}
        assert opt.report_to == ["tensorboard", "3"]  # read item by item, as the command line would
    *_, opt = parse_config(OPT, p, ["--scheduler_kwargs", '{"x": 1}', "--report_to", "wandb"])
    assert opt.scheduler_kwargs == '{"x": 1}' and opt.report_to == "wandb"  # text: TrainingArguments reads the JSON
    for i, (text, why) in enumerate((
            ("noun: {a: 1}", r"'noun': cannot read \{'a': 1\} \(expected one value of type str, got a mapping\)"),
            ("max_rows: [1]", r"'max_rows': cannot read \[1\] \(expected one value of type int \| None, got a list"),
            ("report_to: {a: 1}", r"'report_to': .*expected one value or a list of type None \| str \| list\[str\], "
                                  "got a mapping"),
            ("scheduler_kwargs: [1]", r"'scheduler_kwargs': .*expected one value of type dict \| str \| None, got a "
                                      "list"),
            ("report_to: [[a]]", r"'report_to': .*expected one value of type str, got a list"),
            ("weights: [{a: 1}]", r"'weights': .*expected one value of type float, got a mapping"))):
        with pytest.raises(ConfigError, match=rf"bad{i}.yaml: option {why}"):
            parse_config(OPT, recipe(tmp_path, f"dataset: d\n{text}\n", f"bad{i}.yaml"))


def test_transformers_dict_and_list_fields_from_a_recipe(tmp_path: Path):
    from transformers import TrainingArguments

    p = recipe(tmp_path, f"output_dir: {tmp_path / 'out'}\nlr_scheduler_kwargs: {{num_cycles: 2}}\n"
                         "report_to: [tensorboard]\n")
    (args,) = parse_config([TrainingArguments], p)
    assert args.lr_scheduler_kwargs == {"num_cycles": 2} and args.report_to == ["tensorboard"]


def test_a_key_given_twice_on_the_command_line_is_an_error(tmp_path: Path):
    """`--ks 1 --ks 5` gave [5]: argparse keeps the last occurrence silently (a recipe refuses a repeated key)."""
    p = recipe(tmp_path, "dataset: d\nks: [3]\n")
    for args, shown in ((["--ks", "1", "--ks", "5"], "'ks' is given twice: "),
                        (["--epochs=1", "--epochs", "2"], "'epochs' is given twice: "),
                        (["--max_history", "1", "--max-history", "2"],
                         "'max_history' is given twice (as --max_history and --max-history)")):
        with pytest.raises(ConfigError, match=rf"^command line: option {re.escape(shown)}"):
            parse_config(CLASSES, p, args)
    _, train = parse_config(CLASSES, p, ["--ks", "1", "5"])  # once, over the recipe's: fine
    assert train.ks == [1, 5]


def test_evaluate_checkpoint_and_config_given_explicitly(tmp_path: Path, monkeypatch, capsys):
    """`llmrec evaluate --checkpoint ""` silently kept the recipe's checkpoint (`if args.checkpoint`), `--checkpoint
    null` was the path "null", and a second `--config` replaced the first silently."""
    import llmrec.dry_run
    from llmrec.cli import main
    from llmrec.evaluation.evaluator import EvalConfig

    p = recipe(tmp_path, "checkpoint: runs/x\nmax_rows: 3\n")
    seen = []

    def fake_dry_run(stage, args, extra=None):
        seen.append(parse_config([EvalConfig], args.config, args.overrides, extra=extra)[0])
        return 0

    monkeypatch.setattr(llmrec.dry_run, "maybe_dry_run", fake_dry_run)
    assert main(["evaluate", "--config", str(p), "--checkpoint", "null"]) == 0
    assert seen[-1].checkpoint is None
    assert main(["evaluate", "--config", str(p), "--checkpoint", "runs/y"]) == 0
    assert seen[-1].checkpoint == "runs/y"
    for argv, why in ((["--checkpoint", ""], "argument --checkpoint: empty: give a checkpoint directory, or null"),
                      (["--checkpoint", "a", "--checkpoint", "b"], "--checkpoint is given twice"),
                      (["--config", "b.yaml"], f"--config is given twice ('{p}' and 'b.yaml')")):
        with pytest.raises(SystemExit):
            main(["evaluate", "--config", str(p), *argv])
        assert why in capsys.readouterr().err
    assert len(seen) == 2


@pytest.mark.parametrize(
    "module, class_name, field_name",
    [("llmrec.evaluation.evaluator", "EvalConfig", "dtype"), ("llmrec.training.sft", "LatentSFTConfig", "model_dtype"),
     ("llmrec.training.grpo", "LatentGRPOConfig", "model_dtype")],
)
def test_an_unknown_dtype_is_refused_when_the_config_is_read(module, class_name, field_name, tmp_path):
    # It was accepted, and refused only when the model was about to load (after the data).
    import importlib

    cls = getattr(importlib.import_module(module), class_name)
    kwargs = {"output_dir": str(tmp_path)}
    with pytest.raises(ValueError, match=rf"^{field_name}: unsupported dtype 'bogus'; use one of"):
        cls(**kwargs, **{field_name: "bogus"})
    assert getattr(cls(**kwargs, **{field_name: "float32"}), field_name) == "float32"


def test_yaml_merge_keys_are_defaults_the_mapping_overrides(tmp_path: Path):
    # `<<: *anchor` was refused ("could not determine a constructor for the tag ...merge")
    text = ("base: &b\n  x: 1\n  y: 2\nmore: &m\n  z: 3\n"
            "run:\n  <<: *b\n  y: 5\nboth:\n  <<: [*b, *m]\n  x: 0\n")
    data = read_recipe(recipe(tmp_path, text))
    assert data["run"] == {"x": 1, "y": 5} and data["both"] == {"x": 0, "y": 2, "z": 3}
    # an anchor that merges itself, merged by a mapping read before it (its keys were checked after the merge)
    nested = "a: &a {x: 1}\nouter: {b: &b {<<: *a, x: 3}}\nd: {<<: *b}\n"
    assert read_recipe(recipe(tmp_path, nested, "nested.yaml")) == {"a": {"x": 1}, "outer": {"b": {"x": 3}},
                                                                      "d": {"x": 1}}
    # a key given twice by the mapping itself is still refused, and so is a second `<<`
    with pytest.raises(ConfigError, match="option 'y' is given twice"):
        read_recipe(recipe(tmp_path, "base: &b\n  x: 1\nrun:\n  <<: *b\n  y: 5\n  y: 6\n", "twice.yaml"))
    with pytest.raises(ConfigError, match="'<<' is given twice"):
        read_recipe(recipe(tmp_path, "base: &b\n  x: 1\nrun:\n  <<: *b\n  <<: *b\n", "twice2.yaml"))


def test_numbers_with_an_exponent_inside_a_mapping_option_are_numbers(tmp_path: Path):
    # PyYAML (YAML 1.1) reads 1e-6 as text; a mapping option keeps its values as given, so {min_lr: 1e-6} reached
    # the LR scheduler as the string "1e-6". As in YAML 1.2, unquoted ones are numbers; quoted ones stay text.
    from llmrec.training.sft import LatentSFTConfig

    text = ("output_dir: out\nlr_scheduler_type: cosine_with_min_lr\nmax_steps: 1e3\n"
            "lr_scheduler_kwargs: {min_lr: 1e-6, nested: {a: [2E5, -.5e+2]}, name: cosine, v: 1.5, n: 3, "
            "q: '1e5', w: 12e3x}\n")
    (cfg,) = parse_config([LatentSFTConfig], recipe(tmp_path, text))
    kwargs = cfg.lr_scheduler_kwargs
    assert kwargs == {"min_lr": 1e-6, "nested": {"a": [2e5, -50.0]}, "name": "cosine", "v": 1.5, "n": 3,
                      "q": "1e5", "w": "12e3x"}
    assert isinstance(kwargs["min_lr"], float) and isinstance(kwargs["n"], int)
    assert cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)  # an integer field given 1e3
    import yaml

    assert yaml.safe_load("a: 1e-6") == {"a": "1e-6"}  # PyYAML's own loader is left as it is


def test_a_mapping_option_in_recipe_form_on_the_command_line_names_the_option_and_the_json_form(tmp_path: Path):
    """`--lr_scheduler_kwargs "{num_cycles: 2}"` (the recipe's YAML form) failed inside TrainingArguments with a bare
    JSON error ("Expecting property name enclosed in double quotes") naming neither the option nor the form."""
    from transformers import TrainingArguments

    for args in (["--lr_scheduler_kwargs", "{num_cycles: 2}"], ["--lr-scheduler-kwargs={num_cycles: 2}"]):
        with pytest.raises(ConfigError, match=r"lr_scheduler_kwargs.*expects a JSON mapping .*'\{\"num_cycles\": 2\}'"):
            parse_config([TrainingArguments], None, ["--output_dir", str(tmp_path / "o"), *args])
    (ok,) = parse_config([TrainingArguments], None, ["--output_dir", str(tmp_path / "o"), "--lr_scheduler_kwargs",
                                                     '{"num_cycles": 2}'])
    assert ok.lr_scheduler_kwargs == {"num_cycles": 2}
    # the same text quoted in a recipe; text that is no mapping (fsdp_config: a path) and null still pass
    with pytest.raises(ConfigError, match=r"r.yaml: option 'scheduler_kwargs': .*expects a JSON mapping"):
        parse_config(OPT, recipe(tmp_path, "dataset: d\nscheduler_kwargs: '{num_cycles: 2}'\n", "r.yaml"))
    *_, opt = parse_config(OPT, recipe(tmp_path, "dataset: d\n"), ["--scheduler_kwargs", "cfg/fsdp.json"])
    assert opt.scheduler_kwargs == "cfg/fsdp.json"
    *_, opt = parse_config(OPT, recipe(tmp_path, "dataset: d\n"), ["--scheduler_kwargs", "null"])
    assert opt.scheduler_kwargs is None


def test_the_command_line_and_a_recipe_read_integers_and_booleans_alike(tmp_path: Path):
    """`epochs: 2.0` was read as 2 in a recipe but `--epochs 2.0` refused; `--use_chat_template 1` was read as true
    (transformers' parser) but `use_chat_template: 1` refused (a review): one rule for both now."""
    p = recipe(tmp_path, "dataset: d\nepochs: 2.0\nuse_chat_template: 1\n")
    _, train = parse_config(CLASSES, p)
    assert train.epochs == 2 and train.use_chat_template is True
    _, train = parse_config(CLASSES, recipe(tmp_path, "dataset: d\n", "plain.yaml"),
                            ["--epochs", "3.0", "--ks", "1", "1e1", "--use_chat_template", "0"])
    assert (train.epochs, train.ks, train.use_chat_template) == (3, [1, 10], False)
    assert isinstance(train.epochs, int) and all(isinstance(k, int) for k in train.ks)
    for value in ("1.5", "nan", "many"):
        with pytest.raises(ConfigError, match=rf"argument --epochs: invalid int value: '{value}'"):
            parse_config(CLASSES, p, ["--epochs", value])
    with pytest.raises(ConfigError, match="expected true or false"):
        parse_config(CLASSES, recipe(tmp_path, "dataset: d\nuse_chat_template: 2\n", "two.yaml"))
