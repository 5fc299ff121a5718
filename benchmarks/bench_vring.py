"""vring engine throughput: pop + push + publish cycles per second, split
and packed rings side by side.

A chain of 1, 3 or 17 descriptors (direct, or one indirect table) is built
once by the mock driver; each cycle the driver re-posts it and the device
pops, pushes and publishes it — the per-chain work of a device that
completes every request at once.  The driver side runs in the same kernel
so the figure is the engine's, not Python's loop.  Split ring: the driver
re-posts the head (ring entry, then avail.idx).  Packed ring (``_packed``
cases, same chain shapes): there is no separate avail ring, so the driver
writes the list's descriptors at the next ring positions with the lap's
AVAIL/USED bits, the first one's flags last (one descriptor when indirect).
``ns_per_chain`` gives each case's per-request cost (Numba side).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from lguest_jit import vring
from lguest_jit.hw.memory import GuestMemory, st_u16, st_u16_release, st_u32, st_u64
from lguest_jit.testing import MockDriver

from .common import rates, report, side, min_time_for

QUEUE_SIZE = 256
CASES = [(1, False), (3, False), (17, False), (3, True), (17, True)]
LAYOUTS = ("split", "packed")


@njit(nogil=True, cache=True)
def _cycles(mem, q, iov, n, avail, size, head):
    idx = 0
    for _ in range(n):
        # Driver: post the head again.
        st_u16(mem, avail + 4 + 2 * (idx & (size - 1)), head)
        idx = (idx + 1) & 0xFFFF
        st_u16_release(mem, avail + 2, idx)
        # Device: take it, complete it.
        h = vring._pop(mem, q, iov)
        if h < 0:
            return -1
        vring._push(mem, q, h, 0)
        vring._publish(mem, q)
    return n


@njit(nogil=True, cache=True)
def _cycles_packed(mem, q, iov, n, ring, size, descs):
    """The packed ring's cycle: ``descs`` rows (addr, len, id, flags without
    the lap bits) are the list the driver writes at its next positions."""
    pos = q[vring.Q_LAST_AVAIL]
    wrap = q[vring.Q_AVAIL_WRAP]
    k = descs.shape[0]
    for _ in range(n):
        # Driver: the list at the next slots, the first descriptor's flags last.
        first = pos
        first_flags = 0
        for j in range(k):
            d = ring + 16 * pos
            lap = vring.VRING_PACKED_DESC_F_AVAIL if wrap else vring.VRING_PACKED_DESC_F_USED
            st_u64(mem, d, descs[j, 0])
            st_u32(mem, d + 8, descs[j, 1])
            st_u16(mem, d + 12, descs[j, 2])
            if j == 0:
                first_flags = descs[j, 3] | lap
            else:
                st_u16(mem, d + 14, descs[j, 3] | lap)
            pos += 1
            if pos == size:
                pos = 0
                wrap ^= 1
        st_u16_release(mem, ring + 16 * first + 14, first_flags)
        # Device: take it, complete it.
        h = vring._pop(mem, q, iov)
        if h < 0:
            return -1
        vring._push(mem, q, h, 0)
        vring._publish(mem, q)
    return n


def _case(ndesc: int, indirect: bool, layout: str = "split"):
    if layout == "packed":
        return _packed_case(ndesc, indirect)
    return _split_case(ndesc, indirect)


def _packed_case(ndesc: int, indirect: bool):
    gm = GuestMemory(8 << 20)
    feats = 1 << vring.VIRTIO_RING_F_INDIRECT_DESC | 1 << vring.VIRTIO_F_RING_PACKED
    drv = MockDriver(gm, size=QUEUE_SIZE, features=feats, slot_bytes=64 * 17)
    bid = drv.add(out=[b"x" * 16] * (ndesc - 1), in_=[16], indirect=indirect)
    # The list as the driver wrote it, to write again each cycle.
    rows = []
    for j in range(drv.inflight[bid][0]):
        d = drv.desc + 16 * j
        raw = gm.mem[d:d + 16].tobytes()
        flags = int.from_bytes(raw[14:16], "little") & ~(drv.F_AVAIL | drv.F_USED)
        rows.append((int.from_bytes(raw[0:8], "little"), int.from_bytes(raw[8:12], "little"), bid, flags))
    descs = np.array(rows, dtype=np.int64)
    q = drv.device_queue()
    iov = vring.new_iov(QUEUE_SIZE)
    gm.mem[drv.desc:drv.desc + 16 * QUEUE_SIZE] = 0       # the cycles post it from the first slot

    def run(n):
        if _cycles_packed(gm.mem, q, iov, n, drv.desc, QUEUE_SIZE, descs) != n:
            raise RuntimeError("benchmark ring broke: " + vring.error_message(q[vring.Q_ERROR]))
    return run


def _split_case(ndesc: int, indirect: bool):
    gm = GuestMemory(8 << 20)
    feats = 1 << vring.VIRTIO_RING_F_INDIRECT_DESC
    drv = MockDriver(gm, size=QUEUE_SIZE, features=feats, slot_bytes=64 * 17)
    head = drv.add(out=[b"x" * 16] * (ndesc - 1), in_=[16], indirect=indirect)
    q = drv.device_queue()
    iov = vring.new_iov(QUEUE_SIZE)

    def run(n):
        q[vring.Q_LAST_AVAIL] = 0
        if _cycles(gm.mem, q, iov, n, drv.avail, QUEUE_SIZE, head) != n:
            raise RuntimeError("benchmark ring broke: " + vring.error_message(q[vring.Q_ERROR]))
    return run


def case_name(ndesc: int, indirect: bool, layout: str) -> str:
    # Split cases keep the names they had before packed rings, for comparisons across runs.
    return f"chains_per_s_{ndesc}desc_{'indirect' if indirect else 'direct'}" + ("_packed" if layout == "packed" else "")


def measure(quick: bool = False) -> dict:
    cases = {case_name(ndesc, indirect, layout): _case(ndesc, indirect, layout)
             for layout in LAYOUTS for ndesc, indirect in CASES}
    return rates(f"bench vring: {side()}", cases, min_time_for(quick, 0.25))


def per_chain_ns(rates_: dict) -> dict:
    """Per-request cost (ns) of each chain shape, split beside packed."""
    out = {}
    for ndesc, indirect in CASES:
        shape = f"{ndesc}desc_{'indirect' if indirect else 'direct'}"
        out[shape] = {layout: round(1e9 / rates_[case_name(ndesc, indirect, layout)], 1)
                      for layout in LAYOUTS if rates_.get(case_name(ndesc, indirect, layout))}
    return out


def run(quick: bool = False) -> dict:
    rep = report("vring", "pop+push+publish cycles per second, one core", "benchmarks.bench_vring", quick,
                 measure, queue_size=QUEUE_SIZE)
    rep["ns_per_chain"] = per_chain_ns(rep["numba"])
    rep["ns_per_chain_python"] = per_chain_ns(rep["python"])
    return rep
