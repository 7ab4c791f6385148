"""docs/cli.md lists every flag of `trtserve serve` (and of the other subcommands); regenerate it with
`python scripts/gen_cli_doc.py` after changing a flag."""
from __future__ import annotations

import argparse
import pathlib

from trtserve.cli import build_parser

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _subparsers() -> dict:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_serve_flag_is_in_docs_cli_md() -> None:
    text = DOC.read_text()
    serve = _subparsers()["serve"]
    section = text.split("## trtserve serve", 1)[1].split("\n## ", 1)[0]
    flags = [s for a in serve._actions for s in a.option_strings if s not in ("-h", "--help")]
    assert flags
    missing = [f for f in flags if f"`{f}`" not in section]
    assert not missing, f"docs/cli.md lacks {missing}: run python scripts/gen_cli_doc.py"


def test_every_subcommand_and_its_flags_are_in_docs_cli_md() -> None:
    text = DOC.read_text()
    for name, sub in _subparsers().items():
        assert f"## trtserve {name}\n" in text, name
        section = text.split(f"## trtserve {name}\n", 1)[1].split("\n## ", 1)[0]
        missing = [s for a in sub._actions for s in a.option_strings if s not in ("-h", "--help")
                   and f"`{s}`" not in section]
        assert not missing, f"trtserve {name}: docs/cli.md lacks {missing}"
