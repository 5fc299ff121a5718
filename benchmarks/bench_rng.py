"""virtio-rng through the whole device path, next to plain getrandom calls.

Same shape as bench_blk: the device's queue thread runs its nogil kernel; a
small driver kernel keeps ``depth`` requests in flight.  The reference is
the physical work: ``os.getrandom`` of the same sizes in a loop.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from lguest_jit import pci, vring
from lguest_jit.devices import Rng
from lguest_jit.hw.memory import GuestMemory, ld_u16
from lguest_jit.testing import VirtioPciDriver

from .bench_blk import _drive
from .common import WARMUP_TIMEOUT, jit_disabled, three_way

CASES = [(64, 1), (4096, 1), (4096, 32)]


def _device_rate(req_bytes, depth, min_time):
    gm = GuestMemory(16 << 20)
    bus = pci.Bus(gm)
    try:
        t = bus.add_device(Rng(bytes_per_request=req_bytes))
        drv = VirtioPciDriver(bus, t.slot, gm, slot_bytes=req_bytes, queue_span=4 << 20)
        feats = drv.init()
        q = drv.queues[0]
        heads = np.array([q.add(in_=[req_bytes]) for _ in range(depth)], dtype=np.int64)
        drv.kick(0)
        for _ in range(depth):
            drv.wait_used(0, timeout=WARMUP_TIMEOUT)
        rings = np.array([q.desc, q.avail, q.used], dtype=np.int64)
        notify = bus.ioeventfds()[0][2]
        irq = bus.interrupts()[0][1]
        scratch = np.zeros(1, np.uint64)
        event_idx = bool(feats >> vring.VIRTIO_RING_F_EVENT_IDX & 1)

        def run(n):
            if _drive(gm.mem, rings, q.size, heads, depth, n, notify, irq, event_idx, scratch, False) != n:
                raise RuntimeError("device stopped answering")
            q.avail_shadow = ld_u16(gm.mem, q.avail + 2)
            q.last_used = ld_u16(gm.mem, q.used + 2)
        run(64)
        n = 2000
        t0 = time.perf_counter()
        count = 0
        while time.perf_counter() - t0 < min_time:
            run(n)
            count += n
        return count / (time.perf_counter() - t0)
    finally:
        bus.close()
        gm.close()


def _getrandom_rate(req_bytes, min_time):
    t0 = time.perf_counter()
    count = 0
    while time.perf_counter() - t0 < min_time:
        for _ in range(256):
            os.getrandom(req_bytes)
        count += 256
    return count / (time.perf_counter() - t0)


def _name(req_bytes, depth):
    return f"{req_bytes}B_depth{depth}"


def measure(quick: bool = False) -> dict:
    t = 0.1 if quick or jit_disabled() else 0.5
    out = {}
    for req_bytes, depth in CASES:
        rps = _device_rate(req_bytes, depth, t)
        out[f"{_name(req_bytes, depth)}_requests_per_s"] = rps
        out[f"{_name(req_bytes, depth)}_MB_per_s"] = rps * req_bytes / 1e6
    return out


def measure_reference(quick: bool = False) -> dict:
    t = 0.1 if quick else 0.5
    out = {}
    for req_bytes, depth in CASES:
        rps = _getrandom_rate(req_bytes, t)
        out[f"{_name(req_bytes, depth)}_requests_per_s"] = rps
        out[f"{_name(req_bytes, depth)}_MB_per_s"] = rps * req_bytes / 1e6
    return out


def run(quick: bool = False) -> dict:
    return three_way("rng", "requests per second and MB/s; depth = requests in flight", "benchmarks.bench_rng",
                     quick, measure, measure_reference, "getrandom_loop")


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
