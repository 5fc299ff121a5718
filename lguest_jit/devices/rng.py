"""virtio-rng (device type 4, virtio 1.0 §5.4): entropy from getrandom(2).

One request queue of device-writable buffers.  Bytes go from getrandom
straight into guest memory; a request gets at most ``cap`` bytes (lguest
reads as much as fits; a cap keeps one greedy driver from hogging the
thread), and short reads from getrandom are continued.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..hw.libc import EINTR, sys_getrandom
from ..vring import CHAIN_WRITABLE, Q_IN, complete, finish, next_chain
from .base import Device

VIRTIO_ID_RNG = 4
QUEUE_SIZE = 64
BYTES_PER_REQUEST = 4096


@njit(nogil=True, cache=True)
def _fill(mem, iov, first, count, cap):
    """getrandom into the writable entries, up to ``cap`` bytes in all."""
    base = mem.ctypes.data
    total = 0
    for k in range(first, first + count):
        want = min(np.int64(iov[k, 1]), cap - total)
        got = 0
        while got < want:
            r = sys_getrandom(base + np.int64(iov[k, 0]) + got, want - got, 0)
            if r == -EINTR:
                continue
            if r <= 0:
                return total + got
            got += r
        total += got
        if total >= cap:
            break
    return total


@njit(nogil=True, cache=True)
def _rng_serve(mem, q, iov, notify_fd, isr, irq_fd, scratch, cap):
    while True:
        head = next_chain(mem, q, iov, notify_fd, isr, irq_fd, scratch, CHAIN_WRITABLE, 0)
        if head < 0:
            break
        n = _fill(mem, iov, 0, q[Q_IN], cap)
        complete(mem, q, head, n, n)
    return finish(mem, q, isr, irq_fd, scratch, head)


class Rng(Device):
    kind = name = "rng"
    device_type = VIRTIO_ID_RNG
    pci_class = (0xFF, 0x00)        # unassigned class (as QEMU's virtio-rng)
    queue_names = ("requests",)
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, bytes_per_request: int = BYTES_PER_REQUEST, on_fatal=None):
        super().__init__(on_fatal)
        if bytes_per_request <= 0:
            raise ValueError("bytes_per_request must be positive")
        self.cap = bytes_per_request
        self.features = self.RING_FEATURES
        self.config = np.zeros(0, dtype=np.uint8)

    def serve(self, index, ctx, stop_fd):
        return int(_rng_serve(*self.queue_args(ctx, index), self.cap))
