"""``python -m trtserve.client.bench --url ... --model ...``: the load tester on its own."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from trtserve.client.cli import add_bench_parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Same flags as ``trtserve bench``."""
    parser = argparse.ArgumentParser(prog="python -m trtserve.client.bench")
    sub = parser.add_subparsers(dest="command")
    add_bench_parser(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
