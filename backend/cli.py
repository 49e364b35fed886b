"""The ``osprey-label`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from osprey.cli import add_label_command

    parser = argparse.ArgumentParser(
        prog="osprey-label", description="Osprey + SAM region pre-labelling for Label Studio"
    )
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "WARNING"))
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_label_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"osprey-label {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
