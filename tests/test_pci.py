"""PCI bus: conf1 ports, config-space permissions, BAR0 dispatch, the
PCI_CFG window, interrupts, notifications, reset, port and MMIO claims."""
import os
import select

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lguest_jit import pci, testing, vring
from lguest_jit.testing import RecordingDevice

STATUS, QSEL, QSIZE, QENABLE, NUMQ, GEN = 0x14, 0x16, 0x18, 0x1C, 0x12, 0x15


class Dev(RecordingDevice):
    device_type = 2
    name = "blk"
    queue_max_sizes = (128, 64, 32)
    features = 1 << vring.VIRTIO_RING_F_EVENT_IDX

    def __init__(self, config=bytes(range(12))):
        super().__init__(config)


@pytest.fixture
def bus(gm):
    lines = []
    b = pci.Bus(gm, log=lines.append)
    b.lines = lines
    b.dev = Dev()
    b.t = b.add_device(b.dev)
    yield b
    b.close()


def pending(fd):
    return bool(select.select([fd], [], [], 0)[0])


def bring_up(b, t, queues=(0,)):
    m = lambda off, size, v=None: b.mmio(t.bar0 + off, size, v is not None, v or 0)
    m(STATUS, 1, 0)
    for bit in (1, 2):
        m(STATUS, 1, m(STATUS, 1) | bit)
    m(0x08, 4, 1)
    m(0x0C, 4, 1)
    m(STATUS, 1, m(STATUS, 1) | pci.FEATURES_OK)
    assert m(STATUS, 1) & pci.FEATURES_OK
    for q in queues:
        m(QSEL, 2, q)
        m(QSIZE, 2, 16)
        m(0x20, 8, 0x10000 + 0x4000 * q)
        m(0x28, 8, 0x11000 + 0x4000 * q)
        m(0x30, 8, 0x12000 + 0x4000 * q)
        m(QENABLE, 2, 1)
    m(STATUS, 1, m(STATUS, 1) | pci.DRIVER_OK)
    return m


# --- conf1 -------------------------------------------------------------------

def test_absent_functions_read_all_ones(bus):
    for addr in (testing.conf1_address(5, 0),                       # empty slot
                 testing.conf1_address(1, 0, bus=1),                # other bus
                 testing.conf1_address(1, 0, function=3),           # other function
                 testing.conf1_address(1, 0) & 0x7FFFFFFF):         # enable bit clear
        bus.pio(0xCF8, 4, True, addr)
        assert bus.pio(0xCFC, 4, False, 0) == 0xFFFFFFFF
        assert bus.pio(0xCFE, 2, False, 0) == 0xFFFF
        assert bus.pio(0xCFF, 1, False, 0) == 0xFF
        assert bus.pio(0xCFC, 4, True, 0) == 0
    assert testing.conf1_read(bus, 1, 0, 4) == 0x10421AF4


def test_address_register_bytes(bus):
    bus.pio(0xCF8, 4, True, 0)
    bus.pio(0xCFB, 1, True, 0x80)
    bus.pio(0xCF9, 1, True, 0x08)                # slot 1
    assert bus.pio(0xCF8, 4, False, 0) == 0x80000800
    assert bus.pio(0xCFA, 2, False, 0) == 0x8000
    assert bus.pio(0xCFC, 2, False, 0) == 0x1AF4


def test_data_port_byte_lanes(bus):
    bus.pio(0xCF8, 4, True, testing.conf1_address(1, 0))
    assert bus.pio(0xCFD, 1, False, 0) == 0x1A
    assert bus.pio(0xCFE, 2, False, 0) == 0x1042
    assert bus.pio(0xCFF, 1, False, 0) == 0x10
    # 4 bytes at 0xCFE: two config bytes, then 0xD00-0xD01 nobody claims.
    assert bus.pio(0xCFE, 4, False, 0) == 0xFFFF1042
    # 4 bytes at 0xCFA straddle the address and data ports.
    assert bus.pio(0xCFA, 4, False, 0) == 0x1AF4 << 16 | 0x8000


def test_conf1_offset_beyond_64_dwords_reaches_whole_space(bus):
    # The register field is 6 bits: offset 0xFC is the last dword; the
    # unused end of config space reads 0 and ignores writes.
    testing.conf1_write(bus, 1, 0xFC, 4, 0xFFFFFFFF)
    assert testing.conf1_read(bus, 1, 0xFC, 4) == 0


def test_host_bridge(bus):
    assert testing.conf1_read(bus, 0, 0x08, 4) >> 8 == 0x060000
    assert testing.conf1_read(bus, 0, pci.PCI_STATUS, 2) & pci.PCI_STATUS_CAP_LIST == 0
    for off in range(0x10, 0x28, 4):
        testing.conf1_write(bus, 0, off, 4, 0xFFFFFFFF)
        assert testing.conf1_read(bus, 0, off, 4) == 0


# --- config-space permissions ---------------------------------------------------

def test_bar_sizing_and_relocation(bus):
    t = bus.t
    orig = testing.conf1_read(bus, t.slot, 0x10, 4)
    assert orig == t.bar0 == 0xE0000000
    testing.conf1_write(bus, t.slot, 0x10, 4, 0xFFFFFFFF)
    assert testing.conf1_read(bus, t.slot, 0x10, 4) == (~(pci.BAR0_SIZE - 1)) & 0xFFFFFFFF
    for off in (0x14, 0x18, 0x1C, 0x20, 0x24, 0x30):
        testing.conf1_write(bus, t.slot, off, 4, 0xFFFFFFFF)
        assert testing.conf1_read(bus, t.slot, off, 4) == 0
    testing.conf1_write(bus, t.slot, 0x10, 4, orig)
    assert bus.mmio(orig + NUMQ, 2, False, 0) == 3
    # the guest moves BAR0: dispatch and notify addresses follow
    testing.conf1_write(bus, t.slot, 0x10, 4, 0xF0002234)
    assert t.bar0 == 0xF0002000
    assert bus.mmio(orig + NUMQ, 2, False, 0) == 0xFFFF
    assert bus.mmio(0xF0002000 + NUMQ, 2, False, 0) == 3
    assert bus.ioeventfds()[0][0] == 0xF0002000 + pci.NOTIFY_OFF


def test_command_intx_disable_and_line(bus):
    t = bus.t
    testing.conf1_write(bus, t.slot, pci.PCI_COMMAND, 2, 0xFFFF)
    assert testing.conf1_read(bus, t.slot, pci.PCI_COMMAND, 2) == pci.COMMAND_WRITABLE
    t.raise_irq(1)
    assert not bus.irq_pending(t.irq_line)        # INTx disabled
    testing.conf1_write(bus, t.slot, pci.PCI_COMMAND, 2, 0)
    assert bus.irq_pending(t.irq_line)
    testing.conf1_write(bus, t.slot, pci.PCI_INTERRUPT_LINE, 1, 11)
    assert testing.conf1_read(bus, t.slot, pci.PCI_INTERRUPT_LINE, 1) == 11
    testing.conf1_write(bus, t.slot, pci.PCI_INTERRUPT_PIN, 1, 4)
    assert testing.conf1_read(bus, t.slot, pci.PCI_INTERRUPT_PIN, 1) == 1
    # a dword write over line/pin/min_gnt/max_lat changes only the line
    testing.conf1_write(bus, t.slot, 0x3C, 4, 0xFFFFFF07)
    assert testing.conf1_read(bus, t.slot, 0x3C, 4) == 0x00000107


def walk(bus, slot):
    caps = []
    pos = testing.conf1_read(bus, slot, pci.PCI_CAPABILITY_LIST, 1)
    while pos and len(caps) < 48:
        caps.append((pos, testing.conf1_read(bus, slot, pos, 1), testing.conf1_read(bus, slot, pos + 3, 1)))
        pos = testing.conf1_read(bus, slot, pos + 1, 1)
    return caps


def test_capability_chain_read_only_and_window_fields_writable(bus):
    t = bus.t
    caps = walk(bus, t.slot)
    assert [c[2] for c in caps] == [1, 2, 3, 4, 5]
    assert all(c[1] == pci.PCI_CAP_ID_VNDR and c[0] % 4 == 0 and c[0] >= 0x40 for c in caps)
    for pos, _, _ in caps:
        testing.conf1_write(bus, t.slot, pos, 4, 0)
        testing.conf1_write(bus, t.slot, pos + 8, 4, 0x12345678)
    assert walk(bus, t.slot) == caps
    w = t.cfg_window
    assert caps[-1][0] == w
    testing.conf1_write(bus, t.slot, w + 8, 4, 0x12345678)
    assert testing.conf1_read(bus, t.slot, w + 8, 4) == 0x12345678
    assert testing.conf1_read(bus, t.slot, caps[0][0] + 8, 4) == pci.COMMON_OFF


def test_pci_cfg_window_reads_and_writes_bar0(bus):
    t = bus.t
    w = t.cfg_window
    s = t.slot

    def window(offset, length):
        testing.conf1_write(bus, s, w + 4, 1, 0)
        testing.conf1_write(bus, s, w + 8, 4, offset)
        testing.conf1_write(bus, s, w + 12, 4, length)

    window(NUMQ, 2)
    assert testing.conf1_read(bus, s, w + 16, 4) == 3
    assert testing.conf1_read(bus, s, w + 16, 2) == 3
    window(STATUS, 1)
    testing.conf1_write(bus, s, w + 16, 4, 0)          # reset through the window
    testing.conf1_write(bus, s, w + 16, 4, 1)          # ACKNOWLEDGE
    assert t.status == 1 and bus.dev.resets == 1
    assert testing.conf1_read(bus, s, w + 16, 1) == 1
    window(pci.DEVCFG_OFF + 4, 4)
    assert testing.conf1_read(bus, s, w + 16, 4) == 0x07060504
    assert any("window read" in line for line in bus.lines)


# --- transport --------------------------------------------------------------------

def test_queue_select_save_restore_and_absent_queue(bus):
    m = lambda off, size, v=None: bus.mmio(bus.t.bar0 + off, size, v is not None, v or 0)
    m(STATUS, 1, 1)
    m(STATUS, 1, 3)
    m(0x08, 4, 1)
    m(0x0C, 4, 1)                                   # VERSION_1
    m(STATUS, 1, 11)
    assert m(STATUS, 1) == 11
    for q in range(3):
        m(QSEL, 2, q)
        assert m(QSIZE, 2) == bus.dev.queue_max_sizes[q]
        m(QSIZE, 2, 8 << q)
        m(0x20, 4, 0x100 * (q + 1))
        assert m(0x1E, 2) == q                      # queue_notify_off
    for q in (2, 0, 1):
        m(QSEL, 2, q)
        assert (m(QSIZE, 2), m(0x20, 4)) == (8 << q, 0x100 * (q + 1))
    m(QSEL, 2, 3)
    assert m(QSIZE, 2) == 0 and m(QENABLE, 2) == 0
    m(QSIZE, 2, 4)                                  # no such queue: nothing happens
    assert m(QSIZE, 2) == 0


def test_driver_ok_activates_with_enabled_queues(bus, gm):
    m = bring_up(bus, bus.t, queues=(0, 2))
    ctx = bus.dev.ctx
    assert ctx.mem is gm and ctx.isr is bus.t.isr and ctx.irq_fd == bus.t.irq_fd
    assert ctx.features == 1 << 32
    assert ctx.queues[1] is None
    q0, q2 = ctx.queues[0], ctx.queues[2]
    assert (q0[vring.Q_SIZE], q0[vring.Q_DESC], q0[vring.Q_AVAIL], q0[vring.Q_USED]) == (16, 0x10000, 0x11000, 0x12000)
    assert q2[vring.Q_DESC] == 0x18000
    assert m(STATUS, 1) == 0x0F


def test_notify_per_queue(bus):
    t = bus.t
    bring_up(bus, t, queues=(0, 1, 2))
    fds = bus.ioeventfds()
    assert fds == [(t.bar0 + pci.NOTIFY_OFF + 4 * q, 2, t.notify_fds[q]) for q in range(3)]
    bus.mmio(t.bar0 + pci.NOTIFY_OFF + 8, 2, True, 2)
    assert pending(t.notify_fds[2]) and not pending(t.notify_fds[0])
    assert os.eventfd_read(t.notify_fds[2]) == 1


def test_notify_single(gm):
    b = pci.Bus(gm, notify_mode="single")
    d = Dev(config=b"")
    t = b.add_device(d)
    try:
        assert b.ioeventfds() == []
        caps = walk(b, t.slot)
        assert [c[2] for c in caps] == [1, 2, 3, 5]          # no DEVICE_CFG without config
        notify = caps[1][0]
        assert testing.conf1_read(b, t.slot, notify + 16, 4) == 0
        bring_up(b, t, queues=(0, 1))
        b.mmio(t.bar0 + pci.NOTIFY_OFF, 2, True, 1)
        assert pending(t.notify_fds[1]) and not pending(t.notify_fds[0])
    finally:
        b.close()


def test_config_change_and_isr(bus):
    t = bus.t
    bring_up(bus, t)
    gen = bus.mmio(t.bar0 + GEN, 1, False, 0)
    bus.dev.config[0] = 99
    t.config_changed()
    assert bus.mmio(t.bar0 + GEN, 1, False, 0) == (gen + 1) & 0xFF
    assert bus.mmio(t.bar0 + pci.DEVCFG_OFF, 1, False, 0) == 99
    assert pending(t.irq_fd) and bus.irq_pending(t.irq_line)
    assert bus.mmio(t.bar0 + pci.ISR_OFF, 1, False, 0) == 2
    assert bus.mmio(t.bar0 + pci.ISR_OFF, 1, False, 0) == 0
    assert not bus.irq_pending(t.irq_line)


def test_reset_clears_state(bus):
    t = bus.t
    m = bring_up(bus, t, queues=(0, 1))
    bus.mmio(t.bar0 + pci.NOTIFY_OFF, 2, True, 0)
    t.isr[0] = 1
    m(STATUS, 1, 0)
    assert bus.dev.resets == 2 and m(STATUS, 1) == 0     # bring_up reset once too
    assert t.features == 0 and t.isr[0] == 0
    assert not pending(t.notify_fds[0])
    m(STATUS, 1, 1)
    m(STATUS, 1, 3)
    m(0x08, 4, 0)
    assert m(0x0C, 4) == 0
    for q in range(3):
        m(QSEL, 2, q)
        assert m(QENABLE, 2) == 0 and m(QSIZE, 2) == bus.dev.queue_max_sizes[q] and m(0x20, 4) == 0
    assert any("reset" in line for line in bus.lines)
    # and the device comes up again
    bring_up(bus, t)
    assert m(STATUS, 1) == 0x0F


def test_ports_and_unclaimed_space(bus):
    calls = []

    def uart(port, size, is_write, value):
        calls.append((port, size, is_write, value))
        return 0 if is_write else 0x60

    bus.add_ports(0x3F8, 8, uart)
    bus.add_ports(0x64, 1, lambda p, s, w, v: 0 if w else 1)
    assert bus.pio(0x3FD, 1, False, 0) == 0x60
    assert bus.pio(0x3F8, 1, True, 0x41) == 0
    assert calls == [(0x3FD, 1, False, 0), (0x3F8, 1, True, 0x41)]
    assert bus.pio(0x64, 1, False, 0) == 1
    # running off the end of a range: byte accesses, the rest all-ones
    assert bus.pio(0x64, 2, False, 0) == 0xFF01
    assert bus.pio(0x80, 1, False, 0) == 0xFF and bus.pio(0x80, 4, False, 0) == 0xFFFFFFFF
    assert bus.pio(0x80, 2, True, 5) == 0
    with pytest.raises(ValueError):
        bus.add_ports(0x3FF, 2, uart)
    assert bus.mmio(0xD0000000, 4, False, 0) == 0xFFFFFFFF
    assert bus.mmio(0xD0000000, 8, False, 0) == (1 << 64) - 1
    assert bus.mmio(0xD0000000, 4, True, 1) == 0


def test_irq_lines_and_close(gm):
    b = pci.Bus(gm)
    ts = [b.add_device(Dev()) for _ in range(10)]
    lines = [t.irq_line for t in ts]
    assert lines[:8] == [5, 9, 10, 11, 3, 6, 7, 15]
    assert not set(lines) & {0, 1, 2, 4, 8, 12, 13, 14}
    assert [t.slot for t in ts] == list(range(1, 11))
    assert len({t.bar0 for t in ts}) == 10
    assert b.interrupts() == [(t.irq_line, t.irq_fd) for t in ts]
    fd = ts[0].irq_fd
    b.close()
    assert all(t.device.resets == 1 for t in ts)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_log_none_formats_nothing(gm):
    b = pci.Bus(gm)                          # log=None
    t = b.add_device(Dev())
    try:
        bring_up(b, t)
        b.mmio(t.bar0 + 0x3C, 4, False, 0)   # a driver error, ignored silently
        assert t.status == 0x0F
    finally:
        b.close()


# --- property: random config-space writes ----------------------------------------

access = st.tuples(st.integers(0, 7), st.sampled_from([1, 2, 4]), st.booleans(),
                   st.integers(0, 0xFFFFFFFF), st.integers(0, 63), st.sampled_from([0, 1, 2]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(access, min_size=1, max_size=40))
def test_random_config_accesses_keep_read_only_bits(gm, ops):
    b = pci.Bus(gm)
    t = b.add_device(Dev())
    try:
        initial = b.cfg.copy()
        chain = {s: walk(b, s) for s in (0, 1)}
        for portoff, size, is_write, value, dword, slot in ops:
            b.pio(0xCF8, 4, True, testing.conf1_address(slot, dword * 4))
            port = 0xCFC + (portoff & 3)
            r = b.pio(port, size, is_write, value)
            assert 0 <= r < 1 << (8 * size)
            if slot == 2 and not is_write:
                assert r == (1 << 8 * size) - 1
        changed = (b.cfg ^ initial) & ~b.wmask
        assert not changed.any(), np.argwhere(changed)
        for s in (0, 1):
            assert [c[0] for c in walk(b, s)] == [c[0] for c in chain[s]]
            assert [c[2] for c in walk(b, s)] == [c[2] for c in chain[s]]
    finally:
        b.close()


def test_bar_at_names_the_bar_that_holds_an_address(bus):
    t = bus.t
    second = bus.add_device(Dev())
    assert bus.bar_at(t.bar0) == (t, 0, 0)
    assert bus.bar_at(t.bar0 + pci.NOTIFY_OFF + 2, 2) == (t, 0, pci.NOTIFY_OFF + 2)
    assert bus.bar_at(second.bar0 + pci.BAR0_SIZE - 4, 4) == (second, 0, pci.BAR0_SIZE - 4)
    assert bus.bar_at(t.bar0 + pci.BAR0_SIZE - 2, 4) is None          # runs into the next BAR
    assert bus.bar_at(second.bar0 + pci.BAR0_SIZE) is None            # past the last one
    assert bus.bar_at(0x1000) is None                                  # RAM
    # The guest moves BAR0: the query follows it.
    testing.conf1_write(bus, t.slot, 0x10, 4, 0xF0002000)
    assert bus.bar_at(0xF0002000 + 8) == (t, 0, 8)
    assert bus.bar_at(0xE0000000) is None
