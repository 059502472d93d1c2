"""The `taxonomist` entry point: help, `error:` lines with exit status 2, `--debug`, and no torch at --help time."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from taxonomist import __version__
from taxonomist.cli.main import build_parser, main
from taxonomist.errors import TaxonomyError


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: taxonomist")
    for command in ("taxonomy", "score"):
        assert f"    {command} " in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: taxonomist" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"taxonomist {__version__}"


def test_user_mistake_is_one_error_line_with_status_2(tmp_path, capsys):
    rc = main(["taxonomy", "distances", str(tmp_path / "missing.csv"), "--metric", "lca", "--out",
               str(tmp_path / "m.csv")])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err == f"error: {tmp_path / 'missing.csv'}: taxonomy file not found\n"


def test_unwritable_output_is_an_error_line_not_a_traceback(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    rc = main(["taxonomy", "distances", "fathomnet2025", "--metric", "lca", "--out", str(blocker / "m.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(TaxonomyError, match="taxonomy file not found"):
        main(["--debug", "taxonomy", "distances", str(tmp_path / "missing.csv"), "--metric", "lca", "--out",
              str(tmp_path / "m.csv")])


def test_argparse_mistakes_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["taxonomy", "distances", "fathomnet2025", "--metric", "hops", "--out", "m.csv"])
    assert info.value.code == 2
    assert "invalid choice: 'hops'" in capsys.readouterr().err


def test_every_help_is_fast_and_imports_no_torch():
    """`--help` of every command and subcommand, in a fresh interpreter: torch, timm, torchvision stay unloaded."""
    script = textwrap.dedent("""
        import argparse, contextlib, io, json, sys
        from taxonomist.cli.main import build_parser

        def commands(parser, prefix=()):
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for name, sub in action.choices.items():
                        yield prefix + (name,)
                        yield from commands(sub, prefix + (name,))

        parser = build_parser()
        checked = []
        for path in [()] + list(commands(parser)):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    build_parser().parse_args([*path, "--help"])
                except SystemExit as e:
                    assert e.code == 0, path
            assert out.getvalue().startswith("usage: taxonomist"), path
            checked.append(" ".join(path))
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "torchvision"))
        print(json.dumps({"checked": checked, "heavy": heavy}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {"", "taxonomy", "taxonomy resolve", "taxonomy distances", "score"} <= set(result["checked"])
    assert result["heavy"] == []


def test_build_parser_registers_taxonomy_and_score():
    parser = build_parser()
    args = parser.parse_args(["score", "sol.csv", "sub.csv"])
    assert (args.solution, args.submission, args.taxonomy, args.metric, args.allow_unknown) == \
        ("sol.csv", "sub.csv", "fathomnet2025", "auto", False)
    args = parser.parse_args(["taxonomy", "resolve", "A", "B", "--out", "t.csv", "--offline"])
    assert (args.names, args.out, args.offline, args.cache) == (["A", "B"], "t.csv", True, None)


def _all_commands(parser, prefix=()):
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _all_commands(sub, prefix + (name,))


def _option_helps(parser) -> dict[str, str]:
    """Each option's help as `--help` prints it, joined into one line per option."""
    text = parser.format_help()
    helps, current = {}, None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -") or line.startswith("  --"):
            current = stripped.split()[0].rstrip(",")
            helps[current] = stripped
        elif current and line.startswith(" " * 6) and stripped:
            helps[current] += " " + stripped
        else:
            current = None
    return helps


def test_help_shows_each_default_once_and_never_an_empty_one():
    """Issue 23: "(default: the run's data.root) (default: None)" and `serve --port` without its default."""
    checked = 0
    for path, sub in _all_commands(build_parser()):
        for option, text in _option_helps(sub).items():
            where = f"taxonomist {' '.join(path)} {option}: {text}"
            assert text.count("(default") <= 1, where
            assert "(default: None)" not in text and "(default: False)" not in text, where
            assert "(default: [])" not in text, where
            checked += 1
    assert checked > 100
    serve = dict(_all_commands(build_parser()))[("serve",)]
    helps = _option_helps(serve)
    assert "(default: 8000)" in helps["--port"] and "(default: 127.0.0.1)" in helps["--host"]
    train = dict(_all_commands(build_parser()))[("train",)]
    assert _option_helps(train)["--strict"].endswith("(default: skip it and list it)")
