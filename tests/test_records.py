"""The torch-free core: records and reasons, and the modules that must load without torch."""

from __future__ import annotations

import subprocess
import sys

from forecaster.reasons import DROP_REASONS, ENGINE_REASONS, REASONS


def test_parse_config_and_metrics_do_not_import_torch() -> None:
    # A fresh interpreter: this one has torch loaded by other tests already.
    code = (
        "import sys, forecaster.parse, forecaster.config, forecaster.metrics, forecaster.records; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_vocabulary_of_reasons() -> None:
    assert set(ENGINE_REASONS) <= set(REASONS)
    assert len(set(REASONS)) == len(REASONS)
    # A full queue drops a message; it is never a refused sample.
    assert "queue_full" in DROP_REASONS and "queue_full" not in REASONS
