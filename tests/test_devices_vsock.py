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
