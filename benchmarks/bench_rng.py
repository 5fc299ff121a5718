"""virtio-rng through the whole device path, next to plain getrandom calls.

Same shape as bench_blk: the device's queue thread runs its nogil kernel; a
small driver kernel keeps ``depth`` requests in flight.  The reference is
the physical work: ``os.getrandom`` of the same sizes in a loop.
"""
from __future__ import annotations

import os

import numpy as np

from lguest_jit import pci
from lguest_jit.devices import Rng
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.testing import VirtioPciDriver

from .bench_blk import DRIVER_MAX_QUEUE, drive_rate
from .common import WARMUP_TIMEOUT, device_knobs, rate, report, side, throughput, min_time_for

UNIT = "requests per second and MB/s; depth = requests in flight"
CASES = [(64, 1), (4096, 1), (4096, 32)]


def _device_rate(req_bytes, depth, min_time):
    dev = Rng(bytes_per_request=req_bytes)
    dev.apply_knobs(device_knobs())
    qsize = min(dev.queue_max_sizes[0], DRIVER_MAX_QUEUE)
    depth = min(depth, qsize)
    span = qsize * req_bytes + 16 * qsize * qsize + (2 << 20)
    gm = GuestMemory((span + (2 << 20) + 0xFFF) & ~0xFFF)
    bus = pci.Bus(gm)
    try:
        t = bus.add_device(dev)
        drv = VirtioPciDriver(bus, t.slot, gm, slot_bytes=req_bytes, queue_span=span)
        feats = drv.init(queue_sizes=[qsize])
        q = drv.queues[0]
        heads = np.array([q.add(in_=[req_bytes]) for _ in range(depth)], dtype=np.int64)
        drv.kick(0)
        for _ in range(depth):
            drv.wait_used(0, timeout=WARMUP_TIMEOUT)
        return drive_rate(gm, bus, q, feats, heads, depth, min_time)
    finally:
        bus.close()
        gm.close()


def _getrandom_rate(req_bytes, min_time):
    def run(n):
        for _ in range(n):
            os.getrandom(req_bytes)
    return rate(run, min_time=min_time)


def _cases() -> list:
    """(name, request bytes, (request bytes, depth)) of every case."""
    return [(f"{b}B_depth{d}", b, (b, d)) for b, d in CASES]


def measure(quick: bool = False) -> dict:
    t = min_time_for(quick)
    return throughput(f"bench rng: {side()} device path", _cases(), lambda c: _device_rate(*c, t))


def measure_reference(quick: bool = False) -> dict:
    t = min_time_for(quick)
    return throughput("bench rng: getrandom loop", _cases(), lambda c: _getrandom_rate(c[0], t))


def run(quick: bool = False) -> dict:
    return report("rng", UNIT, "benchmarks.bench_rng",
                  quick, measure, measure_reference, "getrandom_loop")
