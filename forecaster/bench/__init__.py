"""Benchmarks: figures measured side by side in one run (not tests; these machines are noisy).

One module per benchmark; ``PARTS`` maps each ``forecaster bench PART`` to the function that runs
it from the parsed command line (``forecaster.cli`` builds the options). Modules load on use: the
accuracy bench's peers and the broker benches' clients are not needed by the others. Each bench
sets the process up through ``forecaster.runtime``, as ``forecaster run`` does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from forecaster.errors import ForecasterError


def scrape(args: argparse.Namespace) -> None:
    from forecaster.bench.scrape import bench_scrape, print_scrape

    print_scrape(bench_scrape(args.streams, args.cap), args.json)


def drift(args: argparse.Namespace) -> None:
    from forecaster.bench.drift import bench_drift, print_drift

    print_drift(bench_drift(live=not args.offline), args.json)


def engine(args: argparse.Namespace) -> None:
    from forecaster.bench.engine import bench_engine, bench_memory, print_engine

    on_cpu = args.device == "cpu"
    result = bench_engine(device=args.device, checkpoint_path=args.checkpoint, busy=args.busy)
    print_engine(result, bench_memory() if on_cpu else None, args.json)


def throughput(args: argparse.Namespace) -> None:
    from forecaster.bench.throughput import bench_throughput, print_throughput

    sizes = tuple(int(n) for n in args.sizes.split(",") if n)  # "": the frames figure only
    result = bench_throughput(sizes, args.count, args.seconds, repeats=args.repeats)
    if args.down > 0:  # and the catch-up after an outage (bench backlog)
        from forecaster.bench.backlog import bench_backlog

        result["backlog"] = bench_backlog(seconds=args.down)
    print_throughput(result, args.json)


def backlog(args: argparse.Namespace) -> None:
    from forecaster.bench.backlog import bench_backlog, print_backlog

    print_backlog(bench_backlog(seconds=args.down), args.json)


def profile(args: argparse.Namespace) -> None:
    from forecaster.bench.throughput import print_profile, profile_frames

    print_profile(profile_frames(), args.json)


def accuracy(args: argparse.Namespace) -> None:
    from forecaster.bench.accuracy import bench_accuracy, print_accuracy, river_available

    if args.data is None:
        raise ForecasterError("bench accuracy needs --data DIR (a folder of timestamp,value CSVs)")
    if not river_available():
        print(
            "river is not installed: skipping river_snarimax and river_holtwinters "
            "(pip install 'forecaster[bench]')",
            file=sys.stderr,
        )
    only = [m for m in args.models.split(",") if m] if args.models else None
    print_accuracy(bench_accuracy(args.data, args.seed, plot_dir=args.plot, only=only), args.json)
    if args.plot and not args.json:
        print(f"plots: {args.plot}/")


def anomaly(args: argparse.Namespace) -> None:
    from forecaster.bench.anomaly import bench_anomaly, print_anomaly

    if args.data is None:
        raise ForecasterError("bench anomaly needs --data DIR (a NAB data folder)")
    print_anomaly(bench_anomaly(args.data, args.out, args.threshold), args.json)


def challenger(args: argparse.Namespace) -> None:
    from forecaster.bench.challenger import bench_challenger, print_challenger

    print_challenger(bench_challenger(seed=args.seed), args.json)


def journal(args: argparse.Namespace) -> None:
    from forecaster.bench.journal import bench_journal, print_journal

    print_journal(bench_journal(), args.json)


# ``forecaster bench PART`` -> what runs it, in the order ``--help`` lists them.
PARTS: dict[str, Callable[[argparse.Namespace], None]] = {
    "scrape": scrape,
    "drift": drift,
    "engine": engine,
    "throughput": throughput,
    "backlog": backlog,
    "accuracy": accuracy,
    "anomaly": anomaly,
    "journal": journal,
    "challenger": challenger,
    "profile": profile,
}
