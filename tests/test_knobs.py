"""Device knobs (issue 16): each option parsed and refused as the CLI
needs, and each value reaching the device as a Linux driver would see it
(offered features, queue sizes, block config), through the PCI harness."""
import os

import pytest

from lguest_jit import vring
from lguest_jit.devices import Block, Rng
from lguest_jit.devices import block as blk
from lguest_jit.devices.knobs import KNOBS, QUEUE_SIZE_LIMIT, Knobs, parse_knobs, parse_sweep
from lguest_jit.testing import VirtioPciDriver

F_EVENT_IDX = 1 << vring.VIRTIO_RING_F_EVENT_IDX
F_INDIRECT = 1 << vring.VIRTIO_RING_F_INDIRECT_DESC


def test_the_limit_is_vrings_and_the_defaults_are_the_devices():
    assert QUEUE_SIZE_LIMIT == vring.MAX_QUEUE_SIZE
    # Nothing set: every device keeps what its class declares.
    assert parse_knobs({}) == Knobs() and Knobs().queue_size is None and Knobs().blk_poll_us is None
    assert Block.queue_max_sizes == (blk.QUEUE_SIZE,) and Rng.queue_max_sizes == (64,)
    assert set(KNOBS) == {"queue-size", "blk-poll-us", "event-idx", "indirect", "seg-max", "packed", "erms",
                          "blk-queues", "net-queues", "net-mtu"}


def test_the_help_is_the_knob_tables():
    from lguest_jit import main
    for name, (_, _, meta, text) in KNOBS.items():
        assert f"--{name}={meta}" in main.__doc__
        assert " ".join(main.__doc__.split()).count(text) == 1, name


@pytest.mark.parametrize("values, words", [
    ({"queue-size": "100"}, "power of two"),
    ({"queue-size": "2"}, "power of two"),
    ({"queue-size": "65536"}, "power of two"),
    ({"queue-size": "lots"}, "not a whole number"),
    ({"blk-poll-us": "-1"}, "between 0"),
    ({"blk-poll-us": "nan"}, "not a number"),
    ({"event-idx": "yes"}, "on or off"),
    ({"indirect": "1"}, "on or off"),
    ({"packed": "yes"}, "on or off"),
    ({"seg-max": "0"}, "at least 1"),
    ({"seg-max": "20", "queue-size": "16"}, "queue size (16) - 2"),
    ({"net-mtu": "67"}, "from 68 to 65535"),
    ({"net-mtu": "65536"}, "from 68 to 65535"),
    ({"net-mtu": "1e4"}, "not a whole number"),
    ({"net-mtu": "+9000"}, "auto, off or a whole number"),
    ({"net-mtu": "-1"}, "from 68 to 65535"),
])
def test_bad_knob_values_are_one_line(values, words):
    with pytest.raises(ValueError) as e:
        parse_knobs(values)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_net_mtu_auto_is_made_concrete_per_host():
    """A machine records the MTU its devices were built with, so a snapshot
    restored on another host offers the guest the same one."""
    from lguest_jit.devices.knobs import SOFTWARE_KVM_MTU, with_net_mtu
    assert parse_knobs({"net-mtu": "09000"}).net_mtu == "9000"
    auto = Knobs()
    assert auto.net_mtu == "auto"
    assert with_net_mtu(auto, software_kvm=True, bridged=False).net_mtu == str(SOFTWARE_KVM_MTU)
    assert with_net_mtu(auto, software_kvm=False, bridged=False).net_mtu == "off"
    assert with_net_mtu(auto, software_kvm=True, bridged=True).net_mtu == "off"
    chosen = parse_knobs({"net-mtu": "1500"})
    assert with_net_mtu(chosen, software_kvm=True, bridged=False) == chosen


def test_seg_max_beyond_the_block_devices_own_queue_is_one_line(tmp_path):
    # The block device's own queue size (128) is the device's: it checks.
    path = tmp_path / "disk"
    path.write_bytes(bytes(1 << 20))
    dev = Block(str(path))
    try:
        with pytest.raises(ValueError) as e:
            dev.apply_knobs(parse_knobs({"seg-max": "127"}))
        assert "queue size (128) - 2" in str(e.value) and "\n" not in str(e.value)
    finally:
        dev.close()


def test_sweep_spec():
    assert parse_sweep("queue-size=16,256") == ("queue-size", ["16", "256"])
    assert parse_sweep("event-idx=on,off") == ("event-idx", ["on", "off"])
    for bad, words in (("queue-size", "NAME=V1"), ("speed=1,2", "unknown knob"), ("queue-size=16,,32", "empty"),
                       ("queue-size=16,16", "twice"), ("queue-size=16,17", "power of two")):
        with pytest.raises(ValueError, match=words):
            parse_sweep(bad)


def _offered_and_sizes(machine, dev, knobs):
    gm, bus = machine
    dev.apply_knobs(knobs)
    offered = []
    t = bus.add_device(dev)
    drv = VirtioPciDriver(bus, t.slot, gm, queue_span=0x800000)
    drv.init(accept=lambda f: offered.append(f) or f)
    sizes = []
    for i in range(drv.common_read(0x12, 2)):
        drv.common_write(0x16, 2, i)
        sizes.append(drv.common_read(0x18, 2))
    return offered[0], sizes, drv, t


@pytest.mark.parametrize("event_idx, indirect", [(True, True), (False, True), (True, False), (False, False)])
def test_ring_features_offered_follow_the_knobs(machine, event_idx, indirect):
    offered, _, drv, _ = _offered_and_sizes(machine, Rng(), Knobs(event_idx=event_idx, indirect=indirect))
    assert bool(offered & F_EVENT_IDX) == event_idx
    assert bool(offered & F_INDIRECT) == indirect
    # The driver harness, accepting everything, ends up with exactly that.
    assert bool(drv.features & F_EVENT_IDX) == event_idx
    drv.reset()


@pytest.mark.parametrize("packed", [False, True])
def test_packed_knob_offers_packed_rings_and_the_queue_takes_them(machine, packed):
    offered, _, drv, t = _offered_and_sizes(machine, Rng(), Knobs(packed=packed))
    assert bool(offered >> vring.VIRTIO_F_RING_PACKED & 1) == packed
    q = drv.queues[0]
    assert q.packed == packed and vring.layout_name(t.queues[0]) == ("packed" if packed else "split")
    for n in (32, 7, 300):                          # the device thread serves it like any queue
        q.add(in_=[n])
        drv.kick(0)
        assert drv.wait_used(0, timeout=300)[1] == n
    drv.reset()


def test_queue_size_is_what_the_driver_reads(machine):
    _, sizes, drv, t = _offered_and_sizes(machine, Rng(), Knobs(queue_size=512))
    assert sizes == [512]
    # The driver took the whole queue, and the device works with it.
    q = drv.queues[0]
    assert q.size == 512 and t.queues[0][vring.Q_SIZE] == 512
    q.add(in_=[32])
    drv.kick(0)
    assert drv.wait_used(0, timeout=300)[1] == 32
    drv.reset()


def test_block_seg_max_and_poll_window_reach_the_device(machine, tmp_path):
    path = tmp_path / "disk"
    path.write_bytes(bytes(1 << 20))
    dev = Block(str(path))
    _, sizes, drv, t = _offered_and_sizes(machine, dev, Knobs(queue_size=64, seg_max=10, blk_poll_us=0))
    assert sizes == [64]
    assert drv.config_read(blk.CFG_SEG_MAX, 4) == 10
    assert t.queues[0][vring.Q_POLL_SPINS] == 0          # 0 turns busy-polling off
    drv.reset()
    dev.close()
    dev = Block(str(path))
    gm, bus = machine
    _, _, drv, t = _offered_and_sizes((gm, bus), dev, Knobs(blk_poll_us=20))
    assert drv.config_read(blk.CFG_SEG_MAX, 4) == blk.QUEUE_SIZE - 2      # the default
    assert t.queues[0][vring.Q_POLL_SPINS] == vring.spins_for(20) > 0
    drv.reset()
    dev.close()
    os.unlink(path)
