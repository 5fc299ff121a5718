"""virtio-vsock through the in-process driver (lguest_jit.testing): the
guest side is played packet by packet, the host side is real Unix sockets."""
import os
import socket
import time

import pytest

from lguest_jit import pci
from lguest_jit.devices import vsock as vs
from lguest_jit.devices.vsock import Vsock
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.testing import VirtioPciDriver, VsockGuest

CID = 5
SLOT = 64 * 1024 + 4096


@pytest.fixture(params=[False, True], ids=["lenient", "strict"])
def policy(request):
    return request.param


def _up(tmp_path, strict=False, rx_buf=4096 + 44):
    gm = GuestMemory(48 << 20)
    fatal = []
    bus = pci.Bus(gm, strict=strict, fatal=fatal.append)
    dev = Vsock(CID, str(tmp_path / "v"))
    drv = VirtioPciDriver.attach(bus, gm, dev, slot_bytes=SLOT, queue_sizes=[32, 32, 8])
    guest = VsockGuest(drv, CID, rx_buf=rx_buf)
    return gm, bus, dev, drv, guest, fatal


@pytest.fixture
def rig(tmp_path):
    made = []

    def make(**kw):
        r = _up(tmp_path, **kw)
        made.append(r)
        return r
    yield make
    for gm, bus, dev, *_ in made:
        dev.close()
        bus.close()
        gm.close()


def _listen(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    return s


def _guest_connect(guest, gport, hport):
    guest.send(vs.OP_REQUEST, gport, hport)
    pkt = guest.recv()
    return pkt


def test_device_identity_and_config(rig):
    gm, bus, dev, drv, guest, _ = rig()
    assert drv.device_id == 0x1040 + vs.VIRTIO_ID_VSOCK
    assert drv.config_read(0, 4) | drv.config_read(4, 4) << 32 == CID
    assert drv.common_read(0x12, 2) == 3


def test_guest_connects_to_host_and_data_flows_both_ways(rig, tmp_path):
    gm, bus, dev, drv, guest, _ = rig()
    srv = _listen(str(tmp_path / "v_1234"))
    pkt = _guest_connect(guest, 40000, 1234)
    assert pkt["op"] == vs.OP_RESPONSE and (pkt["src_port"], pkt["dst_port"]) == (1234, 40000)
    assert pkt["src_cid"] == 2 and pkt["dst_cid"] == CID
    host, _ = srv.accept()
    guest.send(vs.OP_RW, 40000, 1234, b"hello host")
    assert host.recv(100) == b"hello host"
    host.sendall(b"hello guest")
    pkt = guest.recv()
    assert pkt["op"] == vs.OP_RW and pkt["data"] == b"hello guest"


def test_guest_connect_with_nobody_listening_is_reset(rig):
    gm, bus, dev, drv, guest, _ = rig()
    pkt = _guest_connect(guest, 40001, 999)
    assert pkt["op"] == vs.OP_RST and (pkt["src_port"], pkt["dst_port"]) == (999, 40001)
    assert dev.connections() == 0


def _host_connect(path, port):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b"CONNECT %d\n" % port)
    return s


def test_host_connects_to_guest_listener(rig, tmp_path):
    gm, bus, dev, drv, guest, _ = rig()
    h = _host_connect(str(tmp_path / "v"), 52)
    req = guest.recv()
    assert req["op"] == vs.OP_REQUEST and req["dst_port"] == 52 and req["dst_cid"] == CID
    hport = req["src_port"]
    guest.send(vs.OP_RESPONSE, 52, hport)
    h.settimeout(5)
    assert h.recv(64) == b"OK %d\n" % hport
    h.sendall(b"ping")
    pkt = guest.recv()
    assert pkt["op"] == vs.OP_RW and pkt["data"] == b"ping"
    guest.send(vs.OP_RW, 52, hport, b"pong")
    assert h.recv(64) == b"pong"


def _sndbufs(dev):
    out = []
    for fd in dev.conns[dev.conns[:, vs.C_STATE] == vs.ESTABLISHED, vs.C_FD]:
        s = socket.socket(fileno=os.dup(int(fd)))
        try:
            out.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        finally:
            s.close()
    return out


def test_our_end_of_each_host_socket_holds_a_larger_send_buffer(rig, tmp_path):
    # Both ways a connection is made: Linux doubles what we ask for, up to
    # twice net.core.wmem_max.
    with open("/proc/sys/net/core/wmem_max") as f:
        want = 2 * min(vs.HOST_SNDBUF, int(f.read()))
    gm, bus, dev, drv, guest, _ = rig()
    srv = _listen(str(tmp_path / "v_1235"))
    assert _guest_connect(guest, 40002, 1235)["op"] == vs.OP_RESPONSE
    assert _sndbufs(dev) == [want]
    h = _host_connect(str(tmp_path / "v"), 54)
    req = guest.recv()
    guest.send(vs.OP_RESPONSE, 54, req["src_port"])
    h.settimeout(5)
    assert h.recv(64) == b"OK %d\n" % req["src_port"]
    assert _sndbufs(dev) == [want, want]
    srv.close()


def test_host_connect_refused_by_the_guest_is_closed(rig, tmp_path):
    gm, bus, dev, drv, guest, _ = rig()
    h = _host_connect(str(tmp_path / "v"), 53)
    req = guest.recv()
    guest.send(vs.OP_RST, 53, req["src_port"])
    h.settimeout(5)
    assert h.recv(64) == b""


def test_a_bad_handshake_line_is_closed(rig, tmp_path):
    gm, bus, dev, drv, guest, _ = rig()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(tmp_path / "v"))
    s.sendall(b"HELLO 5\n")
    s.settimeout(5)
    assert s.recv(64) == b""
    assert dev.connections() == 0


def _established(guest, tmp_path, gport=40000, hport=1234):
    srv = _listen(str(tmp_path / f"v_{hport}"))
    assert _guest_connect(guest, gport, hport)["op"] == vs.OP_RESPONSE
    host, _ = srv.accept()
    srv.close()
    host.settimeout(5)
    return host


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


# rule -> how the guest breaks it on connection (40000, 1234)
def _bad_op(g):
    g.send(9, 40000, 1234)


def _bad_type(g):
    g.send(vs.OP_RW, 40000, 1234, b"x", type_=2)


def _wrong_cid(g):
    g.send(vs.OP_RW, 40000, 1234, b"x", src_cid=CID + 1)


def _oversize(g):
    g.send(vs.OP_RW, 40000, 1234, b"x" * 10, length=4000)


def _unknown(g):
    g.send(vs.OP_RW, 40000, 4321, b"x")


def _overrun(g):
    # Ignore the credit: the host reads nothing, so once its socket is
    # full the device's ring is, and one packet more breaks the rule.
    for _ in range(1000):
        g.send(vs.OP_RW, 40000, 1234, b"y" * 65536)
        if _sent_rule(g, vs.E_VSOCK_CREDIT):
            return


def _sent_rule(g, code):
    return g.dev.st[vs.S_RULES + code - vs.E_BASE] > 0 or bool(g.fatal)


RULES = [("bad op", _bad_op, vs.E_VSOCK_OP), ("bad type", _bad_type, vs.E_VSOCK_TYPE),
         ("wrong cid", _wrong_cid, vs.E_VSOCK_CID), ("oversize length", _oversize, vs.E_VSOCK_LEN),
         ("credit overrun", _overrun, vs.E_VSOCK_CREDIT), ("unknown connection", _unknown, vs.E_VSOCK_CONN)]


@pytest.mark.parametrize("name,breaks,code", RULES, ids=[r[0] for r in RULES])
def test_every_rule_resets_only_its_connection_or_stops_a_strict_guest(rig, tmp_path, policy, name, breaks, code):
    gm, bus, dev, drv, guest, fatal = rig(strict=policy)
    guest.dev, guest.fatal = dev, fatal
    host = _established(guest, tmp_path)
    other = _established(guest, tmp_path, 40001, 1235)
    breaks(guest)
    assert _wait(lambda: _sent_rule(guest, code))
    assert dev.st[vs.S_RULES + code - vs.E_BASE] == 1
    assert "§5.10" in vs.error_message(code)
    if policy:
        # --strict: the driver error stops the guest, naming the rule and its section.
        assert _wait(lambda: fatal)
        assert vs.error_message(code) in fatal[0]
        return
    assert not fatal
    # The guest hears a RST for the offending ports; nothing else is touched.
    while True:
        pkt = guest.recv()
        if pkt["op"] == vs.OP_RST:
            break
    want_hport = 4321 if code == vs.E_VSOCK_CONN else 1234
    assert (pkt["src_port"], pkt["dst_port"]) == (want_hport, 40000)
    if code != vs.E_VSOCK_CONN:
        host.settimeout(5)
        rest = b""
        while True:                          # the host end is closed (after what was written before)
            got = host.recv(1 << 20)
            if not got:
                break
            rest += got
    guest.send(vs.OP_RW, 40001, 1235, b"still here")
    assert other.recv(100) == b"still here"


def test_credit_holds_a_host_sender_whose_guest_stops_reading(rig, tmp_path):
    gm, bus, dev, drv, guest, _ = rig()
    guest.buf_alloc = 16384
    host = _established(guest, tmp_path)
    guest.send(vs.OP_CREDIT_UPDATE, 40000, 1234)       # tell the device the smaller buffer
    assert _wait(lambda: dev.conns[:, vs.C_PEER_BUF].max() == 16384)
    host.setblocking(False)
    sent = 0
    block = os.urandom(65536)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:                 # until the host's socket is full
        try:
            sent += host.send(block)
        except BlockingIOError:
            break
    assert sent > 16384
    got = b""
    while len(got) < 16384:
        pkt = guest.recv()
        assert pkt["op"] == vs.OP_RW
        got += pkt["data"]
    assert len(got) == 16384                            # exactly the credit, no more
    pkt = guest.recv()                                  # ... and the device asks for more, once
    assert pkt["op"] == vs.OP_CREDIT_REQUEST and (pkt["src_port"], pkt["dst_port"]) == (1234, 40000)
    with pytest.raises(TimeoutError):
        guest.recv(timeout=0.5)
    guest.consumed(40000, 1234, len(got))
    guest.send(vs.OP_CREDIT_UPDATE, 40000, 1234)
    pkt = guest.recv()
    assert pkt["op"] == vs.OP_RW and len(pkt["data"]) > 0
    assert got + pkt["data"] == (block * 4)[:len(got) + len(pkt["data"])]


def test_a_guest_that_tells_its_credit_only_when_asked_gets_asked(rig, tmp_path):
    # Linux sends CREDIT_UPDATE only when its free space runs low or when
    # asked (CREDIT_REQUEST).  A guest that consumed everything but has not
    # said so must not leave the host's data stuck: the device, out of
    # credit, asks, and the guest's answer lets the rest through.
    gm, bus, dev, drv, guest, _ = rig()
    guest.buf_alloc = 16384
    host = _established(guest, tmp_path)
    guest.send(vs.OP_CREDIT_UPDATE, 40000, 1234)
    assert _wait(lambda: dev.conns[:, vs.C_PEER_BUF].max() == 16384)
    data = os.urandom(4 * 16384 + 1000)
    host.sendall(data)
    got, asked = b"", 0
    while len(got) < len(data):
        pkt = guest.recv()
        if pkt["op"] == vs.OP_RW:
            got += pkt["data"]
            guest.consumed(40000, 1234, len(pkt["data"]))       # read at once, but not said
        else:
            assert pkt["op"] == vs.OP_CREDIT_REQUEST, pkt
            asked += 1
            guest.send(vs.OP_CREDIT_UPDATE, 40000, 1234)         # Linux's answer
    assert got == data and asked == 4
    assert dev.counters()["rx"]["credit_requests_sent"] == 4


def test_the_device_advertises_credit_as_the_host_reads(rig, tmp_path):
    gm, bus, dev, drv, guest, _ = rig()
    host = _established(guest, tmp_path)
    data = os.urandom(vs.BUF_ALLOC * 3)
    seen_fwd, got, off = 0, b"", 0
    credit = vs.BUF_ALLOC
    # A guest that respects the credit sends 3x its buffer while the host reads.
    while off < len(data) or len(got) < len(data):
        while off < len(data) and off - seen_fwd < credit:
            n = min(65536, len(data) - off, credit - (off - seen_fwd))
            guest.send(vs.OP_RW, 40000, 1234, data[off:off + n])
            off += n
        try:
            host.settimeout(0.05)
            got += host.recv(1 << 20)
        except socket.timeout:
            pass
        while drv.queues[0].used_idx() != drv.queues[0].last_used:
            pkt = guest.recv()
            assert pkt["op"] == vs.OP_CREDIT_UPDATE
            seen_fwd = pkt["fwd_cnt"]
    assert got == data and dev.st[vs.S_RULES:].sum() == 0


def test_half_close_both_ways_then_full_shutdown(rig, tmp_path):
    gm, bus, dev, drv, guest, _ = rig()
    host = _established(guest, tmp_path)
    guest.send(vs.OP_RW, 40000, 1234, b"last words")
    guest.send(vs.OP_SHUTDOWN, 40000, 1234, flags=vs.SHUTDOWN_SEND)
    assert host.recv(100) == b"last words"
    assert host.recv(100) == b""                        # EOF for the host ...
    host.sendall(b"reply after your EOF")               # ... which can still send
    pkt = guest.recv()
    assert pkt["op"] == vs.OP_RW and pkt["data"] == b"reply after your EOF"
    host.shutdown(socket.SHUT_WR)
    pkt = guest.recv()
    assert pkt["op"] == vs.OP_SHUTDOWN and pkt["flags"] == vs.SHUTDOWN_SEND
    guest.send(vs.OP_SHUTDOWN, 40000, 1234, flags=vs.SHUTDOWN_SEND | vs.SHUTDOWN_RCV)
    pkt = guest.recv()
    assert pkt["op"] == vs.OP_RST
    assert _wait(lambda: dev.connections() == 0)


def test_many_connections_at_once_and_the_limit(rig, tmp_path):
    gm, bus, dev, drv, guest, _ = rig()
    srv = _listen(str(tmp_path / "v_7"))
    srv.listen(128)
    hosts = []
    for k in range(vs.MAX_CONNS):
        assert _guest_connect(guest, 50000 + k, 7)["op"] == vs.OP_RESPONSE
        hosts.append(srv.accept()[0])
    assert _guest_connect(guest, 60000, 7)["op"] == vs.OP_RST        # one too many
    for k in (0, 31, 63):
        guest.send(vs.OP_RW, 50000 + k, 7, b"conn %d" % k)
        hosts[k].settimeout(5)
        assert hosts[k].recv(100) == b"conn %d" % k


def test_a_connection_with_much_to_send_leaves_buffers_for_the_others(rig, tmp_path):
    # The rx thread sends a busy connection's data a burst at a time
    # (RX_BURST packets), then the other connections' turn comes: B's few
    # bytes, there before A's, reach the guest within A's first burst,
    # not after all of A's backlog has taken the ring.
    gm, bus, dev, drv, guest, _ = rig()
    host_a = _established(guest, tmp_path, 40000, 1234)
    host_b = _established(guest, tmp_path, 40001, 1235)
    backlog = os.urandom(24 * 4096)
    host_b.sendall(b"few bytes")
    host_a.sendall(backlog)
    got_a, order = b"", []
    while len(got_a) < len(backlog) or 40001 not in order:
        pkt = guest.recv()
        assert pkt["op"] == vs.OP_RW, pkt
        order.append(pkt["dst_port"])
        if pkt["dst_port"] == 40000:
            got_a += pkt["data"]
        else:
            assert pkt["data"] == b"few bytes"
    assert got_a == backlog and len(order) > vs.RX_BURST + 1
    assert order.index(40001) <= vs.RX_BURST, order


def test_restore_sends_the_transport_reset_event(rig, tmp_path):
    gm, bus, dev, drv, guest, _ = rig()
    dev.load_state({})
    assert guest.event() == vs.EVENT_TRANSPORT_RESET
    assert dev.counters()["event"]["transport_resets"] == 1


def test_a_request_while_the_old_connections_rst_is_owed_gets_that_rst_not_a_second_row():
    # Found by fuzz_vsock: a REQUEST reusing the address pair of a row still
    # in RESETTING made a new row with the same ports, so the owed RST could
    # reach the new connection.  Now the owed RST answers the REQUEST.
    import struct

    import numpy as np

    from lguest_jit.hw.libc import host_iov
    conns = np.zeros((vs.MAX_CONNS, vs.C_FIELDS), np.int64)
    conns[:, vs.C_FD] = -1
    conns[0, vs.C_STATE] = vs.RESETTING
    conns[0, vs.C_GPORT], conns[0, vs.C_HPORT] = 1000, 80
    st = np.zeros(vs.S_FIELDS, np.int64)
    st[vs.S_CID] = CID
    strays = np.zeros((vs.MAX_STRAYS, 2), np.int64)
    ev = np.zeros(5, np.int64)
    hdr = np.frombuffer(struct.pack("<QQIIIHHIII", CID, 2, 1000, 80, 0, vs.TYPE_STREAM, vs.OP_REQUEST, 0,
                                    65536, 0), np.uint8).copy()
    mem = np.zeros(4096, np.uint8)
    iov = np.zeros((1, 3), np.uint64)
    iov[0] = (0, 44, 0)
    rule, poke = vs.tx_packet(mem, iov, 1, 0, hdr, host_iov(1), conns, np.zeros((vs.MAX_CONNS, 16), np.uint8),
                              st, strays, ev)
    assert (int(rule), int(poke), int(ev[0])) == (0, 1, vs.EV_NONE)
    assert conns[0, vs.C_STATE] == vs.RESETTING and (conns[1:, vs.C_STATE] == vs.FREE).all()
    # Once the RST is sent and the row freed, the same pair connects normally.
    conns[0, vs.C_STATE] = vs.FREE
    rule, poke = vs.tx_packet(mem, iov, 1, 0, hdr, host_iov(1), conns, np.zeros((vs.MAX_CONNS, 16), np.uint8),
                              st, strays, ev)
    assert (int(rule), int(ev[0]), int(ev[1]), int(ev[2])) == (0, vs.EV_REQUEST, 1000, 80)


def test_the_connection_lock_excludes_under_contention_past_its_spin_budget():
    # Two threads on a 2-core host with the holder often off-CPU: each
    # waiter soon gives up spinning and yields (LOCK_SPINS), and the lock
    # must still let one thread in at a time.
    import threading

    import numpy as np
    from numba import njit

    @njit(nogil=True)
    def bump(lk, box, n):
        for _ in range(n):
            vs.lock(lk)
            v = box[0]
            for _ in range(200):         # hold it long enough for the other to pass LOCK_SPINS
                box[1] += 1
            box[0] = v + 1
            vs.unlock(lk)

    lk = np.zeros(1, np.int64)
    box = np.zeros(2, np.int64)
    bump(lk, box, 1)
    box[:] = 0
    threads = [threading.Thread(target=bump, args=(lk, box, 20_000)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert box[0] == 40_000
    assert lk[0] == 0
