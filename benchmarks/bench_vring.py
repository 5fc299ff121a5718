"""vring engine throughput: pop + push + publish cycles per second.

A chain of 1, 3 or 17 descriptors (direct, or one indirect table) is built
once by the mock driver; each cycle the driver re-posts its head (ring entry,
then avail.idx) and the device pops, pushes and publishes it — the per-chain
work of a device that completes every request at once.  The driver side runs
in the same kernel so the figure is the engine's, not Python's loop.
"""
from __future__ import annotations

from numba import njit

from lguest_jit import vring
from lguest_jit.hw.memory import GuestMemory, st_u16, st_u16_release
from lguest_jit.testing import MockDriver

from .common import rates, report, side, min_time_for

QUEUE_SIZE = 256
CASES = [(1, False), (3, False), (17, False), (3, True), (17, True)]


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


def _case(ndesc: int, indirect: bool):
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


def measure(quick: bool = False) -> dict:
    cases = {f"chains_per_s_{ndesc}desc_{'indirect' if indirect else 'direct'}": _case(ndesc, indirect)
             for ndesc, indirect in CASES}
    return rates(f"bench vring: {side()}", cases, min_time_for(quick, 0.25))


def run(quick: bool = False) -> dict:
    return report("vring", "pop+push+publish cycles per second, one core", "benchmarks.bench_vring", quick,
                  measure, queue_size=QUEUE_SIZE)
