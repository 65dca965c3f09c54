"""What a new user reads first: ``forecaster --help`` and the simulators' defaults."""

from __future__ import annotations

import argparse
import subprocess
import sys

from simulators import replay, sine


def test_help_is_plain_text_and_lists_every_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "forecaster.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "``" not in result.stdout
    for command in ("run", "demo", "train", "evaluate", "plot", "bench", "check-config"):
        assert command in result.stdout.split("positional arguments:")[0], command


def test_simulators_publish_at_qos_1_by_default() -> None:
    """A restart of the daemon loses nothing only for QoS 1: the broker keeps what it missed."""
    for module in (sine, replay):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        args = parser.parse_args(["data.csv"] if module is replay else [])
        assert args.qos == 1, module.__name__
