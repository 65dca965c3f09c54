"""Every process and thread setting, in one place, each with the measurement behind it.

Runners call these, never set them themselves: ``forecaster run`` and ``forecaster demo`` (a
daemon in this process), the test harness (``tests/conftest.py``) and each bench. What a setting
changes is speed and memory, never a forecast: the same ticks give the same numbers under any of
them.

- ``tune_process`` before anything is built: the allocator, torch's and NumPy's BLAS threads.
- ``settle`` once the daemon has started: the garbage collector and the GIL switch interval.
- ``tune_learner_thread`` on the learner's own thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
import threading

import torch
from threadpoolctl import threadpool_limits

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's own default, made fixed
SWITCH_INTERVAL = 0.001  # seconds; CPython's default is 0.005


def return_freed_arrays() -> None:
    """Give large freed arrays back to the OS at once (glibc only; elsewhere nothing changes).

    glibc raises its mmap threshold each time a large block is freed, up to 32 MiB, after which
    freed arrays below it stay in the heap: the slot arrays regrown on the way to 100,000
    streams kept ~9 MB of peak RSS that way (``forecaster bench engine``, memory row). A fixed
    threshold turns that off. Process-wide, so a runner sets it, not the stream table.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def tune_process(threads: int = 1, *, allocator: bool = True) -> None:
    """Before building anything: glibc's fixed mmap threshold, torch's intra-op threads and
    NumPy's BLAS threads.

    One thread is the sane default: ``nn.RNN`` on small batches gets slower with two (they
    contend with paho and the broker on these 2-core machines); more pay only for ticks of ~10k
    streams (``model.threads``). ``allocator=False`` keeps glibc's dynamic threshold, for the one
    bench figure (a bare ``nn.RNN`` call) that is best that way: fixed, it maps and faults in
    fresh blocks every call, ~3.5x slower at 10,000 streams here (``forecaster bench engine``).

    NumPy's OpenBLAS always gets one thread: the readers' BLAS calls are small (a (B, 47) by
    (47, 3) product, batched 14 x 14 solves), and OpenBLAS's second thread spins for a core the
    broker and paho also want. With both cores busy that product took erratic times, up to 25x
    its one-thread time (docs/decisions/blas-threads.md). ``threadpoolctl`` sets it at run
    time: the environment variable would have to precede NumPy's import.
    """
    if allocator:
        return_freed_arrays()
    torch.set_num_threads(threads)
    threadpool_limits(1, user_api="blas")


def settle(*, learner: bool) -> None:
    """Once the daemon has started, before it serves.

    Everything built so far (torch, the model, the restored streams: ~180k objects) lives as long
    as the service. Frozen, a full garbage collection no longer walks it; one took 250 ms here,
    and one such pause sets the p99 latency of a whole run.

    With the learner on, a thread asking for the GIL gets it at most 1 ms later (CPython's
    default: 5 ms). The learner's trainer holds the GIL between its torch calls at the lowest CPU
    priority; on a busy machine it can be taken off the CPU holding it, and the forecasting
    thread then waited for the whole interval and more (docs/decisions/switch-interval.md). Not
    without the trainer: between the engine and the MQTT thread alone, 1 ms cost 12 % of the
    saturated rate (3,468 vs 3,959 messages/s, three runs each, 100 streams).
    """
    gc.freeze()
    if learner:
        sys.setswitchinterval(SWITCH_INTERVAL)


def tune_learner_thread() -> None:
    """On the learner's trainer thread: one intra-op thread and the lowest CPU priority.

    OpenMP settings are per thread, so the thread count is set here too: the trainer must never
    take the second core away from the forecasting thread and the broker. Linux schedules
    threads by their own nice value, so nice 19 for this thread only: the forecasting thread,
    paho and the broker always run first.
    """
    torch.set_num_threads(1)
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
