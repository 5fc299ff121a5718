"""Target: virtio-vsock's packet kernel (devices/vsock.tx_packet) on a
sequence of guest packets against a connection table holding two open
connections over real socket pairs.  Whatever the packets say: the kernel
returns 0 or one of the device's rules (§5.10.6), a rule resets at most the
connection the packet names (never another), nothing goes past the credit
(a connection's unread bytes stay within BUF_ALLOC, its ring within its
size), the owed-RST list stays bounded, and only a well-formed REQUEST for
no existing connection reaches Python (an event)."""
from __future__ import annotations

import os
import socket
import struct

import numpy as np

from lguest_jit.devices import vsock as vs
from lguest_jit.hw.libc import host_iov

from .common import Reader, digest, main

CID = 3
PORTS = [(1000, 80), (1001, 81)]
MEM = 1 << 16


def _table():
    conns = np.zeros((vs.MAX_CONNS, vs.C_FIELDS), np.int64)
    conns[:, vs.C_FD] = -1
    keep = []
    for c, (g, h) in enumerate(PORTS):
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conns[c, vs.C_STATE] = vs.ESTABLISHED
        conns[c, vs.C_FD] = a.detach()
        conns[c, vs.C_GPORT], conns[c, vs.C_HPORT] = g, h
        conns[c, vs.C_PEER_BUF] = 65536
        keep.append(b)
    return conns, keep


def one_input(data: bytes) -> str:
    r = Reader(data)
    conns, keep = _table()
    bufs = np.zeros((vs.MAX_CONNS, vs.BUF_ALLOC), np.uint8)
    st = np.zeros(vs.S_FIELDS, np.int64)
    st[vs.S_CID] = CID
    strays = np.zeros((vs.MAX_STRAYS, 2), np.int64)
    mem = np.zeros(MEM, np.uint8)
    iov = np.zeros((4, 3), np.uint64)
    hiov = host_iov(4)
    ev = np.zeros(5, np.int64)
    results = []
    try:
        for _ in range(min(r.u8() % 16 + 1, 16)):
            if r.left() <= 0:
                break
            kind = r.u8()
            # Mostly well-formed headers on the open connections, with one
            # field replaced by fuzz bytes; sometimes all 44 raw bytes.
            g, h = PORTS[kind & 1]
            op = (r.u8() % 9) if kind & 2 else vs.OP_RW
            payload = r.take(r.u16() % 3000)
            hdr = bytearray(struct.pack("<QQIIIHHIII", CID, 2, g, h, len(payload), 1, op, r.u8() & 3,
                                        65536, r.u32() if kind & 4 else 0))
            if kind & 8:
                at = r.u8() % 44
                hdr[at:at + 4] = r.take(4)[:len(hdr[at:at + 4])]
            if kind & 16:
                hdr = bytearray(r.take(44))
            pkt = bytes(hdr) + payload
            mem[:len(pkt)] = np.frombuffer(pkt, np.uint8)
            # The chain: the header row, then the payload in up to three rows.
            cut = sorted({44, *(44 + r.u16() % (len(payload) + 1) for _ in range(r.u8() % 3)), len(pkt)})
            rows = [(cut[k], cut[k + 1] - cut[k]) for k in range(len(cut) - 1)]
            for k, (a, n) in enumerate(rows):
                iov[k] = (a, n, 0)
            nout = len(rows)
            before = conns.copy()
            ev[:] = 0
            rule, poke = vs.tx_packet(mem, iov, nout, len(payload), np.frombuffer(bytes(hdr), np.uint8).copy(),
                                      hiov, conns, bufs, st, strays, ev)
            rule = int(rule)
            assert rule == 0 or rule in vs.ERRORS, rule
            named = [c for c, (gp, hp) in enumerate(PORTS) if before[c, vs.C_STATE] != vs.FREE
                     and struct.unpack_from("<I", hdr, 16)[0] == gp and struct.unpack_from("<I", hdr, 20)[0] == hp]
            for c in range(vs.MAX_CONNS):
                s = int(conns[c, vs.C_STATE])
                assert s in (vs.FREE, vs.CONNECTING, vs.ESTABLISHED, vs.CLOSING, vs.RESETTING), s
                assert 0 <= conns[c, vs.C_TAIL] - conns[c, vs.C_HEAD] <= vs.BUF_ALLOC
                assert 0 <= conns[c, vs.C_RX_CNT] - conns[c, vs.C_FWD_CNT] <= vs.BUF_ALLOC
                if c not in named and before[c, vs.C_STATE] != vs.FREE:
                    assert s == before[c, vs.C_STATE], "a packet changed another connection's state"
            if rule and named and before[named[0], vs.C_STATE] == vs.ESTABLISHED:
                assert conns[named[0], vs.C_STATE] == vs.RESETTING, "a broken rule left its connection open"
            assert 0 <= st[vs.S_NSTRAY] <= vs.MAX_STRAYS
            if ev[0] == vs.EV_REQUEST:
                assert rule == 0 and not named
            results.append((rule, int(poke), int(ev[0]), conns[:2, [vs.C_STATE, vs.C_RX_CNT, vs.C_TAIL]].tolist(),
                            int(st[vs.S_NSTRAY])))
    finally:
        for c in range(vs.MAX_CONNS):
            if conns[c, vs.C_FD] >= 0:
                os.close(int(conns[c, vs.C_FD]))
        for b in keep:
            b.close()
    return digest(results)


if __name__ == "__main__":
    main("fuzz.fuzz_vsock")
