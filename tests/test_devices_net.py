"""virtio-net over a real tap, driven by Linux's driver sequence over the PCI
bus (no hypervisor).

Every test that creates an interface runs this file as a script in a
private network namespace (``unshare --net``), which it checks is empty
before touching anything: nothing here can reach the host's own network.
Traffic goes only to 10.0.2.x on the tap inside that namespace.
"""
from __future__ import annotations

import functools
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import types

import pytest

from lguest_jit.devices import net
from lguest_jit.devices.net import TunSpec, offload_flags, parse_tunnet

HOST_IP = "10.0.2.2"
GUEST_IP = "10.0.2.15"
GUEST_MAC = bytes.fromhex("525400123456")
GUEST_MAC_TEXT = "52:54:00:12:34:56"
BCAST = b"\xff" * 6
HDR0 = bytes(net.HDR_SIZE)          # virtio_net_hdr_v1: no offload, num_buffers 0
RX_BUF = 2048


def delivered(frame: bytes) -> bytes:
    """``frame`` as the guest finds it: num_buffers set to 1 (§5.1.6.4)."""
    return frame[:10] + struct.pack("<H", 1) + frame[12:]


# ---------------------------------------------------------------------------
# Parsing and feature logic: no interface needed.

@pytest.mark.parametrize("spec, want", [
    ("10.0.2.2", TunSpec(ip="10.0.2.2")),
    ("192.168.19.1:52:54:00:12:34:56", TunSpec(ip="192.168.19.1", mac=GUEST_MAC)),
    ("bridge:br0", TunSpec(bridge="br0")),
    ("bridge:lan-1:02:AB:cd:00:00:01", TunSpec(bridge="lan-1", mac=bytes.fromhex("02abcd000001"))),
])
def test_parse_tunnet_accepts(spec, want):
    got = parse_tunnet(spec)
    assert got == want
    assert parse_tunnet(str(got)) == got


@pytest.mark.parametrize("spec, words", [
    ("10.0.2", "bad IPv4"),
    ("10.0.2.256", "bad IPv4"),
    ("", "bad IPv4"),
    ("0.0.0.0", "cannot be an interface address"),
    ("224.0.0.1", "cannot be an interface address"),
    ("10.0.2.2:52:54:00:12:34", "bad MAC"),
    ("10.0.2.2:52:54:00:12:34:5g", "bad MAC"),
    ("10.0.2.2:", "bad MAC"),
    ("10.0.2.2:01:00:5e:00:00:01", "multicast"),
    ("bridge:", "must specify a bridge name"),
    ("bridge::52:54:00:12:34:56", "must specify a bridge name"),
    ("bridge:a-very-long-bridge-name", "not a valid bridge name"),
    ("bridge:br0:zz", "bad MAC"),
])
def test_parse_tunnet_rejects_with_one_line(spec, words):
    with pytest.raises(ValueError) as e:
        parse_tunnet(spec)
    msg = str(e.value)
    assert words in msg and "\n" not in msg


def test_random_mac_is_local_unicast():
    macs = {net.random_mac() for _ in range(64)}
    assert len(macs) > 60
    for m in macs:
        assert len(m) == 6 and m[0] & 1 == 0 and m[0] & 2 == 2


def test_offloads_follow_negotiated_features():
    f = {name: 1 << getattr(net, f"VIRTIO_NET_F_{name}") for name in ("GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6",
                                                                    "GUEST_ECN")}
    everything = sum(f.values())
    assert offload_flags(everything) == net.TUN_F_CSUM | net.TUN_F_TSO4 | net.TUN_F_TSO6 | net.TUN_F_TSO_ECN
    assert offload_flags(0) == 0
    # The tap takes TSO only with CSUM, ECN only with some TSO.
    assert offload_flags(everything & ~f["GUEST_CSUM"]) == 0
    assert offload_flags(f["GUEST_CSUM"] | f["GUEST_ECN"]) == net.TUN_F_CSUM
    assert offload_flags(f["GUEST_CSUM"] | f["GUEST_TSO6"]) == net.TUN_F_CSUM | net.TUN_F_TSO6


# ---------------------------------------------------------------------------
# The queue kernels on their own, with a datagram socket pair standing in for
# the tap (it keeps frame boundaries as a tap does): runs anywhere.

class KernelRig:
    """One queue kernel in a thread over a MockDriver ring; ``peer`` is the
    far end of the fake tap."""

    def __init__(self, kernel, size=16, poll_fd=None):
        import numpy as np
        from lguest_jit import vring
        from lguest_jit.devices.base import Device
        from lguest_jit.hw.libc import POLLIN, POLLOUT, host_iov, pollfds
        from lguest_jit.hw.memory import GuestMemory
        from lguest_jit.testing import MockDriver
        self.gm = GuestMemory(8 << 20)
        self.drv = MockDriver(self.gm, size=size, features=Device.RING_FEATURES)
        self.q = self.drv.device_queue()
        self.notify = os.eventfd(0, os.EFD_CLOEXEC)
        self.irq = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.tap, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tap.setblocking(False)
        # A small send buffer, so the tx tests can fill the "tap" (a
        # connected AF_UNIX pair is limited by the sender's buffer only).
        self.tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.isr = np.zeros(1, np.uint8)
        self.stats = np.zeros(net.NS_FIELDS, np.int64)
        self.pfds = pollfds(2)
        events = POLLIN if kernel is net._rx_serve else POLLOUT
        self.pfds[0] = (self.tap.fileno() if poll_fd is None else poll_fd, events)
        self.pfds[1] = (self.stop_fd, POLLIN)
        args = (self.gm.mem, self.q, vring.new_iov(size), self.notify, self.isr, self.irq, np.zeros(1, np.uint64),
                host_iov(size), self.tap.fileno(), self.pfds, self.stats)
        self.code = None
        self.thread = threading.Thread(target=lambda: setattr(self, "code", int(kernel(*args))), daemon=True)
        self.thread.start()

    def kick(self):
        if self.drv.kick_prepare():
            os.eventfd_write(self.notify, 1)

    def used(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while (got := self.drv.get_used()) is None:
            assert time.monotonic() < deadline, "no used buffer"
            time.sleep(0.002)
        return got

    def interrupted(self, timeout=5.0) -> bool:
        import select
        if select.select([self.irq], [], [], timeout)[0]:
            os.eventfd_read(self.irq)
            return True
        return False

    def stop(self):
        from lguest_jit import vring
        self.q[vring.Q_STOP] = 1
        os.eventfd_write(self.notify, 1)
        os.eventfd_write(self.stop_fd, 1)
        self.thread.join(10)
        assert not self.thread.is_alive()
        for fd in (self.notify, self.irq, self.stop_fd):
            os.close(fd)
        self.tap.close()
        self.peer.close()
        self.gm.close()
        return self.code


def test_rx_kernel_takes_a_chain_only_for_a_frame_and_interrupts_before_blocking():
    from lguest_jit import vring
    rig = KernelRig(net._rx_serve)
    heads = [rig.drv.add(in_=[net.HDR_SIZE, 200]) for _ in range(3)]
    rig.kick()
    time.sleep(0.1)
    assert rig.q[vring.Q_N_CHAINS] == 0 and not rig.interrupted(0)
    frame = HDR0 + os.urandom(150)
    rig.peer.send(frame)
    head, length, data = rig.used()
    assert head == heads[0] and length == len(frame) and b"".join(data)[:length] == delivered(frame)
    # Nothing more to read: the thread signalled before going back to poll.
    assert rig.interrupted() and rig.isr[0] & 1
    assert rig.q[vring.Q_N_CHAINS] == 1
    assert rig.stop() == vring.STOPPED


def test_rx_kernel_waits_for_buffers_then_delivers_in_order():
    from lguest_jit import vring
    rig = KernelRig(net._rx_serve)
    frames = [HDR0 + bytes([k]) * (60 + k) for k in range(5)]
    for f in frames:
        rig.peer.send(f)
    time.sleep(0.05)                       # the thread now sleeps for buffers
    for _ in frames:
        rig.drv.add(in_=[net.HDR_SIZE, 1500], indirect=True)
    rig.kick()
    got = [rig.used() for _ in frames]
    assert [b"".join(d)[:n] for _, n, d in got] == [delivered(f) for f in frames]
    assert rig.q[vring.Q_N_BYTES] == sum(map(len, frames))
    assert rig.stop() == vring.STOPPED


def test_rx_kernel_reads_queued_frames_back_to_back_and_returns_the_spare_chain():
    """After a frame the kernel reads again before polling; when the tap has
    run dry the chain it took for that read goes back unused, so only chains
    that carried a frame are counted and the next frame lands in it."""
    from lguest_jit import vring
    rig = KernelRig(net._rx_serve)
    frames = [HDR0 + bytes([k]) * (70 + k) for k in range(3)]
    for f in frames:
        rig.peer.send(f)
    heads = [rig.drv.add(in_=[net.HDR_SIZE, 500]) for _ in range(5)]
    rig.kick()
    got = [rig.used() for _ in frames]
    assert [h for h, _, _ in got] == heads[:3]
    assert [b"".join(d)[:n] for _, n, d in got] == [delivered(f) for f in frames]
    assert rig.interrupted()          # signalled before it went back to poll
    assert rig.q[vring.Q_N_CHAINS] == 3 and rig.stats[net.NS_RX_SPURIOUS] == 0
    late = HDR0 + os.urandom(90)
    rig.peer.send(late)
    head, length, data = rig.used()
    assert head == heads[3] and b"".join(data)[:length] == delivered(late)
    assert rig.stop() == vring.STOPPED


def test_rx_kernel_keeps_its_chain_on_spurious_readiness():
    from lguest_jit import vring
    always = os.eventfd(1, os.EFD_CLOEXEC)          # polls readable, the "tap" itself stays empty
    rig = KernelRig(net._rx_serve, poll_fd=always)
    first = rig.drv.add(in_=[300])
    rig.drv.add(in_=[300])
    rig.kick()
    deadline = time.monotonic() + 5
    while rig.stats[net.NS_RX_SPURIOUS] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert rig.q[vring.Q_N_CHAINS] == 1 and rig.drv.used_idx() == 0
    frame = HDR0 + os.urandom(100)
    rig.peer.send(frame)
    head, length, data = rig.used()
    assert head == first and data[0][:length] == delivered(frame)
    assert rig.stop() == vring.STOPPED
    os.close(always)


def test_rx_kernel_refuses_readable_and_headerless_buffers():
    from lguest_jit import vring
    from lguest_jit.devices.base import error_message
    for out, in_ in (([b"x" * 16], [200]), ((), [net.HDR_SIZE - 2])):
        rig = KernelRig(net._rx_serve)
        rig.drv.add(out=out, in_=in_)
        rig.kick()
        rig.peer.send(HDR0 + bytes(60))
        rig.thread.join(5)
        code = rig.stop()
        assert code == -(vring.E_CHAIN_READABLE if out else vring.E_SHORT_HEADER)
        assert ("receive queue" if out else "header") in error_message(code)


def test_rx_kernel_reports_a_broken_tap_instead_of_spinning():
    rig = KernelRig(net._rx_serve, poll_fd=999_999)   # no such fd: poll says POLLNVAL
    rig.thread.join(5)
    assert not rig.thread.is_alive()
    assert rig.stop() == -net.E_TAP


def test_tx_kernel_writes_each_chain_as_one_frame():
    from lguest_jit import vring
    rig = KernelRig(net._tx_serve, size=64)
    frames = [os.urandom(n) for n in (14, 60, 1514, 300)]
    for k, f in enumerate(frames):
        # Header and frame split over descriptors in several ways.
        rig.drv.add(out=[HDR0[:5], HDR0[5:] + f[:7], f[7:]], indirect=bool(k & 1))
    rig.kick()
    for f in frames:
        assert rig.peer.recv(4096) == HDR0 + f
    for _ in frames:
        assert rig.used()[1] == 0
    assert rig.q[vring.Q_N_BYTES] == sum(len(f) + net.HDR_SIZE for f in frames)
    assert rig.stop() == vring.STOPPED


def test_tx_kernel_waits_when_the_tap_is_full_and_stops_while_waiting():
    from lguest_jit import vring
    rig = KernelRig(net._tx_serve, size=64)
    frames = [HDR0 + bytes([k]) * 100 for k in range(40)]   # more than the peer queues unread
    for f in frames:
        rig.drv.add(out=[f])
    rig.kick()
    deadline = time.monotonic() + 5
    while rig.stats[net.NS_TX_BLOCKED] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    got = [rig.peer.recv(4096) for _ in frames]
    assert got == frames
    assert all(rig.used()[1] == 0 for _ in frames)
    # Fill it again and stop the thread while it waits for room.
    blocked = int(rig.stats[net.NS_TX_BLOCKED])
    for f in frames[:30]:
        rig.drv.add(out=[f])
    rig.kick()
    deadline = time.monotonic() + 5
    while rig.stats[net.NS_TX_BLOCKED] == blocked:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    assert rig.stop() == vring.STOPPED


def test_tx_kernel_drops_a_refused_frame_and_goes_on():
    from lguest_jit import vring
    rig = KernelRig(net._tx_serve)
    rig.peer.close()                                  # writes now fail: ECONNREFUSED
    rig.drv.add(out=[HDR0 + bytes(60)])
    rig.kick()
    head, length, _ = rig.used()
    assert length == 0 and rig.stats[net.NS_TX_DROPPED] == 1 and rig.stats[net.NS_TX_ERRNO] > 0
    rig.peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)   # stop() closes it
    assert rig.stop() == vring.STOPPED


# ---------------------------------------------------------------------------
# Tap tests: each runs a scenario below in its own network namespace.

@functools.cache
def _netns_unavailable() -> str | None:
    from lguest_jit.testing import netns_problem
    return netns_problem()


def run_in_netns(scenario: str, *, no_jit: bool = False) -> None:
    reason = _netns_unavailable()
    if reason:
        print(f"skipping tap test {scenario}: {reason}", file=sys.stderr)
        pytest.skip(reason)
    env = dict(os.environ)
    if no_jit:
        env["NUMBA_DISABLE_JIT"] = "1"
    r = subprocess.run(["unshare", "--net", sys.executable, os.path.abspath(__file__), scenario],
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, f"{scenario} failed in its namespace:\n{r.stdout}\n{r.stderr}"
    assert f"{scenario}: ok" in r.stdout


def test_guest_to_host_arp_and_ping():
    run_in_netns("scn_arp_and_ping")


def test_guest_to_host_without_jit():
    run_in_netns("scn_arp_and_ping", no_jit=True)


def test_host_to_guest_udp_and_offloads():
    run_in_netns("scn_host_to_guest")


def test_guest_checksum_and_tso_offloads_reach_host_sockets():
    run_in_netns("scn_guest_offloads")


def test_driver_errors_need_reset():
    run_in_netns("scn_driver_errors")


def test_bridge_and_bad_bridges():
    run_in_netns("scn_bridge")


def test_close_removes_tap_and_threads():
    run_in_netns("scn_close")


def test_mtu_choice_per_host_and_tap():
    """--net-mtu: auto offers SOFTWARE_KVM_MTU only where the guest kernel is
    emulated and the tap is addressed (a bridged tap keeps its bridge's);
    off offers none; a number is offered as given, never for a bridge."""
    ip, bridged = parse_tunnet(HOST_IP), parse_tunnet("bridge:br0")
    assert net.resolve_mtu("auto", ip, True) == net.SOFTWARE_KVM_MTU == 65520
    assert net.resolve_mtu("auto", ip, False) == 0
    assert net.resolve_mtu("auto", bridged, True) == 0
    assert net.resolve_mtu("off", ip, True) == 0
    assert net.resolve_mtu("9000", ip, False) == 9000
    with pytest.raises(ValueError, match="bridge's MTU"):
        net.resolve_mtu("9000", bridged, True)
    with pytest.raises(ValueError, match="from 68 to 65535"):
        net.resolve_mtu("67", ip, True)


def test_mtu_is_offered_set_on_the_tap_and_follows_the_driver():
    run_in_netns("scn_mtu")


def test_only_transmit_queues_busy_poll():
    """Receive queues wait on the tap and the control queue is rare: only
    transmit queues (1, 3, ... below the control queue) poll for frames."""
    for pairs, want in ((1, [0.0, 50.0]), (3, [0.0, 50.0] * 3 + [0.0])):
        dev = types.SimpleNamespace(pairs=pairs, tx_poll_us=50.0)
        assert [net.Net.queue_poll_us(dev, i) for i in range(len(want))] == want


def test_transmit_queue_finds_a_frame_posted_without_a_notification():
    run_in_netns("scn_tx_poll")


# ---------------------------------------------------------------------------
# Frames, built and parsed byte by byte.

def inet_csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip4(text: str) -> bytes:
    return socket.inet_aton(text)


def arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    eth = BCAST + src_mac + b"\x08\x06"
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src_mac + ip4(src_ip) + bytes(6) + ip4(target_ip)
    return eth + arp


def icmp_echo(src_mac, dst_mac, src_ip, dst_ip, ident, seq, payload) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", inet_csum(icmp)) + icmp[4:]
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0x1234, 0x4000, 64, 1, 0, ip4(src_ip), ip4(dst_ip))
    iph = iph[:10] + struct.pack("!H", inet_csum(iph)) + iph[12:]
    return dst_mac + src_mac + b"\x08\x00" + iph + icmp


def ipv4_header(src_ip, dst_ip, proto, payload_len, ident=0x1234) -> bytes:
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, 0x4000, 64, proto, 0,
                      ip4(src_ip), ip4(dst_ip))
    return iph[:10] + struct.pack("!H", inet_csum(iph)) + iph[12:]


def pseudo_sum(src_ip, dst_ip, proto, length) -> int:
    """The folded, uncomplemented pseudo-header sum a NEEDS_CSUM packet
    carries in its checksum field (the device finishes the sum)."""
    return ~inet_csum(ip4(src_ip) + ip4(dst_ip) + struct.pack("!BBH", 0, proto, length)) & 0xFFFF


def udp_frame(src_mac, dst_mac, src_ip, dst_ip, sport, dport, payload, csum) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), csum) + payload
    return dst_mac + src_mac + b"\x08\x00" + ipv4_header(src_ip, dst_ip, 17, len(udp)) + udp


def tcp_segment(src_mac, dst_mac, src_ip, dst_ip, sport, dport, seq, ack, flags, payload=b"", csum=None):
    """An IPv4 TCP frame; ``csum=None`` computes the full checksum."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload
    if csum is None:
        csum = inet_csum(ip4(src_ip) + ip4(dst_ip) + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    return dst_mac + src_mac + b"\x08\x00" + ipv4_header(src_ip, dst_ip, 6, len(tcp)) + tcp


# ---------------------------------------------------------------------------
# Scenario helpers (run inside the namespace)

def _ns_setup():
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        names = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    # The guarantee that nothing touches the host's network: a fresh
    # namespace holds only its own loopback.
    assert names == {"lo"}, f"not a fresh network namespace: {names}"
    quiet = True
    for conf in ("all", "default"):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                f.write("1")
        except OSError:
            quiet = False      # IPv6 chatter (MLD, router solicitations) is filtered instead
    return quiet


def _machine():
    from lguest_jit import pci
    from lguest_jit.hw.memory import GuestMemory
    gm = GuestMemory(32 << 20)
    return gm, pci.Bus(gm)


def _tap_machine():
    """A scenario's start in its namespace: (gm, bus, Net on a host-addressed
    tap, whether the namespace is quiet)."""
    quiet = _ns_setup()
    gm, bus = _machine()
    return gm, bus, net.Net(f"{HOST_IP}:{GUEST_MAC_TEXT}"), quiet


def _close(gm, bus, dev):
    bus.close()
    dev.close()
    gm.close()


def _bring_up(bus, gm, dev, **kw):
    from lguest_jit.testing import VirtioPciDriver
    return VirtioPciDriver.attach(bus, gm, dev, **kw)


def _post_rx(drv, count, indirect=False):
    for _ in range(count):
        # Header and frame in separate descriptors, as Linux lays out small buffers.
        drv.queues[net.RX].add(in_=[net.HDR_SIZE, RX_BUF - net.HDR_SIZE], indirect=indirect)
    drv.kick(net.RX)


def _send(drv, frame: bytes, hdr: bytes = HDR0, indirect=False):
    q = drv.queues[net.TX]
    q.add(out=[hdr, frame], indirect=indirect)
    drv.kick(net.TX)
    head, length, _ = drv.wait_used(net.TX)
    assert length == 0


def _recv(drv, want, timeout=5.0, indirect=False):
    """The first received (vnet header, frame) for which want(frame) holds;
    every buffer reaped is posted again."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no matching frame received"
        head, length, data = drv.wait_used(net.RX, timeout=left)
        blob = b"".join(data)[:length]
        _post_rx(drv, 1, indirect)
        assert length >= net.HDR_SIZE
        hdr, frame = blob[:net.HDR_SIZE], blob[net.HDR_SIZE:]
        if want(frame):
            return hdr, frame


def _link(ifname):
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return None
        link = ipr.get_links(idx[0])[0]
        addrs = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx[0], family=socket.AF_INET)]
        return {"index": idx[0], "up": bool(link["flags"] & 1), "master": link.get_attr("IFLA_MASTER"),
                "mac": bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", "")), "addrs": addrs,
                "mtu": link.get_attr("IFLA_MTU")}


def _wait_status(drv, bit, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if drv.status & bit:
            return True
        time.sleep(0.01)
    return False


# ---------------------------------------------------------------------------
# Scenarios

def scn_arp_and_ping():
    from lguest_jit import vring
    gm, bus, dev, quiet = _tap_machine()
    tap = _link(dev.ifname)
    assert tap["up"] and tap["addrs"] == [(HOST_IP, 24)] and tap["master"] is None
    drv = _bring_up(bus, gm, dev)
    assert drv.device_id == 0x1040 + net.VIRTIO_ID_NET
    assert bytes(drv.config_read(net.CFG_MAC + i, 1) for i in range(6)) == GUEST_MAC
    for bit in (0, 1, 5, 7, 8, 9, 11, 12, 13, vring.VIRTIO_RING_F_INDIRECT_DESC, vring.VIRTIO_F_VERSION_1):
        assert drv.features >> bit & 1, bit
    assert not drv.features >> net.VIRTIO_NET_F_STATUS & 1
    _post_rx(drv, 8)
    if quiet:
        # lguest's net_input: no frame, no chain taken.
        time.sleep(0.2)
        assert dev.counters()["rx"]["requests"] == 0
        assert gm.mem[drv.queues[net.RX].used + 2] == 0

    # Guest -> host: ARP who-has 10.0.2.2; the host's kernel answers.
    _send(drv, arp_request(GUEST_MAC, GUEST_IP, HOST_IP))
    hdr, reply = _recv(drv, lambda f: f[12:14] == b"\x08\x06")
    assert hdr == delivered(HDR0)
    assert reply[0:6] == GUEST_MAC and reply[6:12] == tap["mac"]
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", reply[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 2)
    assert reply[22:28] == tap["mac"] and reply[28:32] == ip4(HOST_IP)
    assert reply[32:38] == GUEST_MAC and reply[38:42] == ip4(GUEST_IP)

    # Ping, through indirect descriptors this time.
    payload = os.urandom(56)
    _send(drv, icmp_echo(GUEST_MAC, tap["mac"], GUEST_IP, HOST_IP, 0x4242, 7, payload), indirect=True)
    _, echo = _recv(drv, lambda f: f[12:14] == b"\x08\x00" and f[23] == 1)
    ip = echo[14:34]
    assert ip[12:16] == ip4(HOST_IP) and ip[16:20] == ip4(GUEST_IP) and inet_csum(ip) == 0
    icmp = echo[34:]
    assert icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (0x4242, 7) and icmp[8:] == payload
    assert inet_csum(icmp) == 0

    c = dev.counters()
    assert c["tx"]["requests"] == 2 and c["tx"]["bytes"] == 2 * net.HDR_SIZE + 42 + 98
    assert c["rx"]["requests"] >= 2 and c["rx"]["bytes"] >= 2 * net.HDR_SIZE + 42 + 98
    assert dev.net_counters()["tx_dropped"] == 0
    _close(gm, bus, dev)


def scn_host_to_guest():
    from pyroute2 import IPRoute
    gm, bus, dev, _ = _tap_machine()
    with IPRoute() as ipr:
        ipr.neigh("add", dst=GUEST_IP, lladdr=GUEST_MAC_TEXT, ifindex=_link(dev.ifname)["index"], state=0x80)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST_IP, 4321))

    def udp_to_guest(payload, indirect):
        sock.sendto(payload, (GUEST_IP, 9999))
        return _recv(drv, lambda f: f[12:14] == b"\x08\x00" and f[23] == 17 and f[36:38] == b"\x27\x0f",
                     indirect=indirect)

    # Every offload negotiated: the tap hands the guest a partial checksum.
    drv = _bring_up(bus, gm, dev)
    assert dev.offloads == net.TUN_F_CSUM | net.TUN_F_TSO4 | net.TUN_F_TSO6 | net.TUN_F_TSO_ECN
    _post_rx(drv, 4, indirect=True)
    payload = os.urandom(300)
    hdr, frame = udp_to_guest(payload, True)
    flags, gso, hdr_len, gso_size, csum_start, csum_offset, nbuf = struct.unpack("<BBHHHHH", hdr)
    assert flags == net.VIRTIO_NET_HDR_F_NEEDS_CSUM and gso == 0
    assert nbuf == 1            # the tap skips num_buffers; the device sets it (§5.1.6.4)
    assert (csum_start, csum_offset) == (14 + 20, 6)
    assert frame[0:6] == GUEST_MAC and frame[30:34] == ip4(GUEST_IP) and frame[26:30] == ip4(HOST_IP)
    assert struct.unpack("!HHH", frame[34:40]) == (4321, 9999, 8 + len(payload)) and frame[42:] == payload

    # Renegotiated without GUEST_CSUM: the tap's offloads follow, and the
    # frame arrives with a complete checksum and an empty header.
    drv.reset()
    no_csum = ~(1 << net.VIRTIO_NET_F_GUEST_CSUM | 1 << net.VIRTIO_NET_F_GUEST_TSO4
                | 1 << net.VIRTIO_NET_F_GUEST_TSO6 | 1 << net.VIRTIO_NET_F_GUEST_ECN)
    drv.init(accept=lambda offered: offered & no_csum)
    assert dev.offloads == 0
    _post_rx(drv, 4)
    payload = os.urandom(700)
    hdr, frame = udp_to_guest(payload, False)
    assert hdr == delivered(HDR0) and frame[42:] == payload
    pseudo = frame[26:34] + struct.pack("!BBH", 0, 17, 8 + len(payload))
    assert inet_csum(pseudo + frame[34:]) == 0

    # A frame longer than the buffer is cut to the buffer (the tap truncates).
    drv.reset()
    drv.init(accept=lambda offered: offered & no_csum)
    drv.queues[net.RX].add(in_=[net.HDR_SIZE + 100])
    drv.kick(net.RX)
    sock.sendto(os.urandom(500), (GUEST_IP, 9999))
    _, length, data = drv.wait_used(net.RX)
    assert length == net.HDR_SIZE + 100 and data[0][net.HDR_SIZE:net.HDR_SIZE + 6] == GUEST_MAC
    sock.close()
    _close(gm, bus, dev)


def scn_guest_offloads():
    import select
    gm, bus, dev, _ = _tap_machine()
    host_mac = _link(dev.ifname)["mac"]
    drv = _bring_up(bus, gm, dev)
    _post_rx(drv, 16)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST_IP, 7777))
    sock.setblocking(False)

    def delivered(frame, hdr=HDR0):
        _send(drv, frame, hdr)
        if not select.select([sock], [], [], 1.0)[0]:
            return None
        try:
            return sock.recvfrom(4096)
        except BlockingIOError:      # UDP verifies the checksum at read time and drops
            return None

    # Complete checksum, no offload: the host takes it.
    payload = os.urandom(200)
    frame = udp_frame(GUEST_MAC, host_mac, GUEST_IP, HOST_IP, 5555, 7777, payload, 0)
    good = inet_csum(ip4(GUEST_IP) + ip4(HOST_IP) + struct.pack("!BBH", 0, 17, 208) + frame[34:])
    frame = frame[:40] + struct.pack("!H", good) + frame[42:]
    assert delivered(frame) == (payload, (GUEST_IP, 5555))
    # A wrong checksum without NEEDS_CSUM: dropped (the host does check) ...
    bad = frame[:40] + struct.pack("!H", good ^ 0x5A5A) + frame[42:]
    assert delivered(bad) is None
    # ... while VIRTIO_NET_F_CSUM lets the guest leave it to the device.
    partial = frame[:40] + struct.pack("!H", pseudo_sum(GUEST_IP, HOST_IP, 17, 208)) + frame[42:]
    hdr = struct.pack("<BBHHHHH", net.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6, 0)
    assert delivered(partial, hdr) == (payload, (GUEST_IP, 5555))
    sock.close()

    # HOST_TSO4: one 4000-byte GSO segment into a host TCP connection whose
    # handshake the guest plays by hand.
    with __import__("pyroute2").IPRoute() as ipr:
        ipr.neigh("add", dst=GUEST_IP, lladdr=GUEST_MAC_TEXT, ifindex=_link(dev.ifname)["index"], state=0x80)
    host = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    host.setblocking(False)
    assert host.connect_ex((GUEST_IP, 8080)) == 115          # EINPROGRESS
    _, syn = _recv(drv, lambda f: f[12:14] == b"\x08\x00" and f[23] == 6 and f[47] & 0x02)
    hport, = struct.unpack("!H", syn[34:36])
    hseq, = struct.unpack("!I", syn[38:42])
    gseq = 0x10000000
    _send(drv, tcp_segment(GUEST_MAC, host_mac, GUEST_IP, HOST_IP, 8080, hport, gseq, hseq + 1, 0x12))
    assert select.select([], [host], [], 5)[1] and host.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    data = os.urandom(4000)
    seg = tcp_segment(GUEST_MAC, host_mac, GUEST_IP, HOST_IP, 8080, hport, gseq + 1, hseq + 1, 0x18, data,
                      csum=pseudo_sum(GUEST_IP, HOST_IP, 6, 20 + len(data)))
    gso_hdr = struct.pack("<BBHHHHH", net.VIRTIO_NET_HDR_F_NEEDS_CSUM, 1, 54, 1000, 34, 16, 0)  # GSO_TCPV4
    _send(drv, seg, gso_hdr)
    got = b""
    deadline = time.monotonic() + 5
    while len(got) < len(data) and time.monotonic() < deadline:
        if select.select([host], [], [], 0.5)[0]:
            got += host.recv(65536)
    assert got == data
    host.close()
    assert dev.net_counters()["tx_dropped"] == 0
    _close(gm, bus, dev)


def scn_driver_errors():
    from lguest_jit import pci
    gm, bus, dev, _ = _tap_machine()
    drv = _bring_up(bus, gm, dev)
    # A writable buffer on the transmit queue.
    drv.queues[net.TX].add(out=[HDR0 + arp_request(GUEST_MAC, GUEST_IP, HOST_IP)], in_=[64])
    drv.kick(net.TX)
    assert _wait_status(drv, pci.DEVICE_NEEDS_RESET)
    # A transmit chain too short for the 12-byte header.
    drv.init()
    drv.queues[net.TX].add(out=[bytes(8)])
    drv.kick(net.TX)
    assert _wait_status(drv, pci.DEVICE_NEEDS_RESET)
    # A readable buffer on the receive queue: found once a frame arrives
    # for it (the guest sends an ARP request; the reply needs a buffer).
    drv.init()
    drv.queues[net.RX].add(out=[bytes(64)], in_=[RX_BUF])
    drv.kick(net.RX)
    _send(drv, arp_request(GUEST_MAC, GUEST_IP, HOST_IP))
    assert _wait_status(drv, pci.DEVICE_NEEDS_RESET)
    # And after a reset it works again.
    drv.init()
    _post_rx(drv, 4)
    _send(drv, arp_request(GUEST_MAC, GUEST_IP, HOST_IP))
    _recv(drv, lambda f: f[12:14] == b"\x08\x06")
    _close(gm, bus, dev)


def scn_bridge():
    from pyroute2 import IPRoute
    _ns_setup()
    with IPRoute() as ipr:
        ipr.link("add", ifname="br0", kind="bridge")
        br = ipr.link_lookup(ifname="br0")[0]
    dev = net.Net("bridge:br0")
    tap = _link(dev.ifname)
    assert tap["master"] == br and tap["up"] and tap["addrs"] == []
    assert dev.mac[0] & 3 == 2 and dev.config[net.CFG_MAC:net.CFG_MAC + 6].tobytes() == dev.mac
    dev.close()
    for spec, words in (("bridge:nosuch", "does not exist"), ("bridge:lo", "is not a bridge")):
        try:
            net.Net(spec)
        except ValueError as e:
            assert words in str(e) and "\n" not in str(e) and str(e).startswith(f"--tunnet={spec}: "), e
        else:
            raise AssertionError(f"{spec} accepted")
    # A refused spec leaves no tap behind.
    with IPRoute() as ipr:
        names = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    assert names == {"lo", "br0"}, names


def scn_mtu():
    """An MTU offered (§5.1.4): the feature bit, the config field and the
    tap's MTU, so a datagram larger than 1500 bytes reaches the guest in
    one frame; a driver that declines VIRTIO_NET_F_MTU gets a 1500 tap back;
    a snapshot's MTU must be the device's."""
    from pyroute2 import IPRoute
    quiet = _ns_setup()
    gm, bus = _machine()
    dev = net.Net(f"{HOST_IP}:{GUEST_MAC_TEXT}", mtu=3000)
    assert dev.features >> net.VIRTIO_NET_F_MTU & 1
    assert int.from_bytes(dev.config[net.CFG_MTU:net.CFG_MTU + 2].tobytes(), "little") == 3000
    assert _link(dev.ifname)["mtu"] == 3000
    with IPRoute() as ipr:
        ipr.neigh("add", dst=GUEST_IP, lladdr=GUEST_MAC_TEXT, ifindex=_link(dev.ifname)["index"], state=0x80)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST_IP, 4321))
    drv = _bring_up(bus, gm, dev)
    assert drv.features >> net.VIRTIO_NET_F_MTU & 1 and _link(dev.ifname)["mtu"] == 3000
    for _ in range(4):
        drv.queues[net.RX].add(in_=[net.HDR_SIZE, 3100])
    drv.kick(net.RX)
    payload = os.urandom(2900)
    sock.sendto(payload, (GUEST_IP, 9999))
    _, frame = _recv(drv, lambda f: f[12:14] == b"\x08\x00" and f[23] == 17)
    assert len(frame) == 14 + 20 + 8 + 2900 and frame[42:] == payload      # one frame, not IP fragments
    state = dev.save_state()
    assert state["mtu"] == 3000
    # Declined: the tap goes back to what such a driver posts buffers for.
    drv.reset()
    drv.init(accept=lambda offered: offered & ~(1 << net.VIRTIO_NET_F_MTU))
    assert _link(dev.ifname)["mtu"] == net.DEFAULT_MTU
    drv.reset()
    sock.close()
    _close(gm, bus, dev)
    # No MTU offered: no bit, the tap untouched; a snapshot that had one is refused.
    gm, bus = _machine()
    plain = net.Net(HOST_IP)
    assert not plain.features >> net.VIRTIO_NET_F_MTU & 1 and _link(plain.ifname)["mtu"] == net.DEFAULT_MTU
    try:
        plain.load_state(state)
    except ValueError as e:
        assert "MTU 3000" in str(e) and "\n" not in str(e), e
    else:
        raise AssertionError("a snapshot's MTU was taken by a device offering none")
    plain.load_state(plain.save_state())
    _close(gm, bus, plain)
    try:
        net.Net("bridge:nosuch", mtu=9000)
    except ValueError as e:
        assert "bridge" in str(e)
    else:
        raise AssertionError("an MTU for a bridged tap")
    del quiet


def scn_tx_poll():
    """The transmit thread, done with a frame, keeps looking for the next one
    for tx_poll_us before it sleeps: a frame posted in that window, with no
    notification, is sent and counted as a poll hit."""
    gm, bus, dev, _ = _tap_machine()
    dev.tx_poll_us = 200_000.0                  # a window no test machine can miss
    drv = _bring_up(bus, gm, dev)
    _send(drv, arp_request(GUEST_MAC, GUEST_IP, HOST_IP))
    before = dev.counters()["tx"]["notifications"]
    drv.queues[net.TX].add(out=[HDR0, arp_request(GUEST_MAC, GUEST_IP, HOST_IP)])     # no kick
    head, length, _ = drv.wait_used(net.TX, timeout=5)
    c = dev.counters()["tx"]
    assert c["poll_hits"] >= 1 and c["notifications"] == before and c["requests"] == 2
    drv.reset()
    _close(gm, bus, dev)


def scn_close():
    import gc
    _ns_setup()
    before_fds = len(os.listdir("/proc/self/fd"))
    before_threads = threading.active_count()
    gm, bus = _machine()
    dev = net.Net(HOST_IP)
    drv = _bring_up(bus, gm, dev)
    _post_rx(drv, 4)
    assert threading.active_count() == before_threads + 2
    assert _link(dev.ifname) is not None
    drv.reset()                     # both threads joined, tap kept
    assert not dev.running and threading.active_count() == before_threads
    drv.init()
    assert threading.active_count() == before_threads + 2
    _close(gm, bus, dev)
    gc.collect()
    assert not dev.running and threading.active_count() == before_threads
    assert _link(dev.ifname) is None, "the tap outlived close()"
    assert len(os.listdir("/proc/self/fd")) == before_fds


if __name__ == "__main__":
    # Run as ``unshare --net python tests/test_devices_net.py <scenario>``.
    name = sys.argv[1]
    if not name.startswith("scn_"):
        sys.exit(f"unknown scenario {name}")
    globals()[name]()
    print(f"{name}: ok", flush=True)
