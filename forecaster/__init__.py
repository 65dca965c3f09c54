"""forecaster: a streaming one-step-ahead RNN forecaster for MQTT sensor streams."""

from __future__ import annotations

__version__ = "0.1.0"
