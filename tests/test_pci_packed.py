"""Packed virtqueues through the virtio-pci transport (virtio 1.1 §2.7,
§4.1.4.3): offered with --packed=on, the layout decided by the features the
driver accepted, any queue size, packed ring rules under both policies,
and snapshots of packed queues checked against the negotiated layout."""
import struct

import numpy as np
import pytest

from lguest_jit import pci, vring
from lguest_jit.devices import Block, Rng
from lguest_jit.devices.knobs import Knobs
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.testing import VirtioPciDriver

PACKED = 1 << vring.VIRTIO_F_RING_PACKED


def attach(bus, gm, dev, knobs=Knobs(packed=True), **init_kw):
    """Put ``dev`` on the bus with ``knobs`` and bring it up; (driver, transport)."""
    dev.apply_knobs(knobs)
    drv = VirtioPciDriver.attach(bus, gm, dev, **init_kw)
    return drv, next(t for t in bus.devices if t.device is dev)


def test_a_driver_that_declines_packed_keeps_split_rings(machine):
    gm, bus = machine
    drv, t = attach(bus, gm, Rng(), accept=lambda f: f & ~PACKED)
    assert not drv.queues[0].packed and vring.layout_name(t.queues[0]) == "split"
    drv.queues[0].add(in_=[16])
    drv.kick(0)
    assert drv.wait_used(0, timeout=300)[1] == 16


@pytest.mark.parametrize("packed, size", [(True, 48), (True, 3), (False, 32)])
def test_queue_size_need_not_be_a_power_of_two_for_packed_rings(machine, packed, size):
    gm, bus = machine
    drv, t = attach(bus, gm, Rng(), accept=lambda f: f if packed else f & ~PACKED, queue_sizes=[size])
    assert t.queues[0][vring.Q_SIZE] == size and vring.layout_name(t.queues[0]) == ("packed" if packed else "split")
    q = drv.queues[0]
    for k in range(2 * size + 1):                     # more than two laps of the ring
        q.add(in_=[k % 40 + 1])
        drv.kick(0)
        assert drv.wait_used(0, timeout=300)[1] == k % 40 + 1
    drv.reset()


def test_split_queue_size_must_still_be_a_power_of_two(machine):
    gm, bus = machine
    drv, t = attach(bus, gm, Rng(), accept=lambda f: f & ~PACKED)
    drv.reset()
    for bit in (pci.ACKNOWLEDGE, pci.DRIVER):
        drv.set_status(bit)
    drv.common_write(0x08, 4, 1)
    drv.common_write(0x0C, 4, 1)                      # VERSION_1 only: split rings
    drv.set_status(pci.FEATURES_OK)
    drv.common_write(0x16, 2, 0)
    drv.common_write(0x18, 2, 48)                     # E_QUEUE_SIZE_VALUE: dropped
    assert drv.common_read(0x18, 2) == 64


def _bad_list(drv):
    """A list whose second descriptor is not marked available (§2.7.6)."""
    q = drv.queues[0]
    q.write_desc(1, q.data_base, 8, vring.VRING_DESC_F_WRITE | q.lap_bits(0), 0)
    q.write_desc(0, q.data_base, 8, vring.VRING_DESC_F_WRITE | vring.VRING_DESC_F_NEXT | q.lap_bits(1), 0)


def test_packed_rule_hardware_like_policy_needs_reset(machine):
    gm, bus = machine
    drv, _ = attach(bus, gm, Rng())
    _bad_list(drv)
    drv.bus.mmio(drv.queues[0].notify_addr, 2, True, 0)
    assert drv.wait_status(pci.DEVICE_NEEDS_RESET, timeout=300)
    drv.init()                                         # and a reset brings it back
    drv.queues[0].add(in_=[4])
    drv.kick(0)
    assert drv.wait_used(0, timeout=300)[1] == 4


def test_packed_rule_strict_policy_stops_with_the_rule():
    gm = GuestMemory(32 << 20)
    calls = []
    bus = pci.Bus(gm, strict=True, fatal=calls.append)
    try:
        drv, _ = attach(bus, gm, Rng())
        _bad_list(drv)
        bus.mmio(drv.queues[0].notify_addr, 2, True, 0)
        import time
        deadline = time.monotonic() + 300
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == 1
        assert "not marked available" in calls[0] and "§2.7" in calls[0]
    finally:
        bus.close()
        gm.close()


def test_driver_event_rule_reaches_the_policy(machine):
    gm, bus = machine
    drv, _ = attach(bus, gm, Rng(), knobs=Knobs(packed=True, event_idx=False))
    q = drv.queues[0]
    q.set_driver_event_flags(vring.RING_EVENT_FLAGS_DESC)   # DESC without EVENT_IDX negotiated (§2.7.10)
    q.add(in_=[4])
    drv.kick(0)
    assert drv.wait_status(pci.DEVICE_NEEDS_RESET, timeout=300)
    assert q.has_used()                                # answered with an interrupt first, never a lost one


def test_packed_queues_snapshot_and_restore(machine, tmp_path):
    gm, bus = machine
    path = tmp_path / "disk"
    path.write_bytes(bytes(1 << 20))
    dev = Block(str(path))
    drv, t = attach(bus, gm, dev, slot_bytes=8192)
    q = drv.queues[0]
    for k in range(150):                               # past a lap of the 128-slot ring
        q.add(out=[struct.pack("<IIQ", 0, 0, k % 64)], in_=[512, 1])
        drv.kick(0)
        drv.wait_used(0, timeout=300)
    dev.pause()
    st = t.save_state()
    saved_q = st["queues"][0]["ring"]
    assert saved_q["layout"] == vring.LAYOUT_PACKED and saved_q["used_wrap"] == 0
    t.load_state(st)                                   # the same state loads back
    assert (t.queues[0][vring.Q_LAST_AVAIL], t.queues[0][vring.Q_AVAIL_WRAP]) == (q.next_avail, q.avail_wrap)

    def with_ring(**fields):
        return dict(st, queues=[dict(st["queues"][0], ring=dict(saved_q, **fields))])
    # A well-formed split ring where the driver negotiated packed ones.
    with pytest.raises(ValueError, match="layout"):
        t.load_state(with_ring(layout=vring.LAYOUT_SPLIT, avail_wrap=1, used_wrap=1, held_ids=[], pending_slots=0))
    with pytest.raises(ValueError, match="avail_wrap"):
        t.load_state(with_ring(avail_wrap=7))
    with pytest.raises(ValueError, match="snapshot queue 0"):
        t.load_state(with_ring(last_avail=128))        # a slot outside the 128-slot ring
    t.load_state(st)
    dev.resume()
    q.add(out=[struct.pack("<IIQ", 0, 0, 1)], in_=[512, 1])
    drv.kick(0)
    assert drv.wait_used(0, timeout=300)[1] == 513
    drv.reset()
    dev.close()


@pytest.mark.parametrize("packed", [True, False])
def test_stats_say_each_queues_layout(machine, packed):
    gm, bus = machine
    dev = Rng()
    attach(bus, gm, dev, knobs=Knobs(packed=packed))
    assert dev.counters()["requests"]["layout"] == ("packed" if packed else "split")
