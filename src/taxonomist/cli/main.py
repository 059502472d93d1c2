"""Entry point of the `taxonomist` command: builds the parser from the command modules and runs one.

User mistakes (`TaxonomistError`) become one `error: …` line and exit status 2; `--debug` shows the
traceback. Command modules import torch lazily so that `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import warnings
import sys

from taxonomist import __version__
from taxonomist.errors import SubmissionError, TaxonomistError

#: command modules, in the order `--help` lists them; each has `register(subparsers)`
COMMAND_MODULES = ("demo", "taxonomy", "score", "data", "train", "evaluate", "baseline", "predict", "report",
                   "benchmark", "export", "serve", "sweep")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples in descriptions as written and shows defaults."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taxonomist",
        description="Hierarchical image classification of organisms, scored by taxonomic distance.",
        formatter_class=HelpFormatter,
        epilog="Run `taxonomist COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"taxonomist {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"taxonomist.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"taxonomist.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub, HelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not debug:
        # a warning is one line for a user, like an error
        warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        result = args.func(args)
        return int(result or 0)
    except SubmissionError as e:
        if debug:
            raise
        for problem in e.problems:
            print(f"error: {_one_line(problem)}", file=sys.stderr)
        return 2
    except TaxonomistError as e:
        if debug:
            raise
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `taxonomist … | head`: the reader left, nothing is wrong
        return 0
    except OSError as e:
        # a folder that cannot be written, a disk that is full: the user's environment, not a bug
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(message: str, limit: int = 600) -> str:
    """An error as one readable line: a huge cell quoted from a user's file is cut in the middle (the file and
    row come first, so they stay), and stray newlines inside quoted values are escaped."""
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    if len(message) <= limit:
        return message
    cut = len(message) - limit
    return f"{message[:limit - 100]} …[{cut:,} characters cut]… {message[-100:]}"


if __name__ == "__main__":
    sys.exit(main())
