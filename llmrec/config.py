"""One schema for recipes and command lines: dataclasses parsed by ``HfArgumentParser``.

Every config is a dataclass whose fields carry a ``help`` string (the TRL convention). A recipe YAML
is a flat mapping of those field names; command-line ``--field value`` overrides it. Unknown keys in
a recipe are an error that names the file and the key (with the nearest known key), never ignored.
YAML is read with ``yaml.safe_load`` only.

Values read the same from a recipe and from the command line: for a field whose type admits None, ``null``,
``Null``, ``NULL``, ``~`` (YAML's spellings) and ``None`` mean None; a mapping is a value where the type admits a
dict (``lr_scheduler_kwargs: {num_cycles: 2}``) and a list where it admits a list; a negative number
(``-1e-5``, ``-0.5``) is a value, also among the values of a list option.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import inspect
import json
import math
import os
import re
import types
import typing
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml


class ConfigError(ValueError):
    """A recipe or command line that does not fit the config schema."""


class StoreOnce(argparse.Action):
    """argparse ``store`` that refuses a second occurrence of the option (``--config a.yaml --config b.yaml`` ran
    b.yaml alone, silently), as a recipe refuses a key given twice.

    The option's default must be None: a value already stored that is not the default is the first occurrence.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, self.default)
        if before is not self.default:
            parser.error(f"{option_string} is given twice ({before!r} and {values!r}): give it once")
        setattr(namespace, self.dest, values)


class LengthRange(argparse.Action):
    """An argparse action for ``MIN MAX`` token lengths (``nargs=2``, ``type=int``): both >= 1 and MIN <= MAX, checked
    at parse time (``--prompt-len 250 150`` failed only after the model had loaded, naming no option)."""

    def __call__(self, parser, namespace, values, option_string=None):
        low, high = values
        if low < 1 or low > high:
            parser.error(f"{option_string}: expected MIN MAX with 1 <= MIN <= MAX, got {low} {high}")
        setattr(namespace, self.dest, (low, high))


def int_at_least(least: int, meaning: str = "") -> typing.Callable[[str], int]:
    """An argparse ``type``: an integer >= ``least`` (``meaning`` is said after the bound, e.g. ``" (0 = all)"``).
    Plain ``int`` took ``--num-processes -2`` (a negative global batch) and ``--max-history -5``."""

    def read(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}{meaning}, got {value}")
        return value

    return read


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last silently),
    and reads numbers with an exponent as YAML 1.2 does.

    Merge keys (``<<: *defaults``) work as in YAML: the merged keys are defaults that the mapping's own keys
    override, so only the mapping's own keys are checked for repeats -- before PyYAML merges anything into the
    mapping (``flatten_mapping``, which also runs on an anchor's mapping when another one merges it first).
    """

    def flatten_mapping(self, node):
        checked = self.__dict__.setdefault("_llmrec_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen: dict[Any, int] = {}
            merges = 0
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    merges += 1
                    if merges > 1:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"'<<' is given twice (line {key_node.start_mark.line + 1}): merge several "
                            "mappings as <<: [*a, *b]", key_node.start_mark)
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"option {key!r} is given twice (lines {seen[key] + 1} and "
                        f"{key_node.start_mark.line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        super().flatten_mapping(node)


# PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent: `1e-6`, `2E5` and `1.0e5` read as text,
# which no typed field converts inside a mapping option ({min_lr: 1e-6} reached the LR scheduler as "1e-6").
# YAML 1.2 reads them as numbers; quoted ("1e5") they stay text.
_UniqueKeySafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


class _SourcedInt(int):
    """A YAML integer that remembers how the recipe wrote it, for a text field (see :func:`_typed`)."""

    yaml_source: str


class _SourcedFloat(float):
    """A YAML float that remembers how the recipe wrote it, for a text field (see :func:`_typed`)."""

    yaml_source: str


def _sourced(number_type: type, construct):
    def construct_sourced(loader, node):
        value = number_type(construct(loader, node))
        value.yaml_source = node.value
        return value

    return construct_sourced


# YAML 1.1 reads `0123` as octal 83, `0x10` as 16 and `1:30` as 90: a text field given one (`output_dir: 0123`)
# must get the text as written, not str() of the number (the run went to runs/83).
_UniqueKeySafeLoader.add_constructor(
    "tag:yaml.org,2002:int", _sourced(_SourcedInt, yaml.constructor.SafeConstructor.construct_yaml_int))
_UniqueKeySafeLoader.add_constructor(
    "tag:yaml.org,2002:float", _sourced(_SourcedFloat, yaml.constructor.SafeConstructor.construct_yaml_float))


def _plain(value: Any) -> Any:
    """``value`` with the YAML numbers' source text dropped (plain ``int``/``float``), inside lists and mappings too."""
    if isinstance(value, _SourcedInt):
        return int(value)
    if isinstance(value, _SourcedFloat):
        return float(value)
    if isinstance(value, list):
        return [_plain(x) for x in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def load_yaml_text(text: str) -> Any:
    """A YAML value given as text (``key=value`` pairs, option values) read as a recipe's are: numbers keep their
    source text until a field types them (:func:`coerce_fields`), so ``noun=0x10`` is '0x10' there too."""
    return yaml.load(text, Loader=_UniqueKeySafeLoader)  # a SafeLoader


def yaml_text(value: Any) -> str:
    """A recipe value as text, as a text field reads it (``0123`` as written, not octal 83)."""
    return getattr(value, "yaml_source", None) or str(value)


def read_recipe(path: str | Path, keep_number_text: bool = False) -> dict[str, Any]:
    """Read a recipe YAML (safe loader) into a flat dict; clear errors for missing/bad files.

    ``keep_number_text``: numbers keep their source text for :func:`coerce_fields` (which gives a text field
    ``0123`` as written); without it every value is a plain Python value.
    """
    from llmrec.resources import resolve_resource

    try:
        path = resolve_resource(path, "recipes")
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    if Path(path).is_dir():
        raise ConfigError(f"{path} is a directory: give a recipe file (e.g. recipes/games/eval.yaml)")
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeySafeLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e})") from None
    if data is None:
        # An empty file (or one cut off to nothing) is not "all defaults": that started hours-long runs on the
        # defaults (an evaluation of every test row of the embedded sample, say).
        raise ConfigError(f"{path}: the recipe is empty (give options on the command line instead of an empty "
                          f"--config)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of option names to values")
    odd = [k for k in data if not isinstance(k, str)]
    if odd:  # YAML 1.1 reads `on:`, `yes:` as true and `1:` as an int; no option has such a name
        raise ConfigError(f"{path}: option names must be text, got {', '.join(repr(k) for k in odd)} (quote a key "
                          "that YAML reads as a boolean or a number)")
    return data if keep_number_text else _plain(data)


def field_names(classes: Sequence[type]) -> set[str]:
    return {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}


def check_keys(data: dict[str, Any], classes: Sequence[type], source: str) -> None:
    """Raise :class:`ConfigError` naming ``source`` for every key no dataclass knows."""
    known = field_names(classes)
    unknown = [k for k in data if k not in known]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(k, known, n=1)
            parts.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(f"{source}: unknown option(s) {', '.join(parts)}")


def _field_hints(classes: Sequence[type]) -> dict[str, Any]:
    """``{field: resolved type hint}`` of the dataclasses' init fields.

    Read from the annotations, not from ``Field.type``: ``HfArgumentParser`` overwrites that with the one type it
    parses (``dict | str | None`` becomes ``str``), which would hide that a dict or None is allowed.
    """
    out: dict[str, Any] = {}
    for cls in classes:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an unresolvable annotation elsewhere: no type checks for this class
            continue
        for f in dataclasses.fields(cls):
            if f.init and f.name in hints:
                out[f.name] = hints[f.name]
    return out


def _admits(hint: Any, kind: type | None) -> bool:
    """Whether a field of type ``hint`` may hold None (``kind`` None), a list or a dict (``kind`` list / dict)."""
    if hint is Any:
        return True
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    members = typing.get_args(hint) if union else (hint,)
    if kind is None:
        return type(None) in members
    return any(m is kind or typing.get_origin(m) is kind for m in members)


def _hint_text(hint: Any) -> str:
    """``int``, ``str | None``, ``dict[str, Any] | str | None``: a field's type as an error message names it."""
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def _required_values(classes: Sequence[type]) -> set[str]:
    """Names of the fields whose type does not admit None (``lr: float``, not ``lr: float | None``)."""
    return {name for name, hint in _field_hints(classes).items() if not _admits(hint, None)}


# What YAML reads as null, plus Python's spelling: the same words mean None on the command line (for a field that
# admits None), where `--max_train_rows null` was an invalid int and `--checkpoint null` the path "null". Not
# "none": `report_to: none` is transformers' "no integrations", and an empty string stays an empty string (as
# `key: ''` in YAML).
_NULL_WORDS = frozenset({"null", "Null", "NULL", "~", "None"})


def _null_or(convert: Any) -> Any:
    """An optional field's argparse type: a null word is None, any other text goes through ``convert``. The
    wrapper keeps ``convert``'s name (argparse's "invalid int value") and is unwrapped by :func:`_typed`."""

    @functools.wraps(convert, updated=())  # `updated=()`: do not copy a class's attributes (int.__dict__)
    def read(text: str) -> Any:
        return None if text in _NULL_WORDS else convert(text)

    return read


@functools.wraps(int, updated=())  # argparse's "invalid int value"; unwrapped to int by _typed
def _integer_text(text: str) -> int:
    """An integer field's argparse type: an integer, or a number equal to one (``2.0``, ``1e3``), as a recipe's
    YAML reads them (``--epochs 2.0`` was refused where ``epochs: 2.0`` was read as 2; a review)."""
    try:
        return int(text)
    except ValueError:
        value = float(text)  # not a number: ValueError, argparse's "invalid int value"
        if not value.is_integer():
            raise ValueError(f"{text!r} is not an integer") from None
        return int(value)


def _json_mapping_text(convert: Any) -> Any:
    """The argparse type of a field that admits a dict (transformers' ``lr_scheduler_kwargs: dict | str | None``,
    parsed as ``str``): text starting with ``{`` must be the JSON that transformers reads it as. The recipe's YAML
    form ``{num_cycles: 2}`` failed inside TrainingArguments with a bare JSON error naming neither the option nor
    the expected form (argparse names the option). Other text (a path: ``fsdp_config``) passes unchanged."""

    @functools.wraps(convert, updated=())  # keeps the name and ``__wrapped__`` (see _typed)
    def read(text: str) -> Any:
        if isinstance(text, str) and text.startswith("{"):  # what transformers json.loads (_VALID_DICT_FIELDS)
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                raise argparse.ArgumentTypeError(
                    f"expects a JSON mapping (keys and strings in double quotes), such as '{{\"num_cycles\": 2}}'; "
                    f"got {text!r} ({e})") from None
        return convert(text)

    return read


class _ChoicesOrNull(list):
    """An optional field's choices (``ddp_backend``): None, read from ``null``, is one of them too, without
    being listed in the help or in an error message."""

    def __contains__(self, value: object) -> bool:
        return value is None or super().__contains__(value)


def _null_list(values: list | None, listed: bool) -> list | None:
    """A list option's values once read: ``--k null`` (``[None]`` from one value, not from a YAML list) is None,
    as ``k: null`` is; a null among other values is refused (it passed into the list as a None item)."""
    if values is None or not any(v is None for v in values):
        return values
    if len(values) == 1 and not listed:
        return None
    raise ValueError("null is not a list item (give null alone for no list)")


def _coerce(parser, data: dict[str, Any], source: str, classes: Sequence[type] = ()) -> dict[str, Any]:
    """Convert recipe strings the way the command line would and check choices.

    YAML reads ``1e-4`` as a string, and ``parse_dict`` does no conversion, so without this a recipe
    could put a ``str`` into a ``float`` field (while the same value on the command line is converted).
    ``null`` is refused for a field whose type does not admit None.
    """
    out = dict(data)
    nulls = sorted(_required_values(classes) & {k for k, v in out.items() if v is None})
    if nulls:
        raise ConfigError(f"{source}: option '{nulls[0]}': null is not allowed (it needs a value)")
    hints = _field_hints(classes)
    for action in parser._actions:
        k = action.dest
        if k not in out or action.type is None:
            continue
        v = out[k]
        try:
            if action.nargs in ("+", "*"):
                listed = isinstance(v, list)
                if v is not None and not listed:
                    v = [v]  # one value for a list option, as `--k 3` on the command line
                v = _null_list(None if v is None else [_typed(action.type, x) for x in v], listed)
            else:
                v = _typed(action.type, v, hints.get(k))
                if isinstance(v, list):  # a list where the type admits one (`report_to: [tensorboard]`)
                    v = _null_list(v, listed=True)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{source}: option '{k}': cannot read {_short(out[k])} ({_short_text(e)})") from None
        if action.choices is not None and v is not None:
            for x in v if isinstance(v, list) else [v]:
                if x not in action.choices:
                    raise ConfigError(f"{source}: option '{k}': {_short(x)} is not one of {list(action.choices)}")
        out[k] = v
    return {k: _plain(v) for k, v in out.items()}


def _short(value: Any) -> str:
    """A bounded repr for error messages: a recipe's YAML aliases can nest a small file into a value whose full
    repr is gigabytes (10 levels of 10 aliases)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, 80, 80
    return r.repr(value)


def _short_text(err: BaseException, limit: int = 300) -> str:
    text = str(err)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _typed(convert, value: Any, hint: Any = None) -> Any:
    """One option value as the command line would read it: strings through the option's type; other YAML values
    checked against it (``true`` is not a number, ``1.5`` is not an integer).

    ``hint`` is the field's declared type: a mapping is kept where it admits a dict (transformers' ``dict | str |
    None`` fields, which ``HfArgumentParser`` parses as ``str``) and a list is read item by item where it admits a
    list (``report_to: None | str | list[str]``); elsewhere a mapping or a list is refused.
    """
    if isinstance(value, str) or value is None:
        return value if value is None else convert(value)
    if isinstance(value, dict) and hint is not None and _admits(hint, dict):
        return value
    if isinstance(value, list) and hint is not None and _admits(hint, list):
        return [_typed(convert, x) for x in value]
    if isinstance(value, (list, dict)):
        what = "one value or a list" if hint is not None and _admits(hint, list) else "one value"
        of = _hint_text(hint) if hint is not None else getattr(convert, "__name__", str(convert))
        raise ValueError(f"expected {what} of type {of}, got a {'mapping' if isinstance(value, dict) else 'list'}")
    convert = inspect.unwrap(convert)  # the wrappers of an optional field (_null_or) and a dict field (_json_mapping_text)
    if convert in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        if convert is int and value != int(value):
            raise ValueError("expected an integer")
        return convert(value)
    if convert is str:
        if isinstance(value, bool):
            raise ValueError("expected a string (quote it)")
        return yaml_text(value)  # `0123` as written, not octal 83
    if getattr(convert, "__name__", "") == "string_to_bool":  # transformers' type for bool fields
        # Passed through unchecked, `mask_history: 2` or `use_chat_template: 0.5` reached the config as a
        # truthy non-bool; YAML reads true/false/yes/no as booleans already.
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):  # as the command line reads "1"/"0"
            return bool(value)
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
    return value


def field_defaults(cls: type) -> dict[str, Any]:
    """``{field: default}`` of a dataclass, calling ``default_factory`` where there is one; a required field
    (no default) is left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def config_differences(found: dict[str, Any], wanted: dict[str, Any], defaults: dict[str, Any], *,
                       ignore: Collection[str] = (), paths: Collection[str] = ()) -> dict[str, tuple[Any, Any]]:
    """``{field: (found, wanted)}`` where a finished run's recorded config (``found``) differs from the config asked
    for now (``wanted``); the fields in ``ignore`` (where to log, how many threads, ...) are not compared.

    Both go through JSON first (tuples vs lists, str-valued enums vs their values); floats equal to a relative
    1e-12 count as equal; the fields in ``paths`` are compared as normalised paths ("data/x/" and "data/x" are one
    directory). A field the finished run does not record (added to the config after it ran) counts as its entry in
    ``defaults``, the behaviour of the code that trained it.
    """

    def plain(d: dict[str, Any]) -> dict[str, Any]:
        out = json.loads(json.dumps({k: v for k, v in d.items() if k not in ignore}, default=str))
        for k in paths:
            if isinstance(out.get(k), str) and out[k]:
                out[k] = os.path.normpath(out[k])
        return out

    return mismatches(plain({**defaults, **found}), plain(wanted))


def mismatches(found: dict[str, Any], wanted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (found, wanted)}`` for the keys of ``wanted`` whose value differs in ``found`` (floats equal to a
    relative 1e-12 count as equal)."""
    def same(f: Any, w: Any) -> bool:
        if isinstance(w, float) and isinstance(f, (int, float)) and not isinstance(f, bool):
            return math.isclose(f, w, rel_tol=1e-12)
        return f == w

    return {k: (found.get(k), w) for k, w in wanted.items() if not same(found.get(k), w)}


def refuse_changed_resume(checkpoint: str | os.PathLike, found: dict[str, Any], wanted: dict[str, Any],
                          defaults: dict[str, Any], *, ignore: Collection[str] = (),
                          paths: Collection[str] = ()) -> None:
    """Raise :class:`ConfigError` if the settings a checkpoint was trained with (``found``) differ from the ones a
    run resuming from it asks for (``wanted``): the resumed run would mix the two and record only the new ones.
    See :func:`config_differences` for ``defaults``, ``ignore`` and ``paths``."""
    diff = config_differences(found, wanted, defaults, ignore=ignore, paths=paths)
    if diff:
        changed = ", ".join(f"{k}={f!r} (asked: {w!r})" for k, (f, w) in sorted(diff.items()))
        raise ConfigError(f"{checkpoint} was trained with {changed}: resume with the settings it was trained with, "
                          "or train in another output_dir (SFT: or retrain: true)")


def coerce_fields(classes: Sequence[type], data: dict[str, Any], source: str) -> dict[str, Any]:
    """Check ``data``'s keys against the dataclasses and convert strings as the command line would
    (YAML reads ``1e-3`` as a string): for values collected outside :func:`parse_config`."""
    check_keys(data, classes, source)
    return _coerce(_parser(classes), data, source, classes)


# A whole argument that is a negative number: `-2`, `-0.5`, `-.5`, `-1e-5`, `-1E+3`, `-inf`. (\Z, not $: "$"
# also matches before a final newline.)
_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?\Z|-inf(inity)?\Z", re.IGNORECASE)


def _refuse_override(message: str) -> NoReturn:
    """``error`` of the override parser: argparse's would print the usage of every field (the hundreds of
    TrainingArguments ones too) before the message, then exit."""
    raise ConfigError(f"command line: {message}")


def _parser(classes: Sequence[type]):
    """``HfArgumentParser`` for the dataclasses, reading values as a recipe does (see the module docstring).

    - No abbreviations: "--epoch" must not silently mean "--epochs" (a recipe's "epoch" is an error).
    - Every negative number is a value: argparse (before Python 3.13) takes an argument starting with ``-`` that
      is not a plain decimal (``-1e-5``) for an option, and ends a list option's values there (``--reward_weights
      1.0 -1e-1`` was "unknown option -1e-1"). The parser has no option that looks like a number, so nothing that
      is an option (``--name``, ``-h``) reads as one.
    - An optional field reads the null words as None, and None passes its choices.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(classes))
    parser.allow_abbrev = False
    parser.error = _refuse_override  # a bad value is one line naming it, not the usage of every field first
    parser._negative_number_matcher = _NEGATIVE_NUMBER  # argparse's own test (private; `.match` at the start)
    hints = _field_hints(classes)
    for action in parser._actions:
        hint = hints.get(action.dest)
        if action.type is int:
            action.type = _integer_text
        if action.type is not None and hint is not None and hint is not Any and _admits(hint, dict):
            action.type = _json_mapping_text(action.type)
        if action.type is None or hint is None or not _admits(hint, None):
            continue
        action.type = _null_or(action.type)
        if action.choices is not None:
            action.choices = _ChoicesOrNull(action.choices)
    return parser


def _refuse_repeated_options(parser, args: Sequence[str]) -> None:
    """Raise :class:`ConfigError` for a field given twice on the command line (``--ks 1 --ks 5``, or
    ``--max_history`` and ``--max-history``, or ``--x`` and ``--no_x``): argparse keeps the last one silently."""
    seen: dict[str, str] = {}
    for arg in args:
        if arg == "--":  # what follows is not options (argparse's convention)
            break
        name = arg.split("=", 1)[0]
        action = parser._option_string_actions.get(name)
        if action is None:  # a value (also a negative number), or an unknown option (reported by the parse)
            continue
        if action.dest in seen:
            both = "" if seen[action.dest] == name else f" (as {seen[action.dest]} and {name})"
            raise ConfigError(f"command line: option '{action.dest}' is given twice{both}: give it once")
        seen[action.dest] = name


def parse_config(
    classes: Sequence[type],
    config_path: str | Path | None = None,
    args: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple:
    """Build the dataclasses from a recipe, then ``extra`` values, then command-line overrides.

    Returns one instance per class, in order. ``args`` are ``--name value`` pairs (the remainder of
    the CLI after the subcommand's own flags).
    """
    parser = _parser(classes)
    data: dict[str, Any] = {}
    if config_path is not None:
        data = read_recipe(config_path, keep_number_text=True)
        check_keys(data, classes, str(config_path))
        data = _coerce(parser, data, str(config_path), classes)
    if extra:
        check_keys(extra, classes, "arguments")
        data.update(_coerce(parser, extra, "arguments", classes))
    if args:
        # Parse the command line on top of the recipe: the recipe's values become defaults.
        parser.set_defaults(**data)
        # Required fields given by the recipe must not be demanded again on the command line.
        for action in parser._actions:
            if action.dest in data:
                action.required = False
        _refuse_repeated_options(parser, args)
        outputs, unknown = parser.parse_known_args(list(args))  # a bad value: ConfigError (_refuse_override)
        if unknown:
            # as check_keys suggests for a recipe's keys: a typo on the command line gets the same help
            options = [o[2:] for a in parser._actions for o in a.option_strings if o.startswith("--")]
            hints = [f"{u} (did you mean --{close[0]}?)" for u in unknown if u.startswith("--")
                     and (close := difflib.get_close_matches(u[2:].split("=", 1)[0], options, n=1))]
            raise ConfigError(f"unknown command-line option(s): {' '.join(unknown)}"
                              + (f"; {', '.join(hints)}" if hints else ""))
        for action in parser._actions:
            if action.nargs in ("+", "*") and isinstance(getattr(outputs, action.dest, None), list):
                try:  # `--latent_tokens null` is None (a recipe's lists were checked by _coerce already)
                    setattr(outputs, action.dest, _null_list(getattr(outputs, action.dest), listed=False))
                except ValueError as e:
                    raise ConfigError(f"command line: option '{action.dest}': {e}") from None
        result = []
        for cls in classes:
            names = {f.name for f in dataclasses.fields(cls) if f.init}
            result.append(cls(**{k: v for k, v in vars(outputs).items() if k in names}))
        return tuple(result)
    try:
        return tuple(parser.parse_dict(data))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{config_path or 'config'}: {e}") from None


def to_dict(*configs: Any) -> dict[str, Any]:
    """Flatten config dataclasses into one JSON-friendly dict (for results files and checkpoints)."""
    out: dict[str, Any] = {}
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            out[f.name] = v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else str(v)
    return out
