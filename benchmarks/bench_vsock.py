"""virtio-vsock through the whole device path, next to a plain Unix socket pair.

The guest side is the in-process driver (``lguest_jit.testing.VsockGuest``)
playing Linux's virtio transport, credit and all; the host side is a real
Unix socket read or written by a host thread.  Guest -> host: RW packets of
the message size while the device's credit allows, the host reading.
Host -> guest: the host writing messages, the guest taking RW packets and
giving credit back.  The reference moves the same bytes in the same
message sizes over ``socket.socketpair``.
"""
from __future__ import annotations

import os
import socket
import tempfile
import threading
import time

from lguest_jit import pci
from lguest_jit.devices import vsock as vs
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.testing import VirtioPciDriver, VsockGuest

from .common import WARMUP_TIMEOUT, jit_disabled, live, report, side

UNIT = "MB/s of payload, one connection; message = bytes per write (and per guest packet)"
SIZES = (4096, 65536)
CID = 3


def _total(quick: bool) -> int:
    if jit_disabled():
        return (1 << 20) if quick else (4 << 20)
    return (4 << 20) if quick else (32 << 20)


class _Rig:
    def __init__(self, msg: int):
        self.dir = tempfile.mkdtemp(prefix="bench-vsock-")
        self.gm = GuestMemory(64 << 20)
        self.bus = pci.Bus(self.gm)
        self.dev = vs.Vsock(CID, os.path.join(self.dir, "v"))
        slot = max(msg, 4096) + 4096
        drv = VirtioPciDriver(self.bus, self.bus.add_device(self.dev).slot, self.gm, slot_bytes=slot,
                              queue_span=64 * slot + (1 << 20))
        drv.init(queue_sizes=[64, 64, 8])
        self.guest = VsockGuest(drv, CID, rx_buf=max(msg, 4096) + 44)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(os.path.join(self.dir, "v_80"))
        self.srv.listen(1)
        self.guest.send(vs.OP_REQUEST, 1000, 80)
        pkt = self.guest.recv(timeout=WARMUP_TIMEOUT)
        assert pkt["op"] == vs.OP_RESPONSE, pkt
        self.host, _ = self.srv.accept()

    def close(self):
        self.host.close()
        self.srv.close()
        self.dev.close()
        self.bus.close()
        self.gm.close()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


def _reader(sock, total, done):
    buf = bytearray(1 << 20)
    got = 0
    while got < total:
        n = sock.recv_into(buf)
        if not n:
            break
        got += n
    done.append(got)


def _guest_to_host(msg: int, total: int) -> float:
    rig = _Rig(msg)
    try:
        g, q = rig.guest, rig.guest.drv.queues[0]
        payload = os.urandom(msg)
        done = []
        t = threading.Thread(target=_reader, args=(rig.host, total, done))
        t0 = time.perf_counter()
        t.start()
        sent, fwd, batch = 0, 0, 0
        while sent < total:
            if sent - fwd + msg <= vs.BUF_ALLOC:
                batch += 1
                sent += msg
                # Up to 8 packets per notification, as a Linux guest batches its tx work.
                g.send(vs.OP_RW, 1000, 80, payload, kick=batch % 8 == 0 or sent >= total)
            if sent - fwd + msg > vs.BUF_ALLOC:
                g.drv.kick(1)                  # out of credit: what is queued must go out
            while q.used_idx() != q.last_used or sent - fwd + msg > vs.BUF_ALLOC:
                fwd = g.recv(timeout=WARMUP_TIMEOUT)["fwd_cnt"]
        t.join()
        dt = time.perf_counter() - t0
        assert done == [total], done
        return total / dt / 1e6
    finally:
        rig.close()


def _writer(sock, msg, total):
    block = os.urandom(msg)
    for _ in range(total // msg):
        sock.sendall(block)


def _host_to_guest(msg: int, total: int) -> float:
    rig = _Rig(msg)
    try:
        g = rig.guest
        t = threading.Thread(target=_writer, args=(rig.host, msg, total))
        t0 = time.perf_counter()
        t.start()
        got, told = 0, 0
        while got < total:
            pkt = g.recv(timeout=WARMUP_TIMEOUT)
            got += len(pkt["data"])
            g.consumed(1000, 80, len(pkt["data"]))
            if got - told >= g.buf_alloc // 2:
                g.send(vs.OP_CREDIT_UPDATE, 1000, 80)
                told = got
        t.join()
        dt = time.perf_counter() - t0
        return total / dt / 1e6
    finally:
        rig.close()


def _socketpair(msg: int, total: int) -> float:
    a, b = socket.socketpair()
    try:
        done = []
        t = threading.Thread(target=_reader, args=(b, total, done))
        t0 = time.perf_counter()
        t.start()
        _writer(a, msg, total)
        t.join()
        return total / (time.perf_counter() - t0) / 1e6
    finally:
        a.close()
        b.close()


CASES = [(f"{d}_{m // 1024}KiB", d, m) for d in ("guest_to_host", "host_to_guest") for m in SIZES]


def _run(title, fn, quick) -> dict:
    total = _total(quick)
    out = {}
    with live(title, len(CASES)) as step:
        for name, direction, msg in CASES:
            step(name)
            out[f"{name}_MB_per_s"] = max(fn(direction, msg, total) for _ in range(1 if quick else 2))
    return out


def measure(quick: bool = False) -> dict:
    return _run(f"bench vsock: {side()} device path",
                lambda d, m, n: (_guest_to_host if d == "guest_to_host" else _host_to_guest)(m, n), quick)


def measure_reference(quick: bool = False) -> dict:
    return _run("bench vsock: Unix socket pair", lambda d, m, n: _socketpair(m, n), quick)


def run(quick: bool = False) -> dict:
    return report("vsock", UNIT, "benchmarks.bench_vsock", quick, measure, measure_reference, "socketpair")
