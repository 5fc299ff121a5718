"""Target: the split-ring engine alone (vring._pop/_push/_publish) against
the reference walker, over every chain the fuzzed avail ring offers."""
from __future__ import annotations

from lguest_jit import vring

from .common import Reader, digest, main
from .ring import Ring


def one_input(data: bytes) -> str:
    r = Reader(data)
    ring = Ring(r)
    results = []
    for _ in range(ring.size + 2):
        got = ring.pop()
        if got is None or isinstance(got, int):
            results.append(got)
            break
        head, bufs = got
        results.append((head, bufs))
        vring._push(ring.mem, ring.q, head, sum(ln for _a, ln, w in bufs if w))
        vring._publish(ring.mem, ring.q)
    return digest(results, ring.mem.tobytes())


if __name__ == "__main__":
    main("fuzz.fuzz_vring")
