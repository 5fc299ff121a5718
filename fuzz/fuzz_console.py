"""Target: the console's transmit and receive request paths on popped
chains (the steps of devices/console._transmit and _receive: fill_host_iov,
_write_all into a memfd, readv from a memfd holding fuzzed input).  Output
must be exactly the readable bytes; input lands in the writable buffers in
order and nowhere else."""
from __future__ import annotations

import os

import numpy as np

from lguest_jit import vring
from lguest_jit.devices import console
from lguest_jit.hw.libc import fill_host_iov, host_iov, pollfds, sys_readv

from .common import Reader, digest, main
from .ring import Ring, apply_writes, gather

_fds = None


def _files():
    global _fds
    if _fds is None:
        _fds = (os.memfd_create("fuzz-out", os.MFD_CLOEXEC), os.memfd_create("fuzz-in", os.MFD_CLOEXEC),
                os.eventfd(0, os.EFD_CLOEXEC))
    return _fds


def one_input(data: bytes) -> str:
    out_fd, in_fd, stop_fd = _files()
    r = Reader(data)
    receive = bool(r.u8() & 1)
    typed = r.take(r.u8()) if receive else b""
    ring = Ring(r)
    os.ftruncate(out_fd, 0)
    os.lseek(out_fd, 0, os.SEEK_SET)
    os.ftruncate(in_fd, 0)
    os.pwrite(in_fd, typed, 0)
    os.lseek(in_fd, 0, os.SEEK_SET)
    hiov, pfd, cs = host_iov(ring.size), pollfds(2), np.zeros(console.CS_FIELDS, np.int64)
    results, sent = [], b""
    for head, bufs in ring.chains(results):
        nout, nin = int(ring.q[vring.Q_OUT]), int(ring.q[vring.Q_IN])
        if receive:
            if nout:
                results.append("readable input buffer")
                break
            want = bytearray(ring.mem.tobytes())
            n = fill_host_iov(ring.mem, ring.iov, 0, nin, hiov)
            start = os.lseek(in_fd, 0, os.SEEK_CUR)
            done = int(sys_readv(in_fd, hiov.ctypes.data, n)) if n else 0
            assert done == min(sum(ln for _a, ln, _w in bufs), len(typed) - start), (done, bufs)
            apply_writes(want, bufs, typed[start:start + done])
            assert ring.mem.tobytes() == bytes(want), "input landed outside the writable buffers"
            if n and done == 0:
                results.append("eof")       # _receive hands the chain back and stops
                break
            used = done
        else:
            if nin:
                results.append("writable output buffer")
                break
            n = fill_host_iov(ring.mem, ring.iov, 0, nout, hiov)
            done, err = (int(x) for x in console._write_all(out_fd, stop_fd, hiov, n, pfd, cs))
            assert err == 0, err
            sent += gather(ring.mem.tobytes(), bufs)
            assert done == sum(ln for _a, ln, _w in bufs)
            used = 0
        results.append((head, used))
        ring.complete(head, used)
    if not receive:
        size = os.fstat(out_fd).st_size
        assert os.pread(out_fd, size + 1, 0) == sent, "console output is not the readable bytes"
    return digest(results, ring.mem.tobytes(), sent)


if __name__ == "__main__":
    main("fuzz.fuzz_console")
