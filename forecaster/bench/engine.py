"""``forecaster bench engine``: ns per stream-step of a tick beside a bare nn.RNN call, and peak RSS."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Iterator

import numpy as np

from forecaster.progress import progress_bar
from forecaster.runtime import tune_process


def _timed(call: object, repeats: int) -> float:
    """Median seconds of ``call()`` over ``repeats`` runs (after one warm-up run)."""
    call()  # type: ignore[operator]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


CPU_SIZES = (1, 10, 100, 1000, 10_000, 100_000)
GPU_SIZES = (1000, 10_000, 100_000, 1_000_000)


def bench_engine(
    sizes: tuple[int, ...] | None = None,
    device: str = "cpu",
    checkpoint_path: str | None = None,
    busy: int = 0,
) -> dict[str, object]:
    """ns per stream-step of ``Engine.tick_batch`` (columns in and out: validation, gather,
    normalise, step, scatter, scoring) and of ``Engine.tick`` (``Sample`` objects in, ``Forecast``
    objects out) for ticks of ``n`` distinct streams, beside a plain ``nn.RNN`` + ``Linear`` call
    over the same batch, so the engine's own overhead is visible. Each engine first ticks its
    streams past their first samples (``refit_young + refit_every`` ticks), so the figures are a
    running daemon's, not a cold start's. ``device`` is ``model.device``: on ``cuda`` the model
    and hidden states live on the GPU, the per-stream arithmetic stays on the host.
    ``checkpoint_path``: another trained model (``forecaster train --cell lstm --hidden-size
    256 --num-layers 2``) instead of the shipped one. ``busy``: that many processes spin
    beside the timed ticks, as a broker, paho and a collector do beside a daemon on a small
    machine (``--busy 2`` on 2 cores: every core wanted)."""
    if sizes is None:
        sizes = CPU_SIZES if device == "cpu" else GPU_SIZES
    with _spinning(busy):
        return _time_sizes(sizes, device, checkpoint_path) | {"busy": busy}


@contextlib.contextmanager
def _spinning(processes: int) -> Iterator[None]:
    """``processes`` busy loops (separate processes: no GIL shared) while the block runs."""
    import subprocess
    import sys

    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)
    ]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def _time_sizes(
    sizes: tuple[int, ...], device: str, checkpoint_path: str | None
) -> dict[str, object]:
    import torch

    from forecaster.combine import CombinerConfig
    from forecaster.engine import Batch, Engine, Sample
    from forecaster.persist import load_checkpoint

    # The daemon's thread count; glibc's mmap threshold stays dynamic: the engine's figure is the
    # same either way, the bare call's is best this way (see ``runtime.tune_process``).
    tune_process(1, allocator=False)
    checkpoint = load_checkpoint(checkpoint_path)
    model = checkpoint.model.eval()
    settings = CombinerConfig()
    settling = settings.refit_young + settings.refit_every  # ticks before the timed ones
    on_gpu = torch.device(device).type == "cuda"
    rows = []
    for n in progress_bar(sizes, desc="engine sizes", leave=False):
        rng = np.random.default_rng(0)
        names = [f"s{i}" for i in range(n)]
        repeats = max(3, min(200, 200_000 // n))
        # Inputs are built beforehand: the figure is the engine's, not the driver's.
        values = [rng.standard_normal(n) for _ in range(repeats + 1)]
        batches = iter([Batch.of(names, v) for v in values])
        batches_rnn = iter([Batch.of(names, v) for v in values])
        samples = iter(
            [[Sample(s, x) for s, x in zip(names, v.tolist(), strict=True)] for v in values]
        )
        columns, objects = (
            Engine(model, checkpoint.normalizer, device=device),
            Engine(model, checkpoint.normalizer, device=device),
        )
        # Streams past their first samples, as a running daemon's are: there the AR reader
        # solves its equations at every sample, which is not what serving costs.
        for _ in range(settling):
            settle = Batch.of(names, rng.standard_normal(n))
            columns.tick_batch(settle)
            objects.tick_batch(settle)

        def tick_batch(engine: Engine = columns, batches: Iterator[Batch] = batches) -> None:
            engine.tick_batch(next(batches))

        def tick(engine: Engine = objects, samples: Iterator[list[Sample]] = samples) -> None:
            _ = engine.tick(next(samples)).forecasts

        # The same ticks with the RNN alone (engine.combine.enabled: false): what the readers
        # beside it (forecaster.combine) cost, side by side.
        rnn_only = Engine(
            model, checkpoint.normalizer, device=device, combine=CombinerConfig(enabled=False)
        )
        for _ in range(settling):
            rnn_only.tick_batch(Batch.of(names, rng.standard_normal(n)))

        def tick_rnn(engine: Engine = rnn_only, batches: Iterator[Batch] = batches_rnn) -> None:
            engine.tick_batch(next(batches))

        state = model.init_state(n, torch.device(device))
        x = torch.randn(n, 1, 1, device=device)

        def plain(state: torch.Tensor = state, x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x, state)  # nn.RNN + Linear, nothing else
            if on_gpu:  # the tick waits for its forecasts; so does this
                torch.cuda.synchronize()

        batch_s, plain_s = _timed(tick_batch, repeats), _timed(plain, repeats)
        objects_s, rnn_s = _timed(tick, repeats), _timed(tick_rnn, repeats)
        rows.append(
            {
                "streams": n,
                "engine_ns_per_step": 1e9 * batch_s / n,
                "plain_rnn_ns_per_step": 1e9 * plain_s / n,
                "overhead": batch_s / plain_s,
                "stream_steps_per_s": n / batch_s,
                "objects_ns_per_step": 1e9 * objects_s / n,
                "rnn_only_ns_per_step": 1e9 * rnn_s / n,
                "combine_cost": batch_s / rnn_s,
            }
        )
    return {
        "cell": model.config.cell,
        "hidden_size": model.config.hidden_size,
        "num_layers": model.config.num_layers,
        "device": device,
        "sizes": rows,
    }


def bench_memory(streams: int = 100_000) -> dict[str, float]:
    """Peak RSS of a fresh process that serves ``streams`` active streams through the Engine,
    in ticks of the daemon's largest size (``engine.max_batch``); also that of the RNN alone
    (``engine.combine.enabled: false``), what the readers beside it cost."""
    memory = _memory(streams, combine=True)
    memory["rss_mb_peak_rnn_only"] = _memory(streams, combine=False)["rss_mb_peak"]
    return memory


def _memory(streams: int, combine: bool) -> dict[str, float]:
    import subprocess
    import sys

    from forecaster.config import EngineConfig

    tick = EngineConfig().max_batch

    # VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss over fork and exec, so a child
    # of a big bench process would report the parent's peak.
    code = (
        "import numpy as np\n"
        "from forecaster.runtime import tune_process; tune_process()  # as run does\n"
        "from forecaster.engine import Batch, Engine\n"
        "from forecaster.persist import load_checkpoint\n"
        "def kb(key='VmHWM'):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))\n"
        "ck = load_checkpoint(); base = kb()\n"
        "from forecaster.combine import CombinerConfig\n"
        f"e = Engine(ck.model, ck.normalizer, combine=CombinerConfig(enabled={combine}))\n"
        f"names = [f's{{i}}' for i in range({streams})]\n"
        "for t in range(3):\n"
        f"    for lo in range(0, len(names), {tick}):\n"
        f"        chunk = names[lo:lo + {tick}]\n"
        "        e.tick_batch(Batch.of(chunk, np.full(len(chunk), float(t))))\n"
        "print(base / 1024, kb() / 1024, len(e.streams), kb('RssFile') / 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    return {
        "streams": int(out[2]),
        "rss_mb_idle": float(out[0]),
        "rss_mb_peak": float(out[1]),
        "rss_mb_file": float(out[3]),  # mapped library pages: clean, shared with the page cache
        "tick": tick,
    }


def print_engine(result: dict[str, object], memory: dict[str, float] | None, as_json: bool) -> None:
    """``memory`` None: not measured (a GPU run: the host's RSS says nothing about it)."""
    if as_json:
        print(json.dumps({"engine": result, "memory": memory}))
        return
    print(
        f"engine tick, {result['cell']} hidden {result['hidden_size']}"
        f" x {result['num_layers']} layer(s), one thread, {result['busy']} busy process(es),"
        f" on {result['device']}:"
    )
    print(
        f"  {'streams':>8} {'engine ns/step':>15} {'nn.RNN ns/step':>15} {'overhead':>9}"
        f" {'steps/s':>12} {'objects ns/step':>16} {'RNN-only ns/step':>17} {'readers':>8}"
    )
    for row in result["sizes"]:  # type: ignore[attr-defined]
        print(
            f"  {row['streams']:>8} {row['engine_ns_per_step']:>15.0f} {row['plain_rnn_ns_per_step']:>15.0f}"
            f" {row['overhead']:>8.1f}x {row['stream_steps_per_s']:>12.0f} {row['objects_ns_per_step']:>16.0f}"
            f" {row['rnn_only_ns_per_step']:>17.0f} {row['combine_cost']:>7.1f}x"
        )
    if memory is None:
        return
    print(
        f"memory: {memory['streams']} active streams in ticks of {memory['tick']},"
        f" peak RSS {memory['rss_mb_peak']:.0f} MB"
        f" (after loading the model: {memory['rss_mb_idle']:.0f} MB; at the end, mapped library"
        f" files: {memory['rss_mb_file']:.0f} MB); the RNN alone: {memory['rss_mb_peak_rnn_only']:.0f} MB"
    )
