"""Entry point of the `taxonomist` command: builds the parser from the command modules and runs one.

Every failure is one `error: …` line; `--debug` shows the traceback instead. The exit statuses are listed in
`EXIT_STATUSES` (shown by `taxonomist --help`). Command modules import torch lazily so that `--help` stays fast.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import re
import sys
import warnings
from pathlib import Path

from taxonomist import __version__
from taxonomist.errors import SubmissionError, TaxonomistError

#: command modules, in the order `--help` lists them; each has `register(subparsers)`
COMMAND_MODULES = ("demo", "taxonomy", "score", "data", "train", "evaluate", "baseline", "predict", "report",
                   "benchmark", "export", "push", "serve", "sweep")


EXIT_STATUSES = """exit status:
  0    success
  1    unexpected error (a bug; its traceback is saved and the error line says where), or work done in part
       (data download, taxonomy resolve: each miss listed)
  2    a mistake in the input or the environment (the error line names the file, row or option)
  3    training finished and its model is saved, but a step after it (calibrate, evaluate, report) failed:
       RUN/errors.log holds the traceback, and the error line names the command that redoes the step
  130  interrupted"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples in descriptions as written and shows each option's default once.

    argparse's defaults formatter appends "(default: X)" to every help text: after a help that already says
    its default ("(default: the run directory) (default: None)"), for defaults that say nothing (None, False, an
    empty list), and never for an option without help (`serve --port`). Here: an option whose help mentions
    its default, or whose default is empty, gets nothing appended; one without help gets its default shown.
    """

    def _format_action(self, action):
        if not action.help and action.option_strings and self._shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if re.search(r"\bdefaults?\b", text, re.I) or not self._shows_default(action):
            return text
        return f"{text.strip()} (default: %(default)s)".lstrip()

    @staticmethod
    def _shows_default(action) -> bool:
        default = action.default
        if default is None or default is argparse.SUPPRESS or default is False or default == [] or default == "":
            return False
        return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taxonomist",
        description="Hierarchical image classification of organisms, scored by taxonomic distance.",
        formatter_class=HelpFormatter,
        epilog="Run `taxonomist COMMAND --help` for the options of a command.\n\n" + EXIT_STATUSES,
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
        return e.exit_code
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
    except Exception as e:  # a bug: one line for the user, the traceback kept for the report
        if debug:
            raise
        saved = save_traceback(e, argv)
        where = f"its traceback is in {saved}" if saved else "the traceback could not be saved"
        print(f"error: unexpected {_one_line(f'{type(e).__name__}: {e}', 300)} — a bug in taxonomist; {where} "
              f"(rerun with --debug to see it)", file=sys.stderr)
        return 1


def save_traceback(error: BaseException, argv: list[str]) -> Path | None:
    """Write `error`'s traceback to $XDG_CACHE_HOME/taxonomist/errors/ (~/.cache/… by default), or the
    temporary folder when that cannot be written; None when neither can."""
    import datetime
    import os
    import tempfile
    import traceback

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    command = next((a for a in argv if not a.startswith("-")), "taxonomist")
    name = f"{stamp}-{''.join(c for c in command if c.isalnum()) or 'taxonomist'}-{os.getpid()}.log"
    text = (f"taxonomist {__version__}, command line: taxonomist {' '.join(argv)}\n"
            + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    for folder in (cache / "taxonomist" / "errors", Path(tempfile.gettempdir()) / "taxonomist-errors"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
            return folder / name
        except OSError:
            continue
    return None


def _one_line(message: str, limit: int = 600) -> str:
    """An error as one readable line: a huge cell quoted from a user's file is cut in the middle (the file and
    row come first, so they stay), and stray newlines inside quoted values are escaped."""
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    if len(message) <= limit:
        return message
    cut = len(message) - limit
    return f"{message[:limit - 100]} …[{cut:,} characters cut]… {message[-100:]}"


def drop_current_folder_from_path() -> None:
    """`python -m taxonomist.cli.main` (and `torchrun -m`) put the current folder first on sys.path, so a file
    there — a `payload.py` named by a downloaded model file, or a `timm.py` shadowing the real package — would be
    imported by the commands' lazy imports. The `taxonomist` command has no such entry; this makes both alike.
    A `module:` backbone must be installed or on PYTHONPATH."""
    import os

    if sys.path and sys.path[0] in ("", os.getcwd()) and not sys.flags.safe_path:
        del sys.path[0]


if __name__ == "__main__":
    drop_current_folder_from_path()
    sys.exit(main())
