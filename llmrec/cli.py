"""The ``llmrec`` command.

Each command group lives beside the code it drives and adds itself through a ``register_cli``
function; this module only collects them, so a group can be read (and tested) on its own.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Modules that provide `register_cli(subparsers)`, in the order their commands are listed.
COMMAND_MODULES = (
    "llmrec.data.cli",
    "llmrec.models.backbone",
    "llmrec.evaluation.cli",
    "llmrec.training.cli",
    "llmrec.seqrec.cli",
    "llmrec.recommend",
    "llmrec.bench",
    "llmrec.quickstart",
)


def build_parser() -> argparse.ArgumentParser:
    from llmrec import __version__

    parser = argparse.ArgumentParser(
        prog="llmrec", description="Fine-tune and evaluate LLM-based and ID-based sequential recommenders.")
    parser.add_argument("--version", action="version", version=f"llmrec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that command group is not part of this build
                continue
            raise
        module.register_cli(sub)
    _no_abbreviations(parser)
    return parser


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Refuse abbreviated options on every (sub)command: `bench seqrec --seed 7` was read as `--seeds 7`, and an
    override a command does not know could be taken for another option it has."""
    parser.allow_abbrev = False
    for action in parser._actions:  # argparse keeps subcommands there (no public accessor)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _no_abbreviations(sub)


# Libraries that print through a stream handler of their own and still propagate to the root logger: with a root
# handler configured, each of their messages (huggingface_hub's retry warnings, for one) came out twice.
_SELF_PRINTING_LIBRARIES = ("huggingface_hub", "datasets")


def configure_logging(fmt: str, **basic_config: object) -> None:
    """INFO logging to stderr in ``fmt`` for llmrec's commands, each message printed once.

    ``basic_config`` goes to :func:`logging.basicConfig` (``stream``, ``force``).
    """
    logging.basicConfig(level=logging.INFO, format=fmt, **basic_config)
    for name in _SELF_PRINTING_LIBRARIES:
        logging.getLogger(name).propagate = False


def main(argv: list[str] | None = None) -> int:
    configure_logging("%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if rest and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        # Our errors (DataFormatError, ConfigError, ...) carry file/row/field; no traceback for them.
        print(f"llmrec: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        # An optional package a requested feature needs (report_to: tensorboard without tensorboard): one line.
        tb_log = sys.modules.get("llmrec.tensorboard_log")
        if tb_log is not None and isinstance(e, tb_log.MissingPackageError):
            print(f"llmrec: error: {e}", file=sys.stderr)
            return 1
        raise
    except BrokenPipeError:
        # The reader of stdout went away (`llmrec data stats ... | head`): not an error of ours. Point stdout at
        # devnull so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it
    except (OSError, RuntimeError) as e:
        # A model that cannot be loaded, is not installed or fails its conversion check: the message says what to
        # do (the module is only looked up when it was imported: importing it here would load torch for every
        # command).
        backbone = sys.modules.get("llmrec.models.backbone")
        if backbone is not None and isinstance(e, (backbone.BackboneLoadError, backbone.AliasNotInstalledError,
                                                       backbone.ConversionError)):
            print(f"llmrec: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
