"""Target: the split-ring engine alone (vring._pop/_push/_publish) against
the reference walker, over every chain the fuzzed avail ring offers."""
from __future__ import annotations


from .common import Reader, digest, main
from .ring import Ring


def one_input(data: bytes) -> str:
    r = Reader(data)
    ring = Ring(r)
    results = []
    for head, bufs in ring.chains(results):
        results.append((head, bufs))
        ring.complete(head, sum(ln for _a, ln, w in bufs if w))
    return digest(results, ring.mem.tobytes())


if __name__ == "__main__":
    main("fuzz.fuzz_vring")
