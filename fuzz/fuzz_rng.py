"""Target: virtio-rng's request kernel (devices/rng._fill) on popped chains:
exactly min(cap, writable bytes) filled, nothing outside the writable
buffers touched.  A chain with a device-readable buffer is handed back and
the device's own serve kernel (rng._rng_serve) gets it: it must refuse it
with E_CHAIN_READABLE (virtio 1.0 §5.4.6), counted, without filling it."""
from __future__ import annotations

import os

import numpy as np

from lguest_jit import vring

from .common import Reader, digest, main
from .ring import DATA, Ring

from lguest_jit.devices import rng


def one_input(data: bytes) -> str:
    r = Reader(data)
    cap = 1 + r.u8() * 16
    ring = Ring(r)
    results = []
    for head, bufs in ring.chains(results):
        if any(not w for _a, _l, w in bufs):
            results.append(("readable", _serve_readable(ring, cap)))
            break
        before = ring.mem.copy()
        n = int(rng._fill(ring.mem, ring.iov, 0, int(ring.q[vring.Q_IN]), cap))
        assert n == min(cap, sum(ln for _a, ln, _w in bufs)), (n, cap, bufs)
        touched = np.zeros(ring.mem.size, bool)
        left = n
        for a, ln, _w in bufs:
            k = min(ln, left)
            touched[a:a + k] = True
            left -= k
        assert np.array_equal(ring.mem[~touched], before[~touched]), "rng wrote outside its buffers"
        # The bytes are random: a buffer that aliases a descriptor or an
        # indirect table would make later chains differ from run to run (and
        # the pure and Numba replays disagree), so they become a fixed byte.
        ring.mem[touched] = 0x5A
        results.append((head, n))
        ring.complete(head, n)
    return digest(results)      # the bytes are random: only the shape is compared


_irq_fd = None


def _serve_readable(ring, cap) -> int:
    """Hand the chain just popped back, and let the rng's serve kernel pop
    it itself: it must stop at once with -E_CHAIN_READABLE, count the
    error and leave every buffer as it was.  (A notify fd of -1: a kernel
    that served the chain and went on to wait would fail E_NOTIFY_READ
    instead of sleeping.)"""
    global _irq_fd
    if _irq_fd is None:
        _irq_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    q = ring.q
    vring.unpop(q)
    errors, first, before = int(q[vring.Q_N_ERRORS]), int(q[vring.Q_ERROR]), ring.mem.copy()
    code = int(rng._rng_serve(ring.mem, q, ring.iov, -1, np.zeros(1, np.uint8), _irq_fd, np.zeros(1, np.uint64),
                              cap))
    assert code == -vring.E_CHAIN_READABLE, (code, vring.error_message(code))
    assert int(q[vring.Q_N_ERRORS]) == errors + 1, "the refusal was not counted"
    assert int(q[vring.Q_ERROR]) == (first or vring.E_CHAIN_READABLE), int(q[vring.Q_ERROR])
    data = slice(DATA, None)
    assert np.array_equal(ring.mem[data], before[data]), "the refused chain's buffers were written"
    return code


if __name__ == "__main__":
    main("fuzz.fuzz_rng")
