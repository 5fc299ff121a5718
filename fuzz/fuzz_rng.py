"""Target: virtio-rng's request kernel (devices/rng._fill) on popped chains:
exactly min(cap, writable bytes) filled, nothing outside the writable
buffers touched, readable buffers refused."""
from __future__ import annotations

import numpy as np

from lguest_jit import vring

from .common import Reader, digest, main
from .ring import Ring

from lguest_jit.devices import rng


def one_input(data: bytes) -> str:
    r = Reader(data)
    cap = 1 + r.u8() * 16
    ring = Ring(r)
    results = []
    for head, bufs in ring.chains(results):
        if int(ring.q[vring.Q_OUT]):
            results.append("readable")        # the serve loop stops: E_RNG_READABLE
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
        results.append((head, n))
        ring.complete(head, n)
    return digest(results)      # the bytes are random: only the shape is compared


if __name__ == "__main__":
    main("fuzz.fuzz_rng")
