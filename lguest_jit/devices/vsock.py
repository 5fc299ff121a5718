"""virtio-vsock (device type 19, virtio 1.x §5.10), host side as Unix sockets.

The guest uses ordinary AF_VSOCK stream sockets; the host sees Unix-domain
sockets (the "hybrid" scheme Firecracker uses):

- guest -> host: a guest connect() to CID 2 port P is connected to the Unix
  socket ``PATH_P`` (a RST if nobody listens there);
- host -> guest: a host program connects to ``PATH`` and writes
  ``CONNECT P\\n``; once the guest's listener on port P accepted, it reads
  ``OK <host port>\\n`` and the socket is the connection (closed if the
  guest refused).

Three queues, one thread each: rx (0, packets to the guest), tx (1, packets
from the guest) and event (2, the transport reset sent after a restore).
Per packet work is compiled: the tx kernel parses and checks each header,
keeps the credit accounts and writes payload to the host socket; the rx
kernel polls the host sockets, reads payload straight into the guest's
buffers and sends the control packets.  Python does only what happens once
per connection: connecting to ``PATH_P``, the ``CONNECT`` handshake, writing
``OK``.

Connections live in one int64 table (``C_*`` columns, ``MAX_CONNS`` rows)
that both kernels and Python share under a spinlock; nothing blocks while
holding it.  Flow control (§5.10.6.3) both ways: the guest may have at most
``BUF_ALLOC`` bytes in flight that the host has not read (they wait in the
connection's ring of that size, never more: a packet beyond the credit is a
rule broken), and the rx kernel sends only as much as the guest's advertised
credit allows, so a guest that stops reading stops the host writer (its
socket fills) and nobody else.

A packet that breaks a rule (``ERRORS``) resets its connection only (a RST
to the guest, the host socket closed), counted per rule; under ``--strict``
it is a driver error.
"""
from __future__ import annotations

import os
import socket
import threading

import numpy as np
from numba import njit

from ..hw.fields import Record
from ..hw.libc import (EAGAIN, EINTR, POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT, fill_host_iov, host_iov,
                       pollfds, sys_close, sys_poll, sys_read, sys_readv, sys_sched_yield, sys_shutdown, sys_write,
                       sys_writev)
from ..hw.memory import cpu_relax, put_le, xchg_i64
from ..vring import (CHAIN_READABLE, CHAIN_WRITABLE, Q_IN, Q_IN_BYTES, Q_OUT, Q_OUT_BYTES, Q_STOP, STOPPED,
                     buf_to_iov, complete, finish, iov_consume, iov_to_buf, next_chain, notify_used, unpop)
from .base import Device

VIRTIO_ID_VSOCK = 19
RX, TX, EVENT = 0, 1, 2
QUEUE_SIZE = 256
HOST_CID = 2
CID_MAX = 0xFFFFFFFE                    # u32 -1 is VMADDR_CID_ANY

HDR_SIZE = 44                           # struct virtio_vsock_hdr (§5.10.6)
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
EVENT_TRANSPORT_RESET = 0
SHUT_WR = 1

MAX_CONNS = 64                          # connections at once; a request beyond is refused (RST)
# What the guest may have in flight per connection (our buf_alloc), and the
# size of each connection's ring for bytes its host socket would not take.
# The guest sends a window's worth, then waits for our CREDIT_UPDATE: three
# thread wake-ups a window here.  Measured guest -> host at 64 KiB (best of
# 3 against a socket pair): 256 KiB 0.48, 512 KiB 0.66, 1 MiB 0.74.  The
# rings are untouched pages until a host reader falls behind; a guest
# filling every connection's ring holds MAX_CONNS MiB.
BUF_ALLOC = 1024 * 1024
# Our end of each host socket may hold this much unread (Linux doubles it,
# and caps it at net.core.wmem_max).  With the default ~208 KiB a host
# reader a little behind sent 2-9% of a 1 MiB window through the ring:
# one more copy and the rx thread's write under the lock.  Measured guest
# -> host at 64 KiB (best of 3, alternating): 0.57/0.67 -> 0.88/0.77.
# A host reader that stops reading thus holds up to 1 MiB in the kernel
# besides its connection's ring.
HOST_SNDBUF = BUF_ALLOC // 2
MAX_PKT = 64 * 1024                     # largest payload of one packet, both ways
MAX_STRAYS = 16                         # RSTs owed for packets that name no connection
LOCK_SPINS = 100                        # pause loops before a waiter yields its core (the holder may be off-CPU)
RX_SIGNAL_BYTES = 64 * 1024             # the guest hears of its data at least this often, not only when we sleep
RX_BURST = 16                           # data packets one connection sends in a row before the next has its turn

# Connection table columns.
C_STATE, C_FD, C_GPORT, C_HPORT, C_PEER_BUF, C_PEER_FWD, C_TX_CNT, C_RX_CNT, C_FWD_CNT, C_FWD_SENT, \
    C_HEAD, C_TAIL, C_PEND, C_GSHUT, C_HSHUT, C_GEN = range(16)
C_FIELDS = 16
# C_STATE
FREE, CONNECTING, ESTABLISHED, CLOSING, RESETTING = 0, 1, 2, 3, 4
# C_PEND: control packets owed to the guest
P_REQUEST, P_RESPONSE, P_CREDIT, P_SHUTDOWN, P_CREDIT_REQ = 1, 2, 4, 8, 16
# C_HSHUT: what the host side did
H_EOF, H_SHUT_WR = 1, 2

# Device state and counters (``st``).
S_CID, S_WAKE_FD, S_STRICT, S_EV_PENDING, S_NSTRAY, S_RESETS, S_EVENTS_SENT, S_CREDIT_SENT, \
    S_HOST_ERRORS, S_CREDIT_REQ_SENT, S_RULES = range(11)
S_FIELDS = S_RULES + 8

# What a kernel returns to Python besides STOPPED and -E_*.
RET_EVENT = 1
EV_NONE, EV_REQUEST, EV_RESPONSE = 0, 1, 2

# The device's rules (§5.10.6).  A code is counted in st[S_RULES + code - E_BASE],
# resets its connection, and under --strict is returned negated.  Numbered
# clear of vring's codes so one number names one rule.
E_BASE = 140
E_VSOCK_TYPE = 140
E_VSOCK_OP = 141
E_VSOCK_CID = 142
E_VSOCK_LEN = 143
E_VSOCK_CREDIT = 144
E_VSOCK_CONN = 145
E_VSOCK_STATE = 146

ERRORS = {
    E_VSOCK_TYPE: "packet type is not VIRTIO_VSOCK_TYPE_STREAM, the only type offered (§5.10.6)",
    E_VSOCK_OP: "packet op is not one of REQUEST..CREDIT_REQUEST (§5.10.6)",
    E_VSOCK_CID: "packet src_cid is not the guest's CID or dst_cid is not the host's (2) (§5.10.6.2)",
    E_VSOCK_LEN: "packet len beyond its buffers or above 64 KiB, or payload on a control op (§5.10.6.4)",
    E_VSOCK_CREDIT: "RW payload beyond the credit the device advertised (buf_alloc - (rx - fwd_cnt)) "
                    "(§5.10.6.3.1)",
    E_VSOCK_CONN: "packet for a connection that does not exist (§5.10.6.5)",
    E_VSOCK_STATE: "packet not allowed in the connection's state (REQUEST on an open connection, RESPONSE "
                   "without a REQUEST, RW after SHUTDOWN SEND or before the connection is up) (§5.10.6.5)",
}
RULE_NAMES = {E_VSOCK_TYPE: "bad_type", E_VSOCK_OP: "bad_op", E_VSOCK_CID: "wrong_cid", E_VSOCK_LEN: "bad_len",
              E_VSOCK_CREDIT: "credit_overrun", E_VSOCK_CONN: "unknown_connection", E_VSOCK_STATE: "bad_state"}


def error_message(code: int) -> str:
    return ERRORS.get(abs(int(code)), f"unknown vsock error {code}")


# ---------------------------------------------------------------------------
# Kernels

@njit(nogil=True, cache=True)
def lock(lk):
    spins = 0
    while xchg_i64(lk, 0, 1) != 0:
        spins += 1
        if spins < LOCK_SPINS:
            cpu_relax()
        else:
            sys_sched_yield()


@njit(nogil=True, cache=True)
def unlock(lk):
    xchg_i64(lk, 0, 0)


@njit(nogil=True, cache=True, inline='always')
def _le(b, off, n):
    v = np.int64(0)
    for k in range(n):
        v |= np.int64(b[off + k]) << (8 * k)
    return v


@njit(nogil=True, cache=True, inline='always')
def _put(b, off, n, v):
    for k in range(n):
        b[off + k] = (v >> (8 * k)) & 0xFF


@njit(nogil=True, cache=True)
def _header(hdr, cid, hport, gport, length, op, flags, fwd_cnt):
    """A packet from the host (CID 2) to the guest: ``hdr``'s 44 bytes."""
    _put(hdr, 0, 8, HOST_CID)
    _put(hdr, 8, 8, cid)
    _put(hdr, 16, 4, hport)
    _put(hdr, 20, 4, gport)
    _put(hdr, 24, 4, length)
    _put(hdr, 28, 2, TYPE_STREAM)
    _put(hdr, 30, 2, op)
    _put(hdr, 32, 4, flags)
    _put(hdr, 36, 4, BUF_ALLOC)
    _put(hdr, 40, 4, fwd_cnt & 0xFFFFFFFF)


@njit(nogil=True, cache=True)
def _find(conns, gport, hport, resetting=False):
    """The row for (guest port, host port): live rows only, or also rows
    whose RST is still owed when ``resetting``."""
    for c in range(conns.shape[0]):
        s = conns[c, C_STATE]
        if s == FREE or (s == RESETTING and not resetting):
            continue
        if conns[c, C_GPORT] == gport and conns[c, C_HPORT] == hport:
            return c
    return -1


@njit(nogil=True, cache=True)
def peer_credit(conns, c):
    """Bytes the guest can take on connection ``c`` (§5.10.6.3)."""
    inflight = (conns[c, C_TX_CNT] - conns[c, C_PEER_FWD]) & 0xFFFFFFFF
    return max(np.int64(0), min(conns[c, C_PEER_BUF], MAX_CONNS * BUF_ALLOC) - inflight)


@njit(nogil=True, cache=True)
def reset_conn(conns, c):
    """Close the host end now; the rx kernel sends the RST and frees the row."""
    if conns[c, C_FD] >= 0:
        sys_close(conns[c, C_FD])
        conns[c, C_FD] = -1
    conns[c, C_STATE] = RESETTING
    conns[c, C_PEND] = 0


@njit(nogil=True, cache=True)
def _stray_rst(strays, st, gport, hport):
    n = st[S_NSTRAY]
    if n < strays.shape[0]:
        strays[n, 0] = gport
        strays[n, 1] = hport
        st[S_NSTRAY] = n + 1


@njit(nogil=True, cache=True)
def _copy_in(mem, iov, nout, skip, ring, pos, n):
    """``n`` bytes of the chain's readable part, from byte ``skip``, into the
    ring at ``pos`` (wrapping)."""
    size = ring.size
    done = 0
    for k in range(nout):
        if done >= n:
            break
        a = np.int64(iov[k, 0])
        ln = np.int64(iov[k, 1])
        if skip >= ln:
            skip -= ln
            continue
        a += skip
        ln -= skip
        skip = 0
        ln = min(ln, n - done)
        while ln > 0:
            at = (pos + done) % size
            m = min(ln, size - at)
            ring[at:at + m] = mem[a:a + m]
            a += m
            ln -= m
            done += m
    return done


@njit(nogil=True, cache=True)
def _cap_hiov(hiov, n, cap):
    """Trim host iov rows so they hold at most ``cap`` bytes; returns rows."""
    total = np.int64(0)
    for k in range(n):
        ln = np.int64(hiov[k, 1])
        if total + ln >= cap:
            hiov[k, 1] = np.uint64(cap - total)
            return k + 1 if cap - total > 0 else k
        total += ln
    return n


@njit(nogil=True, cache=True)
def _wake(st, wake):
    sys_write(st[S_WAKE_FD], wake.ctypes.data, 8)


@njit(nogil=True, cache=True)
def tx_packet(mem, iov, nout, avail, hdr, hiov, conns, bufs, st, strays, ev):
    """One packet from the guest (its header in ``hdr``, payload in the
    chain's readable rows after the header).  Called under the lock.
    Returns (rule broken or 0, 1 if the rx thread must look again)."""
    src_cid = _le(hdr, 0, 8)
    dst_cid = _le(hdr, 8, 8)
    gport = _le(hdr, 16, 4)
    hport = _le(hdr, 20, 4)
    ln = _le(hdr, 24, 4)
    typ = _le(hdr, 28, 2)
    op = _le(hdr, 30, 2)
    flags = _le(hdr, 32, 4)
    rule = 0
    if typ != TYPE_STREAM:
        rule = E_VSOCK_TYPE
    elif op < OP_REQUEST or op > OP_CREDIT_REQUEST:
        rule = E_VSOCK_OP
    elif src_cid != st[S_CID] or dst_cid != HOST_CID:
        rule = E_VSOCK_CID
    elif ln > avail or ln > MAX_PKT or (ln != 0 and op != OP_RW):
        rule = E_VSOCK_LEN
    c = _find(conns, gport, hport)
    if rule != 0:
        if c >= 0:
            reset_conn(conns, c)
        elif op != OP_RST:
            _stray_rst(strays, st, gport, hport)
        return rule, 1
    if op == OP_REQUEST:
        if c >= 0:
            reset_conn(conns, c)
            return E_VSOCK_STATE, 1
        if _find(conns, gport, hport, True) >= 0:
            # The old connection's RST is still owed: a second row with the
            # same address pair would let that RST reach the new connection.
            # The owed RST answers this REQUEST too: the connect fails (§5.10.6.5).
            return 0, 1
        ev[0] = EV_REQUEST
        ev[1] = gport
        ev[2] = hport
        ev[3] = _le(hdr, 36, 4)
        ev[4] = _le(hdr, 40, 4)
        return 0, 0
    if c < 0:
        if op == OP_RST:
            return 0, 0               # a RST for what is gone already: nothing to do
        _stray_rst(strays, st, gport, hport)
        return E_VSOCK_CONN, 1
    wake = 0
    before = peer_credit(conns, c)
    conns[c, C_PEER_BUF] = _le(hdr, 36, 4)
    conns[c, C_PEER_FWD] = _le(hdr, 40, 4)
    if before == 0 and peer_credit(conns, c) > 0:
        wake = 1
    state = conns[c, C_STATE]
    if op == OP_RST:
        if conns[c, C_FD] >= 0:
            sys_close(conns[c, C_FD])
        conns[c, C_FD] = -1
        conns[c, C_STATE] = FREE
        conns[c, C_GEN] += 1
        return 0, 0
    if op == OP_RESPONSE:
        if state != CONNECTING or conns[c, C_PEND] & P_REQUEST:
            reset_conn(conns, c)
            return E_VSOCK_STATE, 1
        conns[c, C_STATE] = ESTABLISHED
        ev[0] = EV_RESPONSE
        ev[1] = c
        return 0, 1
    if state != ESTABLISHED and state != CLOSING:
        reset_conn(conns, c)
        return E_VSOCK_STATE, 1
    if op == OP_SHUTDOWN:
        conns[c, C_GSHUT] |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
        if conns[c, C_GSHUT] == SHUTDOWN_RCV | SHUTDOWN_SEND:
            conns[c, C_STATE] = CLOSING       # the rx kernel drains, closes and answers with a RST
        return 0, 1
    if op == OP_CREDIT_REQUEST:
        conns[c, C_PEND] |= P_CREDIT
        return 0, 1
    if op == OP_CREDIT_UPDATE:
        return 0, wake
    # OP_RW
    if conns[c, C_GSHUT] & SHUTDOWN_SEND or state != ESTABLISHED:
        reset_conn(conns, c)
        return E_VSOCK_STATE, 1
    if conns[c, C_RX_CNT] + ln - conns[c, C_FWD_CNT] > BUF_ALLOC:
        reset_conn(conns, c)
        return E_VSOCK_CREDIT, 1
    done = np.int64(0)
    if conns[c, C_HEAD] == conns[c, C_TAIL] and ln > 0:
        # Nothing queued ahead: straight from guest memory to the socket.
        n = _cap_hiov(hiov, fill_host_iov(mem, iov, 0, nout, hiov), ln)
        while True:
            r = sys_writev(conns[c, C_FD], hiov.ctypes.data, n)
            if r != -EINTR:
                break
        if r == -EAGAIN:
            r = 0
        if r < 0:
            st[S_HOST_ERRORS] += 1        # the host end went away: the guest hears a RST
            reset_conn(conns, c)
            return 0, 1
        done = r
    rest = ln - done
    if rest > 0:
        _copy_in(mem, iov, nout, done, bufs[c], conns[c, C_TAIL], rest)
        conns[c, C_TAIL] += rest
        wake = 1                           # the rx kernel writes it once the socket takes more
    conns[c, C_RX_CNT] += ln
    conns[c, C_FWD_CNT] += done
    if _credit_due(conns, c):
        conns[c, C_PEND] |= P_CREDIT
        wake = 1
    return 0, wake


@njit(nogil=True, cache=True)
def _credit_due(conns, c):
    """The guest believes it has less than half its credit left and we
    have freed some since we last said: tell it (CREDIT_UPDATE)."""
    seen_free = BUF_ALLOC - (conns[c, C_RX_CNT] - conns[c, C_FWD_SENT])
    return conns[c, C_FWD_CNT] != conns[c, C_FWD_SENT] and seen_free < BUF_ALLOC // 2


@njit(nogil=True, cache=True)
def tx_serve(mem, q, iov, notify_fd, isr, irq, scratch, hiov, conns, bufs, lk, st, strays, hdr, ev, wake):
    """The tx queue's thread: every packet the guest sends."""
    while True:
        head = next_chain(mem, q, iov, notify_fd, isr, irq, scratch, CHAIN_READABLE, HDR_SIZE)
        if head < 0:
            return finish(mem, q, isr, irq, scratch, head)
        nout = q[Q_OUT]
        iov_to_buf(mem, iov, 0, nout, hdr)
        iov_consume(iov, 0, nout, HDR_SIZE)
        ev[0] = EV_NONE
        lock(lk)
        rule, poke = tx_packet(mem, iov, nout, q[Q_OUT_BYTES] - HDR_SIZE, hdr, hiov, conns, bufs, st, strays, ev)
        unlock(lk)
        op = _le(hdr, 30, 2)
        complete(mem, q, head, 0, _le(hdr, 24, 4) if op == OP_RW and rule == 0 else 0)
        if poke:
            _wake(st, wake)
        if rule != 0:
            st[S_RULES + rule - E_BASE] += 1
            if st[S_STRICT]:
                return finish(mem, q, isr, irq, scratch, -rule)
        if ev[0] != EV_NONE:
            return finish(mem, q, isr, irq, scratch, RET_EVENT)


@njit(nogil=True, cache=True)
def _flush(conns, bufs, c, st):
    """Write what the ring holds for ``c`` to its socket (under the lock)."""
    ring = bufs[c]
    size = ring.size
    while conns[c, C_HEAD] != conns[c, C_TAIL]:
        at = conns[c, C_HEAD] % size
        n = min(conns[c, C_TAIL] - conns[c, C_HEAD], size - at)
        r = sys_write(conns[c, C_FD], ring[at:].ctypes.data, n)
        if r == -EINTR:
            continue
        if r == -EAGAIN:
            return 0
        if r < 0:
            st[S_HOST_ERRORS] += 1
            reset_conn(conns, c)
            return 1
        conns[c, C_HEAD] += r
        conns[c, C_FWD_CNT] += r
    return 1


@njit(nogil=True, cache=True)
def _control(conns, c, st):
    """The control packet owed on row ``c`` now (under the lock): (op, flags), op 0 for none."""
    s = conns[c, C_STATE]
    if s == FREE:
        return 0, 0
    if s == RESETTING:
        return OP_RST, 0
    p = conns[c, C_PEND]
    if p & P_REQUEST:
        return OP_REQUEST, 0
    if p & P_RESPONSE:
        return OP_RESPONSE, 0
    empty = conns[c, C_HEAD] == conns[c, C_TAIL]
    if s == CLOSING and empty:
        return OP_RST, 0                   # both sides shut: the receiver of the SHUTDOWN answers RST
    if p & P_SHUTDOWN:
        return OP_SHUTDOWN, SHUTDOWN_SEND
    if p & P_CREDIT or (s == ESTABLISHED and _credit_due(conns, c)):
        return OP_CREDIT_UPDATE, 0
    if p & P_CREDIT_REQ:
        if s == ESTABLISHED and peer_credit(conns, c) == 0:
            return OP_CREDIT_REQUEST, 0
        conns[c, C_PEND] &= ~P_CREDIT_REQ     # the credit came back meanwhile: nothing to ask
    return 0, 0


@njit(nogil=True, cache=True)
def _poll_rows(conns, pfds, rows, st, stop_fd):
    """pollfd rows: the stop and wake eventfds, then each connection's
    socket for what it waits on (POLLIN while the guest has credit, POLLOUT
    while its ring holds data).  Returns the row count."""
    pfds[0, 0] = stop_fd
    pfds[0, 1] = POLLIN
    pfds[1, 0] = st[S_WAKE_FD]
    pfds[1, 1] = POLLIN
    n = 2
    for c in range(conns.shape[0]):
        s = conns[c, C_STATE]
        if (s != ESTABLISHED and s != CLOSING) or conns[c, C_FD] < 0:
            continue
        events = 0
        if s == ESTABLISHED and not conns[c, C_HSHUT] & H_EOF and peer_credit(conns, c) > 0:
            events |= POLLIN
        if conns[c, C_HEAD] != conns[c, C_TAIL]:
            events |= POLLOUT
        if events:
            pfds[n, 0] = conns[c, C_FD]
            pfds[n, 1] = events
            rows[n] = c
            n += 1
    return n


@njit(nogil=True, cache=True)
def rx_serve(mem, q, iov, notify_fd, isr, irq, scratch, hiov, conns, bufs, lk, st, strays, hdr, pfds, rows,
             ready, wakebuf, stop_fd, saved):
    """The rx queue's thread: control packets owed, host data the guest has
    credit for, and the rings' data written to the host sockets."""
    cid = st[S_CID]
    idle = False
    unsignalled = np.int64(0)
    while True:
        if q[Q_STOP]:
            return finish(mem, q, isr, irq, scratch, STOPPED)
        lock(lk)
        n = _poll_rows(conns, pfds, rows, st, stop_fd)
        unlock(lk)
        if idle:
            notify_used(mem, q, isr, irq, scratch)
            unsignalled = 0
        r = sys_poll(pfds.ctypes.data, n, -1 if idle else 0)
        if r == -EINTR:
            continue
        idle = True
        ready[:] = 0
        if r > 0:
            if (pfds[0, 1] >> 16) & 0xFFFF:
                return finish(mem, q, isr, irq, scratch, STOPPED)
            if (pfds[1, 1] >> 16) & 0xFFFF:
                sys_read(st[S_WAKE_FD], wakebuf.ctypes.data, 8)
                idle = False
            for k in range(2, n):
                rev = (pfds[k, 1] >> 16) & 0xFFFF
                if rev:
                    ready[rows[k]] = rev
        # Host sockets that can take the rings' data.
        for c in range(conns.shape[0]):
            if ready[c] & (POLLOUT | POLLERR | POLLHUP | POLLNVAL):
                lock(lk)
                if conns[c, C_FD] >= 0 and conns[c, C_HEAD] != conns[c, C_TAIL]:
                    _flush(conns, bufs, c, st)
                    idle = False
                unlock(lk)
        # Strays: RSTs for packets that named no connection.
        while st[S_NSTRAY] > 0:
            head = next_chain(mem, q, iov, notify_fd, isr, irq, scratch, CHAIN_WRITABLE, HDR_SIZE)
            if head < 0:
                return finish(mem, q, isr, irq, scratch, head)
            lock(lk)
            k = st[S_NSTRAY] - 1
            _header(hdr, cid, strays[k, 1], strays[k, 0], 0, OP_RST, 0, 0)
            st[S_NSTRAY] = k
            unlock(lk)
            buf_to_iov(mem, iov, 0, q[Q_IN], hdr, HDR_SIZE)
            complete(mem, q, head, HDR_SIZE, 0)
            st[S_RESETS] += 1
            idle = False
        # Each row in turn; a row whose read just filled a whole packet
        # (its socket likely holds more) goes again, up to RX_BURST packets
        # a round, then the next: a poll round per packet cost host -> guest
        # a quarter of its rate at 4 KiB.
        full = np.int64(0)
        c = -1
        again = False
        burst = 0
        while True:
            if not again:
                c += 1
                if c >= conns.shape[0]:
                    break
                burst = 0
            again = False
            # Half-close towards the host once the guest's data is all out.
            lock(lk)
            if (conns[c, C_STATE] == ESTABLISHED and conns[c, C_GSHUT] & SHUTDOWN_SEND and conns[c, C_FD] >= 0
                    and not conns[c, C_HSHUT] & H_SHUT_WR and conns[c, C_HEAD] == conns[c, C_TAIL]):
                sys_shutdown(conns[c, C_FD], SHUT_WR)
                conns[c, C_HSHUT] |= H_SHUT_WR
            op, flags = _control(conns, c, st)
            readable = (ready[c] & (POLLIN | POLLHUP | POLLERR) and conns[c, C_STATE] == ESTABLISHED
                        and not conns[c, C_HSHUT] & H_EOF and peer_credit(conns, c) > 0)
            gen = conns[c, C_GEN]
            unlock(lk)
            if op == 0 and not readable:
                continue
            head = next_chain(mem, q, iov, notify_fd, isr, irq, scratch, CHAIN_WRITABLE, HDR_SIZE)
            if head < 0:
                return finish(mem, q, isr, irq, scratch, head)
            nin = q[Q_IN]
            lock(lk)
            if conns[c, C_GEN] != gen or conns[c, C_STATE] == FREE:
                unlock(lk)
                unpop(q)
                continue
            if op == 0:
                op, flags = _control(conns, c, st)
            if op == 0 and conns[c, C_STATE] != ESTABLISHED:
                unlock(lk)
                unpop(q)
                continue
            length = 0
            saved[:nin] = iov[:nin]        # where the header goes, before the payload rows are advanced
            if op == 0:
                # Data: as much as the guest has credit and buffer for.
                iov_consume(iov, 0, nin, HDR_SIZE)
                cap = min(peer_credit(conns, c), MAX_PKT)
                full = min(cap, q[Q_IN_BYTES] - HDR_SIZE)
                hn = _cap_hiov(hiov, fill_host_iov(mem, iov, 0, nin, hiov), cap)
                got = np.int64(-EAGAIN)
                if cap > 0 and hn > 0 and conns[c, C_FD] >= 0:
                    while True:
                        got = sys_readv(conns[c, C_FD], hiov.ctypes.data, hn)
                        if got != -EINTR:
                            break
                if got == -EAGAIN:
                    unlock(lk)
                    unpop(q)
                    continue
                if got > 0:
                    op = OP_RW
                    length = got
                    conns[c, C_TX_CNT] += got
                    if peer_credit(conns, c) == 0:
                        # The guest's credit is used up.  Linux tells its
                        # credit only when its free space runs low or when
                        # asked (§5.10.6.3): ask, once per time it runs out.
                        conns[c, C_PEND] |= P_CREDIT_REQ
                elif got == 0:
                    op, flags = OP_SHUTDOWN, SHUTDOWN_SEND      # the host will send no more
                    conns[c, C_HSHUT] |= H_EOF
                else:
                    st[S_HOST_ERRORS] += 1
                    reset_conn(conns, c)
                    op = OP_RST
            _header(hdr, cid, conns[c, C_HPORT], conns[c, C_GPORT], length, op, flags, conns[c, C_FWD_CNT])
            conns[c, C_FWD_SENT] = conns[c, C_FWD_CNT]
            if op == OP_REQUEST:
                conns[c, C_PEND] &= ~P_REQUEST
            elif op == OP_RESPONSE:
                conns[c, C_PEND] &= ~P_RESPONSE
            elif op == OP_SHUTDOWN:
                conns[c, C_PEND] &= ~P_SHUTDOWN
            elif op == OP_CREDIT_UPDATE:
                conns[c, C_PEND] &= ~P_CREDIT
                st[S_CREDIT_SENT] += 1
            elif op == OP_CREDIT_REQUEST:
                conns[c, C_PEND] &= ~P_CREDIT_REQ
                st[S_CREDIT_REQ_SENT] += 1
            elif op == OP_RST:
                if conns[c, C_FD] >= 0:
                    sys_close(conns[c, C_FD])
                conns[c, C_FD] = -1
                conns[c, C_STATE] = FREE
                conns[c, C_PEND] = 0
                conns[c, C_GEN] += 1
                st[S_RESETS] += 1
            unlock(lk)
            buf_to_iov(mem, saved, 0, nin, hdr, HDR_SIZE)
            complete(mem, q, head, HDR_SIZE + length, length)
            unsignalled += HDR_SIZE + length
            if unsignalled >= RX_SIGNAL_BYTES:
                # The guest copies this out while we read the next (an
                # interrupt only if it sleeps: it asked with used_event).
                notify_used(mem, q, isr, irq, scratch)
                unsignalled = 0
            idle = False
            if op == OP_RW and length == full and burst < RX_BURST - 1:
                again = True
                burst += 1


@njit(nogil=True, cache=True)
def event_serve(mem, q, iov, notify_fd, isr, irq, scratch, st, pfds, wakebuf, evbuf):
    """The event queue's thread: a TRANSPORT_RESET for each one owed (§5.10.6.6)."""
    while True:
        if q[Q_STOP]:
            return finish(mem, q, isr, irq, scratch, STOPPED)
        if st[S_EV_PENDING] > 0:
            head = next_chain(mem, q, iov, notify_fd, isr, irq, scratch, CHAIN_WRITABLE, 4)
            if head < 0:
                return finish(mem, q, isr, irq, scratch, head)
            evbuf[:] = 0
            _put(evbuf, 0, 4, EVENT_TRANSPORT_RESET)
            buf_to_iov(mem, iov, 0, q[Q_IN], evbuf, 4)
            complete(mem, q, head, 4, 0)
            st[S_EV_PENDING] -= 1
            st[S_EVENTS_SENT] += 1
            continue
        notify_used(mem, q, isr, irq, scratch)
        r = sys_poll(pfds.ctypes.data, 2, -1)
        if r == -EINTR:
            continue
        if (pfds[0, 1] >> 16) & 0xFFFF:
            return finish(mem, q, isr, irq, scratch, STOPPED)
        if (pfds[1, 1] >> 16) & 0xFFFF:
            sys_read(pfds[1, 0], wakebuf.ctypes.data, 8)


# ---------------------------------------------------------------------------
# The device

def check_options(cid, path) -> tuple[int, str]:
    """``--vsock=CID:PATH``'s values: a guest CID of 3 or more (0-2 are the
    hypervisor, local and host), a socket path with room for ``_PORT``."""
    if type(cid) is not int or not 3 <= cid <= CID_MAX:
        raise ValueError(f"guest CID {cid!r} must be a whole number from 3 to {CID_MAX}")
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError("the socket path is empty")
    if len(os.fsencode(path)) + len("_4294967295") > 107:
        raise ValueError(f"socket path {path[:40]!r}... is too long for a Unix socket with a _PORT suffix")
    return cid, path


class Vsock(Device):
    """``Vsock(cid, path)``: a vsock device for guest ``cid`` whose host side
    is the Unix socket ``path`` (host -> guest) and ``path_PORT`` (guest ->
    host).  The listening socket is made at once; ``close()`` removes it."""

    kind = name = "vsock"
    device_type = VIRTIO_ID_VSOCK
    pci_class = (0x07, 0x80)          # communication controller, other (as QEMU's vhost-vsock-pci)
    queue_names = ("rx", "tx", "event")
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)
    STATE = Record({})                # connections do not survive a snapshot: the guest hears a reset

    def __init__(self, cid: int, path: str, on_fatal=None):
        super().__init__(on_fatal)
        self.cid, self.path = check_options(cid, path)
        self.features = self.RING_FEATURES
        cfg = np.zeros(8, dtype=np.uint8)
        put_le(cfg, 0, 8, cid)                # guest_cid (§5.10.4)
        self.config = cfg
        self.conns = np.zeros((MAX_CONNS, C_FIELDS), dtype=np.int64)
        self.conns[:, C_FD] = -1
        self.bufs = np.zeros((MAX_CONNS, BUF_ALLOC), dtype=np.uint8)    # pages touched only when used
        self.lk = np.zeros(1, dtype=np.int64)
        self.st = np.zeros(S_FIELDS, dtype=np.int64)
        self.st[S_CID] = cid
        self.strays = np.zeros((MAX_STRAYS, 2), dtype=np.int64)
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.ev_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.st[S_WAKE_FD] = self.wake_fd
        self.next_hport = 1024
        self.listener = None
        self._listen_thread = None
        self._listen_stop = os.pipe2(os.O_CLOEXEC)
        try:
            self._open_listener()
        except BaseException:
            self.close()
            raise

    # -- host side, once per connection (Python)
    def _open_listener(self) -> None:
        if os.path.lexists(self.path):
            raise OSError(f"--vsock: {self.path!r} exists already: remove it or choose another path")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(self.path)
            s.listen(MAX_CONNS)
        except OSError as exc:
            s.close()
            raise OSError(f"--vsock: cannot listen on {self.path!r}: {exc.strerror or exc}") from None
        self.listener = s
        self._listen_thread = threading.Thread(target=self._listen, name="vsock:listen", daemon=True)
        self._listen_thread.start()

    def _wake(self) -> None:
        os.eventfd_write(self.wake_fd, 1)

    def _free_row(self) -> int:
        free = np.flatnonzero(self.conns[:, C_STATE] == FREE)
        return int(free[0]) if free.size else -1

    def _take_row(self, c: int, state: int, fd: int, gport: int, hport: int, pend: int,
                  peer_buf: int = 0, peer_fwd: int = 0) -> None:
        row = self.conns[c]
        gen = row[C_GEN]
        row[:] = 0
        row[C_GEN] = gen + 1
        row[C_FD], row[C_GPORT], row[C_HPORT], row[C_PEND] = fd, gport, hport, pend
        row[C_PEER_BUF], row[C_PEER_FWD] = peer_buf, peer_fwd
        row[C_STATE] = state

    def _listen(self) -> None:
        import select
        stop = self._listen_stop[0]
        while True:
            try:
                ready = select.select([self.listener, stop], [], [])[0]
            except (OSError, ValueError):
                return
            if stop in ready:
                return
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self._host_connect(conn)

    def _host_connect(self, conn) -> None:
        """A host program's ``CONNECT P\\n``: ask the guest (REQUEST); the
        answer comes back on the tx queue."""
        try:
            conn.settimeout(2.0)
            line = b""
            while b"\n" not in line and len(line) < 32:
                got = conn.recv(32 - len(line))
                if not got:
                    break
                line += got
            word, _, port = line.partition(b"\n")[0].partition(b" ")
            if word != b"CONNECT" or not port.isdigit() or int(port) > 0xFFFFFFFF or b"\n" not in line:
                conn.close()
                return
            conn.setblocking(False)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HOST_SNDBUF)
        except OSError:
            conn.close()
            return
        lock(self.lk)
        try:
            c = self._free_row()
            if c < 0:
                conn.close()
                return
            hport = self._host_port()
            self._take_row(c, CONNECTING, conn.detach(), int(port), hport, P_REQUEST)
        finally:
            unlock(self.lk)
        self._wake()

    def _host_port(self) -> int:
        used = set(self.conns[self.conns[:, C_STATE] != FREE, C_HPORT].tolist())
        while True:
            p = self.next_hport
            self.next_hport = 1024 if p >= 0x7FFFFFFF else p + 1
            if p not in used:
                return p

    def _event(self, ev) -> None:
        """What the tx kernel handed up: a guest connect (REQUEST) or the
        guest's accept of a host connect (RESPONSE)."""
        if ev[0] == EV_REQUEST:
            gport, hport = int(ev[1]), int(ev[2])
            fd = -1
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HOST_SNDBUF)
                s.connect(f"{self.path}_{hport}")
                fd = s.detach()
            except OSError:
                s.close()                     # nobody listens (or its backlog is full): RST
            lock(self.lk)
            try:
                c = self._free_row() if fd >= 0 else -1
                if c >= 0:
                    self._take_row(c, ESTABLISHED, fd, gport, hport, P_RESPONSE, int(ev[3]), int(ev[4]))
                else:
                    if fd >= 0:
                        os.close(fd)
                    n = int(self.st[S_NSTRAY])
                    if n < MAX_STRAYS:
                        self.strays[n] = (gport, hport)
                        self.st[S_NSTRAY] = n + 1
            finally:
                unlock(self.lk)
            self._wake()
        elif ev[0] == EV_RESPONSE:
            c = int(ev[1])
            lock(self.lk)
            try:
                fd = int(self.conns[c, C_FD])
                if fd >= 0:
                    try:
                        os.write(fd, b"OK %d\n" % int(self.conns[c, C_HPORT]))
                    except OSError:
                        reset_conn(self.conns, c)
            finally:
                unlock(self.lk)
            self._wake()

    # -- the queues
    def on_activate(self, ctx) -> None:
        bus = getattr(self.transport, "bus", None)
        self.st[S_STRICT] = int(bool(getattr(bus, "strict", False)))

    def serve(self, index, ctx, stop_fd):
        args = self.queue_args(ctx, index)
        if index == EVENT:
            fds = pollfds(2)
            fds[0] = (stop_fd, POLLIN)
            fds[1] = (self.ev_fd, POLLIN)
            return int(event_serve(*args, self.st, fds, np.zeros(1, np.uint64), np.zeros(4, np.uint8)))
        hiov = host_iov(self.queue_max_sizes[index])
        hdr = np.zeros(HDR_SIZE, dtype=np.uint8)
        if index == RX:
            return int(rx_serve(*args, hiov, self.conns, self.bufs, self.lk, self.st, self.strays, hdr,
                                pollfds(2 + MAX_CONNS), np.zeros(2 + MAX_CONNS, np.int64),
                                np.zeros(MAX_CONNS, np.int64), np.zeros(1, np.uint64), stop_fd,
                                np.zeros_like(args[2])))
        ev = np.zeros(5, dtype=np.int64)
        wake = np.ones(1, dtype=np.uint64)
        while True:
            code = int(tx_serve(*args, hiov, self.conns, self.bufs, self.lk, self.st, self.strays, hdr, ev, wake))
            if code == RET_EVENT:
                self._event(ev)
                continue
            if -code in ERRORS:
                ctx.driver_error(index, error_message(code))
                return STOPPED
            return code

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        # A restored guest's connections are gone: it hears so (§5.10.6.6).
        self.st[S_EV_PENDING] += 1
        os.eventfd_write(self.ev_fd, 1)

    def reset(self) -> None:
        super().reset()
        self._drop_connections()

    def _drop_connections(self) -> None:
        lock(self.lk)
        try:
            for c in range(MAX_CONNS):
                fd = int(self.conns[c, C_FD])
                if fd >= 0:
                    os.close(fd)
                gen = self.conns[c, C_GEN]
                self.conns[c] = 0
                self.conns[c, C_FD] = -1
                self.conns[c, C_GEN] = gen + 1
            self.st[S_NSTRAY] = 0
        finally:
            unlock(self.lk)

    def connections(self) -> int:
        return int(np.count_nonzero(self.conns[:, C_STATE] != FREE))

    def counters(self) -> dict:
        out = super().counters()
        out["tx"]["rules"] = {RULE_NAMES[code]: int(self.st[S_RULES + code - E_BASE]) for code in ERRORS}
        out["tx"]["rules_broken"] = sum(out["tx"]["rules"].values())
        out["tx"]["host_errors"] = int(self.st[S_HOST_ERRORS])
        out["rx"]["resets_sent"] = int(self.st[S_RESETS])
        out["rx"]["credit_updates_sent"] = int(self.st[S_CREDIT_SENT])
        out["rx"]["credit_requests_sent"] = int(self.st[S_CREDIT_REQ_SENT])
        out["rx"]["connections_open"] = self.connections()
        out["event"]["transport_resets"] = int(self.st[S_EVENTS_SENT])
        return out

    def close(self) -> None:
        self.reset()
        if self._listen_thread is not None:
            os.write(self._listen_stop[1], b"x")
            self._listen_thread.join()
            self._listen_thread = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self._drop_connections()
        for fd in (self.wake_fd, self.ev_fd, *self._listen_stop):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.wake_fd = self.ev_fd = -1
        self._listen_stop = (-1, -1)
