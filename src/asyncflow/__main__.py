"""Command line: ``asyncflow demo`` (also ``python -m asyncflow demo``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from . import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asyncflow", description="Workflows of async tasks on asyncio."
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="run the built-in demo workflow")
    demo.add_argument("--simulations", type=int, default=6, metavar="N")
    demo.add_argument("--samples", type=int, default=200_000, metavar="N")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run_demo

        try:
            asyncio.run(run_demo(args.simulations, args.samples))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
