"""virtio-vsock through the whole device path, next to a plain Unix socket pair.

The connection is made by the in-process driver
(``lguest_jit.testing.VsockGuest``); then the guest's data path is a small
kernel (a Python driver would measure Python: ~40 us of it per packet, ten
times what the device takes for 4 KiB), playing Linux's virtio transport,
credit and all, on the same rings: it keeps the tx queue full of prebuilt
packets and the rx queue of posted buffers, kicks only when the device
asked for it and sleeps on the interrupt.  The host side is a real Unix
socket read or written by a host thread.  Guest -> host: RW packets of the
message size while the device's credit allows, the host reading.  Host ->
guest: the host writing messages, the guest taking each packet (its length;
the payload stays in its buffer) and giving credit back every half buffer
(and when asked).  Neither direction counts the guest's copy to or from its
application: that is guest work, and the device's share of each direction
is one side of the socket pair (a write into, or a read out of, a host
socket).  The reference moves the same bytes in the same message sizes over
``socket.socketpair``, case by case between the device's runs, the best of
three runs of each kept.
"""
from __future__ import annotations

import os
import socket
import tempfile
import threading
import time

import numpy as np
from numba import njit

from lguest_jit import pci, vring
from lguest_jit.devices import vsock as vs
from lguest_jit.hw.libc import EINTR, POLLIN, pollfds, sys_poll, sys_read, sys_write
from lguest_jit.hw.memory import (GuestMemory, fence, ld_u16, ld_u16_acquire, ld_u32, ld_u64, st_u16, st_u16_release,
                                  st_u32)
from lguest_jit.testing import VirtioPciDriver, VsockGuest

from .common import WARMUP_TIMEOUT, jit_disabled, live, report, side

UNIT = "MB/s of payload, one connection; message = bytes per write (and per guest packet)"
SIZES = (4096, 65536)
CID = 3


def _total(quick: bool) -> int:
    if jit_disabled():
        return (1 << 20) if quick else (4 << 20)
    return (4 << 20) if quick else (256 << 20)      # a full run: ~0.1 s or more per measurement


WAIT_MS = int(WARMUP_TIMEOUT * 1000)    # a device that stops answering fails the run, not hangs it

# The guest kernels' ring positions (``pos``) and ring addresses (``rings``).
RX_AVAIL, RX_USED, TX_AVAIL, TX_USED, TX_NFREE = range(5)
RX_DESC, RX_AVAIL_RING, RX_USED_RING, TX_AVAIL_RING, TX_USED_RING = range(5)


@njit(nogil=True, cache=True)
def _publish(mem, avail, used, size, new, old, notify_fd, event_idx, scratch):
    """Make avail entries old..new visible and kick if the device asked."""
    if new == old:
        return
    st_u16_release(mem, avail + 2, new)
    fence()
    if event_idx:
        kick = ((new - ld_u16(mem, used + 4 + 8 * size) - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
    else:
        kick = (ld_u16(mem, used) & vring.VRING_USED_F_NO_NOTIFY) == 0
    if kick:
        scratch[0] = 1
        sys_write(notify_fd, scratch.ctypes.data, 8)


@njit(nogil=True, cache=True)
def _reap_tx(mem, rings, tx_size, pos, txfree):
    """Tx buffers the device is done with go back on the free stack."""
    used = rings[TX_USED_RING]
    now = ld_u16_acquire(mem, used + 2)
    n = 0
    while pos[TX_USED] != now:
        txfree[pos[TX_NFREE]] = ld_u32(mem, used + 4 + 8 * (pos[TX_USED] & (tx_size - 1)))
        pos[TX_NFREE] += 1
        pos[TX_USED] = (pos[TX_USED] + 1) & 0xFFFF
        n += 1
    return n


@njit(nogil=True, cache=True)
def _wait(mem, rings, rx_size, tx_size, pos, irq, event_idx, scratch, want_tx):
    """Ask for an interrupt at the next used entry of the rx queue (and of
    the tx queue if ``want_tx``), then sleep on it (``irq``: a pollfd row
    for its eventfd) unless one came meanwhile.  False if none came within
    WAIT_MS or the wait failed."""
    if event_idx:
        st_u16(mem, rings[RX_AVAIL_RING] + 4 + 2 * rx_size, pos[RX_USED])
        # Tx completions matter only when no tx buffer is free: otherwise
        # ask for none (an index the device reaches after 64 Ki packets),
        # as Linux's drivers leave their tx callbacks off until then.
        st_u16(mem, rings[TX_AVAIL_RING] + 4 + 2 * tx_size, pos[TX_USED] if want_tx else (pos[TX_USED] - 1) & 0xFFFF)
    fence()
    if (ld_u16_acquire(mem, rings[RX_USED_RING] + 2) != pos[RX_USED]
            or (want_tx and ld_u16_acquire(mem, rings[TX_USED_RING] + 2) != pos[TX_USED])):
        return True
    r = sys_poll(irq.ctypes.data, 1, WAIT_MS)
    if r == -EINTR:
        return True
    return r > 0 and sys_read(irq[0, 0], scratch.ctypes.data, 8) >= 0


@njit(nogil=True, cache=True)
def _guest_sends(mem, rings, rx_size, tx_size, pos, txfree, txaddr, depth, msg, total, buf_alloc, notify_rx,
                 notify_tx, irq, event_idx, scratch):
    """Guest -> host: RW packets of ``msg`` bytes (payload prebuilt) while
    the device's credit allows; the credit comes back in the fwd_cnt of
    every packet on the rx queue.  Returns bytes sent, -1 if waiting failed or timed out."""
    sent = np.int64(0)
    fwd = np.int64(0)
    while True:
        busy = _reap_tx(mem, rings, tx_size, pos, txfree) > 0
        used = rings[RX_USED_RING]
        now = ld_u16_acquire(mem, used + 2)
        old = pos[RX_AVAIL]
        while pos[RX_USED] != now:
            head = ld_u32(mem, used + 4 + 8 * (pos[RX_USED] & (rx_size - 1)))
            fwd = ld_u32(mem, ld_u64(mem, rings[RX_DESC] + 16 * head) + 40)
            st_u16(mem, rings[RX_AVAIL_RING] + 4 + 2 * (pos[RX_AVAIL] & (rx_size - 1)), head)
            pos[RX_AVAIL] = (pos[RX_AVAIL] + 1) & 0xFFFF
            pos[RX_USED] = (pos[RX_USED] + 1) & 0xFFFF
            busy = True
        _publish(mem, rings[RX_AVAIL_RING], used, rx_size, pos[RX_AVAIL], old, notify_rx, event_idx, scratch)
        if sent >= total and pos[TX_NFREE] == depth:
            return sent
        old = pos[TX_AVAIL]
        while pos[TX_NFREE] > 0 and sent < total and ((sent - fwd) & 0xFFFFFFFF) + msg <= buf_alloc:
            pos[TX_NFREE] -= 1
            head = txfree[pos[TX_NFREE]]
            a = txaddr[head]
            st_u32(mem, a + 24, msg)
            st_u16(mem, a + 30, vs.OP_RW)
            st_u16(mem, rings[TX_AVAIL_RING] + 4 + 2 * (pos[TX_AVAIL] & (tx_size - 1)), head)
            pos[TX_AVAIL] = (pos[TX_AVAIL] + 1) & 0xFFFF
            sent += msg
            busy = True
        _publish(mem, rings[TX_AVAIL_RING], rings[TX_USED_RING], tx_size, pos[TX_AVAIL], old, notify_tx, event_idx,
                 scratch)
        if not busy and not _wait(mem, rings, rx_size, tx_size, pos, irq, event_idx, scratch,
                                  pos[TX_NFREE] == 0 or sent >= total):
            return -1


@njit(nogil=True, cache=True)
def _guest_receives(mem, rings, rx_size, tx_size, pos, txfree, txaddr, total, buf_alloc, notify_rx, notify_tx,
                    irq, event_idx, scratch):
    """Host -> guest: each RW packet's length counted (its payload stays
    where the device put it: the guest's own copy to its application is
    guest work, as its copy from one is in the other direction), its buffer
    posted again, and a CREDIT_UPDATE every half buffer
    consumed or when the device asks (CREDIT_REQUEST).  Returns bytes
    received, -1 if waiting failed or timed out."""
    got = np.int64(0)
    told = np.int64(0)
    asked = False
    while got < total:
        busy = _reap_tx(mem, rings, tx_size, pos, txfree) > 0
        used = rings[RX_USED_RING]
        now = ld_u16_acquire(mem, used + 2)
        old = pos[RX_AVAIL]
        while pos[RX_USED] != now:
            head = ld_u32(mem, used + 4 + 8 * (pos[RX_USED] & (rx_size - 1)))
            a = ld_u64(mem, rings[RX_DESC] + 16 * head)
            op = ld_u16(mem, a + 30)
            if op == vs.OP_RW:
                got += ld_u32(mem, a + 24)
            elif op == vs.OP_CREDIT_REQUEST:
                asked = True
            st_u16(mem, rings[RX_AVAIL_RING] + 4 + 2 * (pos[RX_AVAIL] & (rx_size - 1)), head)
            pos[RX_AVAIL] = (pos[RX_AVAIL] + 1) & 0xFFFF
            pos[RX_USED] = (pos[RX_USED] + 1) & 0xFFFF
            busy = True
        _publish(mem, rings[RX_AVAIL_RING], used, rx_size, pos[RX_AVAIL], old, notify_rx, event_idx, scratch)
        if (asked or got - told >= buf_alloc // 2) and pos[TX_NFREE] > 0:
            pos[TX_NFREE] -= 1
            head = txfree[pos[TX_NFREE]]
            a = txaddr[head]
            st_u32(mem, a + 24, 0)
            st_u16(mem, a + 30, vs.OP_CREDIT_UPDATE)
            st_u32(mem, a + 40, got & 0xFFFFFFFF)
            old = pos[TX_AVAIL]
            st_u16(mem, rings[TX_AVAIL_RING] + 4 + 2 * (pos[TX_AVAIL] & (tx_size - 1)), head)
            pos[TX_AVAIL] = (pos[TX_AVAIL] + 1) & 0xFFFF
            _publish(mem, rings[TX_AVAIL_RING], rings[TX_USED_RING], tx_size, pos[TX_AVAIL], old, notify_tx,
                     event_idx, scratch)
            told = got
            asked = False
            busy = True
        if not busy and not _wait(mem, rings, rx_size, tx_size, pos, irq, event_idx, scratch, pos[TX_NFREE] == 0):
            return -1
    return got


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
        self._hand_over(msg)

    def _hand_over(self, msg: int) -> None:
        """Give the rings to the guest kernels: the tx queue filled once with
        prebuilt packets (sent as CREDIT_UPDATEs, which the device only
        reads, and drained), the rx buffers as VsockGuest posted them."""
        drv = self.guest.drv
        rx, tx = drv.queues[0], drv.queues[1]
        assert not getattr(rx, "packed", False), "the vsock bench drives split rings"
        while tx.get_used() is not None:
            pass
        hdr = self.guest.header(vs.OP_CREDIT_UPDATE, 1000, 80)
        heads = []
        while tx.num_free:
            heads.append(tx.add(out=[hdr + bytes(msg)]))
        drv.kick(1)
        deadline = time.monotonic() + WARMUP_TIMEOUT
        while tx.used_idx() != tx.avail_shadow:
            if time.monotonic() > deadline:
                raise RuntimeError("the device did not take the prebuilt packets")
            time.sleep(0.001)
        self.txaddr = np.zeros(tx.size, dtype=np.int64)
        for h in heads:
            self.txaddr[h] = tx.inflight[h][1][0][0]
        self.depth = len(heads)
        self.txfree = np.array(heads, dtype=np.int64)
        self.pos = np.zeros(5, dtype=np.int64)
        self.pos[:] = (rx.avail_shadow, rx.last_used, tx.avail_shadow, tx.used_idx(), len(heads))
        self.rings = np.array([rx.desc, rx.avail, rx.used, tx.avail, tx.used], dtype=np.int64)
        self.sizes = (rx.size, tx.size)
        self.event_idx = bool(rx.features >> vring.VIRTIO_RING_F_EVENT_IDX & 1)
        fds = self.bus.ioeventfds()
        self.notify = (fds[0][2], fds[1][2])
        self.irq = pollfds(1)
        self.irq[0] = (self.bus.interrupts()[0][1], POLLIN)
        self.scratch = np.zeros(1, np.uint64)

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
        done = []
        t = threading.Thread(target=_reader, args=(rig.host, total, done))
        t0 = time.perf_counter()
        t.start()
        sent = _guest_sends(rig.gm.mem, rig.rings, *rig.sizes, rig.pos, rig.txfree, rig.txaddr, rig.depth, msg,
                            total, vs.BUF_ALLOC, *rig.notify, rig.irq, rig.event_idx, rig.scratch)
        assert sent == total, sent
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
        t = threading.Thread(target=_writer, args=(rig.host, msg, total))
        t0 = time.perf_counter()
        t.start()
        got = _guest_receives(rig.gm.mem, rig.rings, *rig.sizes, rig.pos, rig.txfree, rig.txaddr, total,
                              rig.guest.buf_alloc, *rig.notify, rig.irq, rig.event_idx, rig.scratch)
        assert got == total, got
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


def _device(direction, msg, total):
    return (_guest_to_host if direction == "guest_to_host" else _host_to_guest)(msg, total)


def _reference(direction, msg, total):
    return _socketpair(msg, total)


def _warm_up():
    # The guest kernels compile (or load from the cache) outside the timing.
    for m in SIZES:
        _guest_to_host(m, 4 * m)
        _host_to_guest(m, 4 * m)


def _run(title, sides, quick) -> dict:
    """Each case measured on every side in ``sides`` ({name: fn}) before the
    next case starts (device, pair, pair, device, device, pair; the best of
    each kept), so a loaded host's drift between phases does not land on
    one side: on our 2-core hosts one run of either side varies up to 3x."""
    total = _total(quick)
    out = {which: {} for which in sides}
    names = list(sides)
    order = names if quick else names + names[::-1] + names
    with live(title, len(CASES)) as step:
        for name, direction, msg in CASES:
            step(name)
            for which in order:
                key = f"{name}_MB_per_s"
                out[which][key] = max(out[which].get(key, 0.0), sides[which](direction, msg, total))
    return out


def measure(quick: bool = False) -> dict:
    _warm_up()
    return _run(f"bench vsock: {side()} device path", {"device": _device}, quick)["device"]


def measure_reference(quick: bool = False) -> dict:
    return _run("bench vsock: Unix socket pair", {"reference": _reference}, quick)["reference"]


def measure_pair(quick: bool = False) -> dict:
    """``{"device": ..., "reference": ...}``, the cases interleaved (what ``run`` reports)."""
    _warm_up()
    return _run(f"bench vsock: {side()} device path and Unix socket pair, case by case",
                {"device": _device, "reference": _reference}, quick)


def run(quick: bool = False) -> dict:
    pair = {}

    def device(q):
        pair.update(measure_pair(q))
        return pair["device"]
    return report("vsock", UNIT, "benchmarks.bench_vsock", quick, device, lambda q: pair["reference"], "socketpair")
