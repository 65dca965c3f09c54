"""The live page: its JSON against what the daemon published, and the page in a real headless
Chromium (no console errors, the chart draws, it updates while samples flow)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from forecaster.engine import ForecastColumns
from forecaster.live import LiveView
from tests.conftest import Broker, Collector
from tests.helpers import RunningDaemon, daemon_config, mqtt_client, wait_until

ROOT = Path(__file__).resolve().parents[1]
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def columns(streams: list[str], values: list[float]) -> ForecastColumns:
    n = len(streams)
    x = np.asarray(values, dtype=np.float64)
    nan = np.full(n, np.nan)
    return ForecastColumns(
        streams,
        np.arange(n),
        np.arange(n),
        nan,
        x,
        x + 0.5,
        nan,
        nan,
        x,
        x + 1,
        x * 0,
        x > 0,
        x > 0,
        0,
    )


def test_ring_keeps_each_streams_last_samples_in_order() -> None:
    view = LiveView(max_streams=2, history=4)
    view.observe(columns(["a", "b", "a"], [1, 10, 2]))
    view.observe(columns(["a"] * 5 + ["c"], [3, 4, 5, 6, 7, 99]))  # c: beyond max_streams
    a = view.stream("a")
    assert a is not None and a["samples"] == 7
    assert a["points"]["value"] == [4, 5, 6, 7]
    assert a["points"]["prediction"] == [4.5, 5.5, 6.5, 7.5]
    assert view.stream("b")["points"]["value"] == [10]  # type: ignore[index]
    assert view.stream("c") is None
    assert view.streams()["names"] == ["a", "b"]


@contextlib.contextmanager
def flowing(
    broker: Broker, prefix: str, streams: list[str], period: float = 0.02
) -> Iterator[None]:
    """Publish a noisy sine with a spike now and then on each stream until the block ends."""
    stop = threading.Event()

    def run() -> None:
        rng = np.random.default_rng(0)
        with mqtt_client(broker) as client:
            i = 0
            while not stop.wait(period):
                for k, stream in enumerate(streams):
                    value = math.sin(i / 8 + k) + 0.05 * rng.standard_normal()
                    value += 4.0 if i % 97 == 60 else 0.0
                    client.publish(f"{prefix}/sensors/{stream}/value", json.dumps(value), qos=0)
                i += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def live_config(broker: Broker, prefix: str, tmp_path: Path, **live: object):
    return daemon_config(
        broker,
        prefix,
        tmp_path / "state",
        live={"enabled": True, **live},
        anomaly={"warmup": 10, "threshold": 0.99},
    )


def test_json_matches_the_published_forecasts(broker: Broker, prefix: str, tmp_path: Path) -> None:
    config = live_config(broker, prefix, tmp_path, history=50)
    values = [math.sin(i / 5) for i in range(80)]
    with (
        RunningDaemon(config) as running,
        Collector(broker, f"{prefix}/forecasts/#") as out,
        mqtt_client(broker) as publisher,
    ):
        for i, value in enumerate(values):
            payload = json.dumps({"value": value, "seq": i + 1})
            publisher.publish(f"{prefix}/sensors/s.1/value", payload, qos=1)
        forecasts = out.wait_for(len(values))
        url = running.metrics_url
        wait_until(lambda: get_json(f"{url}/live/streams.json")["samples"] == [80], "80 samples")
        table = get_json(f"{url}/live/streams.json")
        assert table["names"] == ["s.1"] and table["max_streams"] == 1000
        assert set(table) >= {"mae", "naive_mae", "skill", "coverage", "anomalies"}
        stream = get_json(f"{url}/live/stream.json?name=s.1")
        points = stream["points"]
        assert points["seq"] == list(range(31, 81))  # the last 50, oldest first
        published = {f["seq"]: f for f in forecasts}
        for seq, value, prediction in zip(
            points["seq"], points["value"], points["prediction"], strict=True
        ):
            assert value == pytest.approx(published[seq]["value"], rel=1e-6)
            assert prediction == pytest.approx(published[seq]["prediction"], rel=1e-6)
        with pytest.raises(urllib.error.HTTPError) as missing:
            get_json(f"{url}/live/stream.json?name=nope")
        assert missing.value.code == 404
        for path, kind in (("/live", "text/html"), ("/live/live.js", "text/javascript")):
            with urllib.request.urlopen(f"{url}{path}", timeout=5) as response:
                assert response.headers["Content-Type"].startswith(kind)


def test_page_is_off_unless_enabled(broker: Broker, prefix: str, tmp_path: Path) -> None:
    with RunningDaemon(daemon_config(broker, prefix, tmp_path / "state")) as running:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{running.metrics_url}/live/", timeout=5)
        assert caught.value.code == 404


# -- a real headless Chromium ------------------------------------------------------------------
def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail(
            "chromium and chromedriver are not installed: run `make debs` (Debian packages"
            " chromium and chromium-driver)"
        )
    return chromium, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def page_state(driver: object) -> dict:
    return driver.execute_script("return Object.assign({}, window.forecasterLive || {})")  # type: ignore[attr-defined]


def painted_pixels(driver: object) -> int:
    """Pixels the chart painted (not transparent) on its canvas."""
    return driver.execute_script(  # type: ignore[attr-defined]
        """const c = document.getElementById('chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;"""
    )


def console_errors(driver: object) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]  # type: ignore[attr-defined]


def test_page_in_headless_chromium(
    broker: Broker, prefix: str, tmp_path: Path, browser: object
) -> None:
    """Loads with no console error, draws the chart, and keeps updating while samples flow.

    ``LIVE_PAGE_SCREENSHOT=docs/img/live-page.png`` also saves the screenshot for the docs."""
    streams = [f"room-{k}.temp" for k in range(6)] + ["boiler.pressure", "boiler.flow_2"]
    config = live_config(broker, prefix, tmp_path)
    with RunningDaemon(config) as running, flowing(broker, prefix, streams):
        url = running.metrics_url
        wait_until(
            lambda: (
                min(get_json(f"{url}/live/streams.json")["samples"] or [0]) >= 30
                and len(get_json(f"{url}/live/streams.json")["names"]) == len(streams)
            ),
            "every stream on the page's JSON",
            30,
        )
        driver = browser
        driver.get(f"{url}/live/#stream=room-1.temp")  # type: ignore[attr-defined]
        wait_until(lambda: page_state(driver).get("firstRenderMs") is not None, "first render", 20)
        state = page_state(driver)
        assert state["drawnPoints"] >= 30
        assert painted_pixels(driver) > 1000
        rows = driver.execute_script("return document.querySelectorAll('#streams tbody tr').length")  # type: ignore[attr-defined]
        assert rows == len(streams)
        title = driver.execute_script("return document.getElementById('chart-title').textContent")  # type: ignore[attr-defined]
        assert title == "room-1.temp"
        updates = state["chartUpdates"]
        wait_until(
            lambda: page_state(driver)["chartUpdates"] >= updates + 3,
            "three chart updates with new samples",
            20,
        )
        # choosing another stream in the table redraws the chart for it
        driver.execute_script(  # type: ignore[attr-defined]
            "document.querySelector('#streams tbody tr[data-name=\"boiler.pressure\"]').click()"
        )
        wait_until(
            lambda: (
                driver.execute_script(  # type: ignore[attr-defined]
                    "return document.getElementById('chart-title').textContent"
                )
                == "boiler.pressure"
            ),
            "the chart switched to the chosen stream",
        )
        shot = os.environ.get("LIVE_PAGE_SCREENSHOT")
        if shot:
            driver.execute_script(  # type: ignore[attr-defined]
                "document.querySelector('#streams tbody tr[data-name=\"room-1.temp\"]').click()"
            )
            wait_until(lambda: page_state(driver)["drawnPoints"] >= 200, "a full chart", 30)
        target = Path(shot) if shot else tmp_path / "live-page.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(target))  # type: ignore[attr-defined]
        assert page_state(driver)["errors"] == 0
        assert console_errors(driver) == []
