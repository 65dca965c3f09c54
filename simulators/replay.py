"""Replay a CSV series (NAB format ``timestamp,value``) to MQTT as one stream.

python -m simulators.replay data.csv --stream machine-temp --speedup 3600
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)


def read_series(path: Path, column: str = "value") -> list[tuple[float | None, float]]:
    """``(timestamp seconds or None, value)`` rows; timestamps as NAB writes them."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            ts = None
            if row.get("timestamp"):
                try:
                    ts = datetime.fromisoformat(row["timestamp"]).timestamp()
                except ValueError:
                    ts = None
            rows.append((ts, float(row[column])))
    return rows


def replay(client: object, rows: list, topic: str, speedup: float, qos: int = 0) -> int:
    """Publish at ``speedup`` x the recorded pace (0: as fast as possible)."""
    started = time.monotonic()
    first = rows[0][0] if rows and rows[0][0] is not None else None
    for ts, value in rows:
        if speedup > 0 and first is not None and ts is not None:
            delay = started + (ts - first) / speedup - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        client.publish(topic, json.dumps({"value": value, "ts": ts}), qos=qos)  # type: ignore[attr-defined]
    return len(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path)
    parser.add_argument("--column", default="value")
    parser.add_argument("--stream", help="stream id (default: the file's stem)")
    parser.add_argument("--topic", default="sensors/{stream}/value")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--qos", type=int, choices=[0, 1, 2], default=1)
    parser.add_argument("--speedup", type=float, default=0.0, help="x recorded pace; 0 = max")


def run(args: argparse.Namespace) -> int:
    from simulators.client import connected_client

    rows = read_series(args.file, args.column)
    stream = args.stream or args.file.stem
    client = connected_client(args.host, args.port, "forecaster-sim-replay")
    try:
        sent = replay(client, rows, args.topic.replace("{stream}", stream), args.speedup, args.qos)
    finally:
        client.loop_stop()
        client.disconnect()
    log.info("replayed %d samples of %s as stream %s", sent, args.file, stream)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulators.replay", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
