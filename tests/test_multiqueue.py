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
