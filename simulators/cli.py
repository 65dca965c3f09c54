"""``forecaster-sim sine|replay``: the simulators as one console script."""

from __future__ import annotations

import argparse
import logging

from simulators import replay, sine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forecaster-sim")
    sub = parser.add_subparsers(dest="command", required=True)
    sine.add_arguments(sub.add_parser("sine", help="publish sine streams"))
    replay.add_arguments(sub.add_parser("replay", help="publish a CSV series as one stream"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return sine.run(args) if args.command == "sine" else replay.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
