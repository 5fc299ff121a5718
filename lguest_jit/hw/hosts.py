"""Which hypervisors this host offers, answered without importing Numba or
numpy: the CLI asks before it loads the engine (``--help`` and argument
errors must stay fast)."""
from __future__ import annotations

import os

LGUEST_DEVICE = "/dev/lguest"


def lguest_available(dev: str = LGUEST_DEVICE) -> bool:
    """True when this host has the lguest device (no current kernel does)."""
    return os.path.exists(dev)


DEFAULT_SAMPLE_HZ = 1000
MAX_SAMPLE_HZ = 10000     # beyond this the profiler's exits would be what it measures


def max_sample_hz() -> int:
    """The highest profiling rate this host's monotonic clock can time (its
    resolution), at most MAX_SAMPLE_HZ."""
    import time
    res = time.clock_getres(time.CLOCK_MONOTONIC)
    return MAX_SAMPLE_HZ if res <= 0 else max(1, min(MAX_SAMPLE_HZ, int(1.0 / res)))


def default_sample_hz() -> int:
    """DEFAULT_SAMPLE_HZ where the host's clock allows it, else the most it allows."""
    return min(DEFAULT_SAMPLE_HZ, max_sample_hz())
