"""Writes docs/cli.md from trtserve's argparse parser: every subcommand and flag with its help and default.

    python scripts/gen_cli_doc.py            # rewrite docs/cli.md
    python scripts/gen_cli_doc.py --check    # exit 1 if docs/cli.md is out of date

Run it after adding or changing a flag (tests/test_cli_doc.py fails when a `trtserve serve` flag is missing)."""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, "") or (sub.description or ""), sub


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _table(parser: argparse.ArgumentParser) -> str:
    rows = ["| flag | help | default |", "|---|---|---|"]
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction) or not a.option_strings:
            continue
        flags = ", ".join(f"`{s}`" for s in a.option_strings)
        if a.nargs != 0 and not isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                                argparse.BooleanOptionalAction)):
            flags += f" `{a.metavar or a.dest.upper()}`"
        default = "" if a.default in (None, argparse.SUPPRESS) else f"`{a.default}`"
        help_text = (a.help or "") % {"default": a.default, "prog": parser.prog} if a.help and "%(" in a.help else a.help
        rows.append(f"| {flags} | {_cell(help_text or '')} | {_cell(default)} |")
    positionals = [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    for a in positionals:
        rows.append(f"| `{a.metavar or a.dest}` (positional) | {_cell(a.help or '')} | |")
    return "\n".join(rows)


def render() -> str:
    sys.path.insert(0, str(ROOT))
    for k in [k for k in os.environ if k.startswith("TRTSERVE_")]:  # defaults as shipped, not this shell's
        del os.environ[k]
    os.environ["COLUMNS"] = "100"  # argparse wraps usage to the terminal's width
    from trtserve.cli import build_parser

    parser = build_parser()
    out = ["# Command line reference", "",
           "Generated from the argparse parser by `python scripts/gen_cli_doc.py`; do not edit by hand. "
           "`trtserve <command> --help` prints the same. Defaults shown are those with no `TRTSERVE_*` variable set "
           "(several flags take their default from one; see `--help`). A flag or variable with a value trtserve "
           "cannot use (a wrong type or range, a file that cannot be read, an address that is not this machine's) "
           "stops `trtserve serve` before anything starts, with one line naming the flag or variable as it was "
           "given and exit code 2.", "",
           "## trtserve", "", "| flag | help |", "|---|---|",
           "| `--version` | print the version and exit |", "| `-h`, `--help` | show help and exit |", ""]
    for name, help_text, sub in _subcommands(parser):
        out += [f"## trtserve {name}", "", _cell(help_text), "", "```", sub.format_usage().strip(), "```", "",
                _table(sub), ""]
    return "\n".join(out)


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        ok = DOC.is_file() and DOC.read_text() == text
        print("docs/cli.md is up to date" if ok else "docs/cli.md is out of date: run python scripts/gen_cli_doc.py")
        return 0 if ok else 1
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
