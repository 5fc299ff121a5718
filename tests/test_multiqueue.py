"""Multiqueue block and network devices (issue 25): VIRTIO_BLK_F_MQ with one
thread, eventfd and MSI-X vector per request queue; VIRTIO_NET_F_MQ with
the control queue and one tap queue per pair; the queue-count knobs; and
snapshots of several queues.  Driven by the in-process driver
(``lguest_jit.testing``); the network scenarios run in a private network
namespace, as tests/test_devices_net.py's do."""
from __future__ import annotations

import os
import struct
import sys
import threading

import numpy as np
import pytest

from lguest_jit import pci, vring
from lguest_jit.devices import Block
from lguest_jit.devices import block as blk
from lguest_jit.devices.knobs import MAX_DEVICE_QUEUES, Knobs, parse_knobs, with_queue_counts
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.testing import VirtioPciDriver

DISK = 1 << 20


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, DISK, dtype=np.uint8).tobytes())
    return path


@pytest.fixture
def msix_machine():
    gm = GuestMemory(64 << 20)
    bus = pci.Bus(gm, msix=True)
    yield gm, bus
    bus.close()
    gm.close()


def _read(drv, qi, sector, n=4096):
    drv.queues[qi].add(out=[struct.pack("<IIQ", blk.T_IN, 0, sector)], in_=[n, 1])
    drv.kick(qi)
    _, length, data = drv.wait_used(qi, timeout=300)    # the first may wait for its kernel to compile
    assert data[-1][0] == blk.BLK_S_OK and length == n + 1
    return data[0]


def _write(drv, qi, sector, payload):
    drv.queues[qi].add(out=[struct.pack("<IIQ", blk.T_OUT, 0, sector), payload], in_=[1])
    drv.kick(qi)
    _, length, data = drv.wait_used(qi, timeout=300)
    assert data[-1][0] == blk.BLK_S_OK and length == 1


# ---------------------------------------------------------------------------
# The knobs

@pytest.mark.parametrize("name", ["blk-queues", "net-queues"])
@pytest.mark.parametrize("text, words", [("0", "from 1 to"), (str(MAX_DEVICE_QUEUES + 1), "from 1 to"),
                                         ("-1", "from 1 to"), ("2.0", "not a whole number"),
                                         ("", "not a whole number"), ("٢", "not a whole number")])
def test_bad_queue_counts_are_one_line(name, text, words):
    with pytest.raises(ValueError) as e:
        parse_knobs({name: text})
    assert words in str(e.value) and "\n" not in str(e.value) and f"--{name}" in str(e.value)


def test_queue_counts_default_to_the_vcpus_and_a_given_one_stays():
    assert Knobs().blk_queues is None and Knobs().net_queues is None        # the device's own: one
    k = with_queue_counts(Knobs(), 2)
    assert (k.blk_queues, k.net_queues) == (2, 2)
    k = with_queue_counts(parse_knobs({"blk-queues": "1", "net-queues": "3"}), 2)
    assert (k.blk_queues, k.net_queues) == (1, 3)
    assert with_queue_counts(Knobs(), 255).blk_queues == MAX_DEVICE_QUEUES


def test_the_machine_from_the_command_line_records_the_resolved_counts(tmp_path):
    from docopt import docopt

    from lguest_jit import main
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF" + bytes(60))
    args = docopt(main.__doc__, ["--cpus=1", "--net-queues=2", "64", str(kernel)])
    m = main._machine_from_args(args)
    assert (m.knobs.blk_queues, m.knobs.net_queues) == (1, 2)
    assert m.to_fields()["knobs"]["blk_queues"] == 1


# ---------------------------------------------------------------------------
# Block

def test_one_queue_is_todays_device_bit_for_bit(msix_machine, disk):
    gm, bus = msix_machine
    one, default = Block(str(disk), queues=1), Block(str(disk))
    try:
        assert one.features == default.features and not one.features >> blk.VIRTIO_BLK_F_MQ & 1
        assert bytes(one.config) == bytes(default.config) and one.config[blk.CFG_NUM_QUEUES:][:2].tolist() == [0, 0]
        assert one.queue_names == ("requests",) and one.queue_max_sizes == (blk.QUEUE_SIZE,)
    finally:
        one.close()
        default.close()


@pytest.mark.parametrize("queues", [2, 4])
def test_n_queues_each_serve_requests_on_their_own_thread_and_vector(msix_machine, disk, queues):
    gm, bus = msix_machine
    dev = Block(str(disk), queues=queues)
    drv = VirtioPciDriver.attach(bus, gm, dev, slot_bytes=1 << 16, msix=True)
    t = bus.devices[0]
    assert drv.features >> blk.VIRTIO_BLK_F_MQ & 1
    assert drv.config_read(blk.CFG_NUM_QUEUES, 2) == queues == drv.common_read(0x12, 2)
    assert t.msix_vectors == queues + 1 and len(set(t.notify_fds)) == queues
    assert sorted(dev.thread_ids) == sorted(f"{dev.name}:requests{i}" for i in range(queues))
    assert len(set(dev.thread_ids.values())) == queues
    ref = bytearray(disk.read_bytes())
    for qi in range(queues):
        payload = os.urandom(8192)
        _write(drv, qi, 64 * qi, payload)
        ref[64 * qi * 512:64 * qi * 512 + 8192] = payload
        assert _read(drv, qi, 64 * qi, 8192) == payload
    assert disk.read_bytes() == bytes(ref)
    c = dev.counters()
    for qi in range(queues):
        q = c[f"requests{qi}"]
        assert q["requests"] == 2 and q["bytes"] == 2 * 8192 and q["interrupts"] >= 1 and q["errors"] == 0
        assert t.queues[qi][vring.Q_VECTOR] == 1 + qi
    drv.reset()


def test_queues_run_in_parallel_and_every_request_lands(msix_machine, disk):
    gm, bus = msix_machine
    dev = Block(str(disk), queues=2)
    drv = VirtioPciDriver.attach(bus, gm, dev, slot_bytes=1 << 16, msix=True)
    ref = disk.read_bytes()
    _read(drv, 0, 0)
    _read(drv, 1, 0)             # both kernels loaded
    errors = []

    def reader(qi):
        try:
            for k in range(40):
                sector = (qi * 40 + k) * 8
                assert _read(drv, qi, sector) == ref[sector * 512:sector * 512 + 4096]
        except BaseException as exc:      # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=reader, args=(qi,)) for qi in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    c = dev.counters()
    assert c["requests0"]["requests"] == c["requests1"]["requests"] == 41
    drv.reset()


def test_fewer_queues_enabled_than_offered(msix_machine, disk):
    # Linux uses min(num_queues, CPUs) queues and leaves the rest disabled.
    gm, bus = msix_machine
    dev = Block(str(disk), queues=4)
    t = bus.add_device(dev)
    drv = VirtioPciDriver(bus, t.slot, gm, slot_bytes=1 << 16)
    drv.init(msix=True, enable=(0, 1))
    assert sorted(dev.thread_ids) == [f"{dev.name}:requests0", f"{dev.name}:requests1"]
    _read(drv, 1, 16)
    assert dev.counters()["requests2"]["requests"] == 0
    drv.reset()


def test_snapshot_with_two_queues_restores_both_and_they_serve_on(disk):
    gm = GuestMemory(64 << 20)
    bus = pci.Bus(gm, msix=True)
    dev = Block(str(disk), queues=2)
    drv = VirtioPciDriver.attach(bus, gm, dev, slot_bytes=1 << 16, msix=True)
    for qi in (0, 1):
        for k in range(qi + 1):
            _read(drv, qi, 8 * k)
    dev.pause()
    st = bus.save_state()
    assert [len(st["devices"][0]["queues"])] == [2]
    gm2 = GuestMemory(gm.size)
    gm2.mem[:] = gm.mem
    bus2 = pci.Bus(gm2, msix=True)
    dev2 = Block(str(disk), queues=2)
    bus2.add_device(dev2)
    one = Block(str(disk))
    bus3 = pci.Bus(gm2, msix=True)
    bus3.add_device(one)
    try:
        with pytest.raises(ValueError, match="snapshot has 2 queues, the device 1"):
            bus3.devices[0].load_state(st["devices"][0])
        bus2.load_state(st)
        assert dev2.running and len(dev2.thread_ids) == 2
        for qi in (0, 1):
            q1, q2 = bus.devices[0].queues[qi], bus2.devices[0].queues[qi]
            for f in (vring.Q_DESC, vring.Q_LAST_AVAIL, vring.Q_USED_IDX, vring.Q_N_CHAINS, vring.Q_VECTOR):
                assert q2[f] == q1[f], (qi, f)
        # The same driver, now on the restored bus, goes on on both queues.
        drv.bus, drv.gm = bus2, gm2
        for q in drv.queues:
            q.gm, q.mem = gm2, gm2.mem
        ref = disk.read_bytes()
        for qi in (0, 1):
            assert _read(drv, qi, 40 + qi) == ref[(40 + qi) * 512:(40 + qi) * 512 + 4096]
        c = dev2.counters()
        assert c["requests0"]["requests"] == 2 and c["requests1"]["requests"] == 3
    finally:
        bus3.close()
        bus2.close()
        bus.close()
        one.close()
        gm2.close()
        gm.close()


# ---------------------------------------------------------------------------
# Network: scenarios in a private network namespace (test_devices_net's rig)

def _in_netns(scenario: str) -> None:
    import subprocess

    from lguest_jit.testing import netns_problem
    reason = netns_problem()
    if reason:
        pytest.skip(reason)
    r = subprocess.run(["unshare", "--net", sys.executable, os.path.abspath(__file__), scenario],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{scenario} failed in its namespace:\n{r.stdout}\n{r.stderr}"
    assert f"{scenario}: ok" in r.stdout


def test_net_control_queue_commands_and_pairs_in_use():
    _in_netns("scn_ctrl_commands")


def test_net_driver_uses_fewer_pairs_than_offered():
    _in_netns("scn_fewer_pairs")


def test_net_snapshot_keeps_the_pairs_in_use():
    _in_netns("scn_net_snapshot")


def _net_rig(pairs, **init_kw):
    import test_devices_net as tn
    from lguest_jit.devices import net
    tn._ns_setup()
    gm = GuestMemory(64 << 20)
    bus = pci.Bus(gm, msix=True)
    dev = net.Net(f"{tn.HOST_IP}:{tn.GUEST_MAC_TEXT}", pairs=pairs)
    drv = VirtioPciDriver.attach(bus, gm, dev, slot_bytes=1 << 14, msix=True, **init_kw)
    return gm, bus, dev, drv


def _ctrl(drv, qi, cls, cmd, data=b"", split=False):
    """One control command; its ack byte."""
    out = [bytes([cls]), bytes([cmd]) + data] if split else [bytes([cls, cmd]) + data]
    drv.queues[qi].add(out=out, in_=[1])
    drv.kick(qi)
    _, length, got = drv.wait_used(qi, timeout=300)
    assert length == 1
    return got[-1][0]


def _pairs_set(n):
    from lguest_jit.devices import net
    return net.VIRTIO_NET_CTRL_MQ, net.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", n)


def _udp_flows(drv, rx_queues, count, sport0=5000):
    """``count`` UDP datagrams from the host, each its own flow (source
    port); returns how many arrived on each rx queue."""
    import socket
    import time

    import test_devices_net as tn
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    socks = []
    for k in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((tn.HOST_IP, sport0 + k))
        s.sendto(b"flow %d" % k, (tn.GUEST_IP, 9999))
        socks.append(s)
    sock.close()
    seen = {qi: 0 for qi in rx_queues}
    deadline = time.monotonic() + 20
    while sum(seen.values()) < count and time.monotonic() < deadline:
        for qi in rx_queues:
            got = drv.queues[qi].get_used()
            if got is None:
                continue
            _, length, data = got
            frame = b"".join(data)[:length][12:]
            if frame[12:14] == b"\x08\x00" and frame[23] == 17 and frame[36:38] == b"\x27\x0f":
                seen[qi] += 1
            drv.queues[qi].add(in_=[12, 2036])
            drv.kick(qi)
        time.sleep(0.001)
    for s in socks:
        s.close()
    return seen


def _post(drv, qi, n=64):
    for _ in range(n):
        drv.queues[qi].add(in_=[12, 2036])
    drv.kick(qi)


def _neigh(dev):
    from pyroute2 import IPRoute

    import test_devices_net as tn
    with IPRoute() as ipr:
        ipr.neigh("add", dst=tn.GUEST_IP, lladdr=tn.GUEST_MAC_TEXT, ifindex=tn._link(dev.ifname)["index"], state=0x80)


def scn_ctrl_commands():
    import test_devices_net as tn
    from lguest_jit.devices import net
    gm, bus, dev, drv = _net_rig(2)
    _neigh(dev)
    names = ("rx0", "tx0", "rx1", "tx1", "ctrl")
    assert dev.queue_names == names and drv.common_read(0x12, 2) == 5
    for bit in (net.VIRTIO_NET_F_MQ, net.VIRTIO_NET_F_CTRL_VQ):
        assert drv.features >> bit & 1
    assert drv.config_read(net.CFG_MAX_VQ_PAIRS, 2) == 2
    assert bus.devices[0].msix_vectors == 6
    assert sorted(dev.thread_ids) == sorted(f"{dev.name}:{n}" for n in names)
    # One pair in use until the driver sets more (§5.1.6.5.5): every flow on rx0.
    _post(drv, 0)
    _post(drv, 2)
    assert _udp_flows(drv, (0, 2), 16) == {0: 16, 2: 0}
    ERR, OK = net.VIRTIO_NET_ERR, net.VIRTIO_NET_OK
    # Every class the device does not offer, every MQ command but PAIRS_SET,
    # bad lengths and bad counts: VIRTIO_NET_ERR, each counted by its reason.
    bad = [((0, 0, b"\x01"), "err_class"),          # RX PROMISC
           ((0, 1, b"\x01"), "err_class"),          # RX ALLMULTI
           ((1, 0, bytes(12)), "err_class"),        # MAC TABLE_SET
           ((1, 1, tn.GUEST_MAC), "err_class"),     # MAC ADDR_SET
           ((2, 0, b"\x05\x00"), "err_class"),      # VLAN ADD
           ((3, 0, b""), "err_class"),              # ANNOUNCE ACK
           ((5, 0, bytes(8)), "err_class"),         # GUEST_OFFLOADS SET
           ((200, 0, b""), "err_class"),
           ((4, 1, bytes(16)), "err_command"),      # MQ RSS_CONFIG (no VIRTIO_NET_F_RSS)
           ((4, 2, bytes(16)), "err_command"),      # MQ HASH_CONFIG
           ((4, 9, b"\x02\x00"), "err_command"),
           ((4, 0, b"\x02"), "err_length"),
           ((4, 0, b"\x02\x00\x00"), "err_length"),
           ((4, 0, b""), "err_length"),
           ((4, 0, b"\x00\x00"), "err_pairs"),
           ((4, 0, b"\x03\x00"), "err_pairs"),
           ((4, 0, b"\x00\x80"), "err_pairs")]
    for (cls, cmd, data), _ in bad:
        assert _ctrl(drv, 4, cls, cmd, data) == ERR, (cls, cmd, data)
    c = dev.counters()["ctrl"]
    for reason in ("err_class", "err_command", "err_length", "err_pairs"):
        assert c[f"commands_{reason}"] == sum(r == reason for _, r in bad), reason
    assert c["commands_ok"] == 0 and c["pairs_in_use"] == 1 and c["requests"] == len(bad) and c["errors"] == 0
    # Two pairs, the header split over two descriptors as a driver may.
    assert _ctrl(drv, 4, *_pairs_set(2), split=True) == OK
    assert dev.counters()["ctrl"]["pairs_in_use"] == 2 and dev._attached == [True, True]
    seen = _udp_flows(drv, (0, 2), 48, sport0=6000)
    assert sum(seen.values()) == 48 and seen[0] and seen[2], seen      # the tap spreads flows over both
    # Transmit on the second pair: an ARP request, answered on an rx queue.
    drv.queues[3].add(out=[tn.HDR0, tn.arp_request(tn.GUEST_MAC, tn.GUEST_IP, tn.HOST_IP)])
    drv.kick(3)
    assert drv.wait_used(3, timeout=60)[1] == 0
    assert dev.counters()["tx1"]["requests"] == 1
    # Back to one pair: pair 1 parks, its tap queue is detached, flows go to rx0.
    assert _ctrl(drv, 4, *_pairs_set(1)) == OK
    assert dev._attached == [True, False] and dev.counters()["ctrl"]["pairs_in_use"] == 1
    assert all(f"{dev.name}:{n}" in dev.thread_ids for n in names)          # parked, not ended
    _udp_flows(drv, (0, 2), 0)                   # drain the ARP reply and anything in flight
    assert _udp_flows(drv, (0, 2), 16, sport0=7000) == {0: 16, 2: 0}
    assert _ctrl(drv, 4, *_pairs_set(2)) == OK and _ctrl(drv, 4, *_pairs_set(2)) == OK   # same count again: fine
    assert dev.counters()["ctrl"]["commands_ok"] == 4
    # A reset puts the device back to one pair; every thread ends.
    drv.reset()
    assert not dev.running and dev.counters()["ctrl"]["pairs_in_use"] == 1 and dev._attached == [True, False]
    bus.close()
    dev.close()
    gm.close()


def scn_fewer_pairs():
    import time

    from lguest_jit.devices import net
    # Four pairs offered, the driver sets two: pairs 2 and 3 are neither fed nor served.
    gm, bus, dev, drv = _net_rig(4)
    _neigh(dev)
    ctrl = 8
    assert _ctrl(drv, ctrl, *_pairs_set(2)) == net.VIRTIO_NET_OK
    assert dev._attached == [True, True, False, False]
    rx = (0, 2, 4, 6)
    for qi in rx:
        _post(drv, qi)
    seen = _udp_flows(drv, rx, 48)
    assert seen[4] == seen[6] == 0 and seen[0] and seen[2] and sum(seen.values()) == 48, seen
    drv.queues[7].add(out=[bytes(12), bytes(60)])        # tx on pair 3: not served while it is parked
    drv.kick(7)
    time.sleep(0.3)
    assert drv.queues[7].get_used() is None and dev.counters()["tx3"]["requests"] == 0
    assert _ctrl(drv, ctrl, *_pairs_set(4)) == net.VIRTIO_NET_OK       # now it is
    assert drv.wait_used(7, timeout=60)[1] == 0 and dev.counters()["tx3"]["requests"] == 1
    drv.reset()

    # A driver without VIRTIO_NET_F_MQ but with the control queue: one
    # pair, the control queue is queue 2 (§5.1.2), the MQ class refused.
    no_mq = ~(1 << net.VIRTIO_NET_F_MQ)
    drv.init(accept=lambda offered: offered & no_mq, msix=True)
    assert not drv.features >> net.VIRTIO_NET_F_MQ & 1
    assert _ctrl(drv, 2, *_pairs_set(2)) == net.VIRTIO_NET_ERR
    assert dev._attached == [True, False, False, False] and dev.mq[net.MQ_ACTIVE] == 1
    _post(drv, 0)
    assert _udp_flows(drv, (0,), 8, sport0=8000) == {0: 8}
    drv.reset()

    # Neither: the plain two-queue device on the first pair.
    plain = ~(1 << net.VIRTIO_NET_F_MQ | 1 << net.VIRTIO_NET_F_CTRL_VQ)
    drv.init(accept=lambda offered: offered & plain, msix=True)
    _post(drv, 0)
    assert _udp_flows(drv, (0,), 8, sport0=8100) == {0: 8}
    drv.reset()
    bus.close()
    dev.close()
    gm.close()


def scn_net_snapshot():
    import test_devices_net as tn
    from lguest_jit.devices import net
    gm, bus, dev, drv = _net_rig(2)
    assert _ctrl(drv, 4, *_pairs_set(2)) == net.VIRTIO_NET_OK
    dev.pause()
    st = bus.save_state()
    assert st["devices"][0]["device"] == {"pairs_in_use": 2, "commands": {"ok": 1, "err_class": 0, "err_command": 0,
                                                                          "err_length": 0, "err_pairs": 0},
                                             "mtu": 0}
    gm2 = GuestMemory(gm.size)
    gm2.mem[:] = gm.mem
    bus.close()                 # as the launcher that took it exits: its tap goes, the name is free again
    dev.close()
    gm.close()
    bus2 = pci.Bus(gm2, msix=True)
    dev2 = net.Net(f"{tn.HOST_IP}:{tn.GUEST_MAC_TEXT}", pairs=2)       # restore: a new tap
    bus2.add_device(dev2)
    assert dev2._attached == [True, False]
    with pytest.raises(ValueError, match="snapshot uses 3 queue pairs, the device has 2"):
        dev2.load_state({**st["devices"][0]["device"], "pairs_in_use": 3})
    bus2.load_state(st)
    assert dev2.mq[net.MQ_ACTIVE] == 2 and dev2._attached == [True, True] and dev2.running
    assert dev2.counters()["ctrl"]["commands_ok"] == 1          # the counters carry on
    drv.bus, drv.gm = bus2, gm2
    for q in drv.queues:
        q.gm, q.mem = gm2, gm2.mem
    _neigh(dev2)
    _post(drv, 0)
    _post(drv, 2)
    seen = _udp_flows(drv, (0, 2), 32)
    assert seen[0] and seen[2] and sum(seen.values()) == 32, seen
    assert _ctrl(drv, 4, *_pairs_set(1)) == net.VIRTIO_NET_OK     # the control queue goes on too
    assert dev2.counters()["ctrl"]["commands_ok"] == 2 and dev2._attached == [True, False]
    bus2.close()
    dev2.close()
    gm2.close()


if __name__ == "__main__":
    # Run as ``unshare --net python tests/test_multiqueue.py <scenario>``.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    name = sys.argv[1]
    if not name.startswith("scn_"):
        sys.exit(f"unknown scenario {name}")
    globals()[name]()
    print(f"{name}: ok", flush=True)
