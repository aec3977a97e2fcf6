"""``--help`` of the recipe-driven commands lists their config fields, each with its help string.

``llmrec sft``, ``grpo``, ``evaluate`` and ``seqrec train`` take every field of their config dataclass as a
recipe key or as ``--name value``; argparse knows only their few fixed options, so without this their help
said "options not listed here are ... fields" and left the user to read the source. The fields' help strings
(dataclass metadata, as in TRL's and transformers' configs) are appended to the help text instead. The config
classes are imported only when help is printed: building the parser of every llmrec command must stay cheap
(LatentSFTConfig imports transformers).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import textwrap
from collections.abc import Callable, Collection

_MISSING = object()


def _default(f: dataclasses.Field) -> object:
    """The field's default value (a factory's product), or ``_MISSING`` for a required field."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def _shown(value: object) -> str:
    if value is _MISSING:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value) if value == "" or value != value.strip() else value
    if isinstance(value, (list, tuple)):  # as a recipe writes it
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(getattr(value, "value", value))  # an Enum's value, as a recipe writes it


def _metavar(default: object) -> str:
    if isinstance(default, bool):
        return "true|false"
    if isinstance(default, (list, tuple)):
        return "VALUE [VALUE ...]"
    return "VALUE"


def _differs(a: object, b: object) -> bool:
    try:
        return bool(a != b)
    except Exception:  # values whose comparison is not a plain bool (arrays): count as different
        return True


def config_fields_help(config_class: type, base: type | None = None, width: int | None = None,
                       refused: Collection[str] = (), skip: Collection[str] = ()) -> str:
    """The help text of ``config_class``'s fields, for the end of a command's ``--help``.

    With ``base`` (the library class the config extends, e.g. ``transformers.TrainingArguments``), only the
    fields ``config_class`` adds are described; the base's fields whose default it changes are listed with
    their new default, and the rest are pointed to, except ``refused`` (base fields the command refuses when
    set). ``skip``: fields not to describe (the command has them as its own options). Example::

        >>> @dataclasses.dataclass
        ... class Config:
        ...     lr: float = dataclasses.field(default=1e-3, metadata={"help": "Learning rate."})
        >>> print(config_fields_help(Config, width=60), end="")
        Config fields (recipe keys, or --name value on the command line):
          --lr VALUE  (default: 0.001)
              Learning rate.
    """
    width = width or max(40, min(shutil.get_terminal_size().columns, 120) - 2)
    base_fields = {f.name: f for f in dataclasses.fields(base)} if base is not None else {}
    own, changed = [], []
    for f in dataclasses.fields(config_class):
        if not f.init or f.name.startswith("_") or f.name in skip or f.name in refused:
            continue
        if f.name not in base_fields:
            own.append(f)
        elif _differs(_default(f), _default(base_fields[f.name])):
            changed.append(f)
    lines = [f"{config_class.__name__} fields (recipe keys, or --name value on the command line):"]
    for f in own:
        default = _default(f)
        lines.append(f"  --{f.name} {_metavar(default)}  (default: {_shown(default)})")
        text = " ".join(str(f.metadata.get("help", "")).split())
        if text:
            lines += textwrap.wrap(text, width, initial_indent="      ", subsequent_indent="      ")
    if base is not None:
        lines.append("")
        lines += textwrap.wrap(
            f"Every {base.__module__.split('.')[0]}.{base.__name__} field"
            + (" (but the ones refused: see above)" if refused else "")
            + " is accepted too, as a recipe key or --name value (see its documentation)"
            + (", with these defaults changed here: " + ", ".join(f"{f.name}={_shown(_default(f))}" for f in changed)
               if changed else "") + ".",
            width,
        )
    return "\n".join(lines) + "\n"


def add_config_fields_help(parser: argparse.ArgumentParser, load: Callable[[], tuple]) -> None:
    """Append :func:`config_fields_help` of ``load()`` -- the config class, its library base (or None) and
    optionally the base fields the command refuses -- to ``parser``'s help; ``load`` runs only when the help is
    formatted. Fields that are options of ``parser`` itself (``--checkpoint``) are described there only."""
    format_help = parser.format_help

    def format_help_with_fields() -> str:
        config_class, base, *refused = load()
        own_options = {o.lstrip("-") for a in parser._actions for o in a.option_strings}
        return format_help() + "\n" + config_fields_help(config_class, base, refused=refused[0] if refused else (),
                                                         skip=own_options)

    parser.format_help = format_help_with_fields  # argparse's print_help calls self.format_help()
