"""Faults found by the adversarial run (issue 13), one test each, and the
property that BAR decoding is a pure function of the current BAR values."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lguest_jit import pci, testing
from lguest_jit.hw.memory import GuestMemory

from naive import bar_decode

DFSEL, GFSEL, GF, STATUS = 0x00, 0x08, 0x0C, 0x14


class Dev(pci.VirtioDevice):
    device_type = 4
    queue_max_sizes = (16, 16)

    def __init__(self, name):
        self.name = name
        self.activated = 0

    def activate(self, ctx):
        self.activated += 1


def make_bus(gm, n=3):
    bus = pci.Bus(gm)
    ts = [bus.add_device(Dev(f"d{i}")) for i in range(n)]
    for t in ts:
        # A per-device tag in a side-effect-free register: a read at a page
        # then says which device decodes it.
        bus.mmio(t.bar0 + DFSEL, 4, True, 0x100 + t.slot)
    return bus, ts


def decoder_at(bus, page):
    v = bus.mmio(page << pci.BAR0_SHIFT, 4, False, 0)
    return None if v == 0xFFFFFFFF else v - 0x100


def set_bar(bus, t, value, size=4):
    testing.conf1_write(bus, t.slot, pci.PCI_BASE_ADDRESS_0, size, value)


@pytest.fixture
def gm():
    m = GuestMemory(4 << 20)
    yield m
    m.close()


# --- fault 1: a brief BAR0 overlap left a device undecodable ---------------

def test_overlap_then_move_back_restores_both(gm):
    bus, (a, b, _) = make_bus(gm)
    a0, b0 = a.bar0, b.bar0
    set_bar(bus, b, a0)                   # B onto A's page: the lower slot (A) wins
    assert decoder_at(bus, a0 >> pci.BAR0_SHIFT) == a.slot
    assert decoder_at(bus, b0 >> pci.BAR0_SHIFT) is None
    set_bar(bus, b, b0)                   # and back
    assert decoder_at(bus, a0 >> pci.BAR0_SHIFT) == a.slot
    assert decoder_at(bus, b0 >> pci.BAR0_SHIFT) == b.slot
    set_bar(bus, a, b0)                   # A onto B's page, then back
    assert decoder_at(bus, b0 >> pci.BAR0_SHIFT) == a.slot
    set_bar(bus, a, a0)
    assert decoder_at(bus, a0 >> pci.BAR0_SHIFT) == a.slot
    assert decoder_at(bus, b0 >> pci.BAR0_SHIFT) == b.slot   # before the fix: B read all-ones here
    bus.close()


def test_higher_slot_moved_onto_lower_is_hidden_not_winning(gm):
    bus, (a, b, c) = make_bus(gm)
    set_bar(bus, c, b.bar0)
    set_bar(bus, a, b.bar0)
    assert decoder_at(bus, b.bar0 >> pci.BAR0_SHIFT) == a.slot     # lowest slot of the three
    set_bar(bus, a, 0xE0100000)
    assert decoder_at(bus, b.bar0 >> pci.BAR0_SHIFT) == b.slot
    bus.close()


def test_unchanged_bar_write_keeps_decode_right(gm):
    bus, (a, b, _) = make_bus(gm)
    b0 = b.bar0
    set_bar(bus, a, b0)
    set_bar(bus, b, b0)                   # same value written again
    assert decoder_at(bus, b0 >> pci.BAR0_SHIFT) == a.slot
    set_bar(bus, a, 0xE0200000)
    set_bar(bus, b, b0)
    assert decoder_at(bus, b0 >> pci.BAR0_SHIFT) == b.slot
    bus.close()


def test_ioeventfds_list_only_decoding_devices(gm):
    bus, (a, b, c) = make_bus(gm)
    calls = []
    bus.add_decode_listener(lambda: calls.append(bus.ioeventfds()))
    set_bar(bus, b, a.bar0)
    assert calls, "the listener hears about the decode change"
    fds = {fd for _, _, fd in calls[-1]}
    assert not fds & set(b.notify_fds)           # B is hidden: its notify is nowhere
    assert set(a.notify_fds) <= fds and set(c.notify_fds) <= fds
    n = len(calls)
    set_bar(bus, c, c.bar0)                      # no decode change: no call
    assert len(calls) == n
    bus.close()


# BAR-sized page numbers: the first three BARs, far away, zero, the top.
_PAGES = [a >> pci.BAR0_SHIFT for a in (0xE0000000, 0xE0002000, 0xE0004000, 0xF0000000)]
_pages = st.sampled_from(_PAGES + [0, 0xFFFFFFFF >> pci.BAR0_SHIFT])
_write = st.tuples(st.integers(0, 2), _pages, st.integers(0, pci.BAR0_SIZE - 1), st.sampled_from([4, 4, 4, 2, 1]),
                   st.integers(0, 3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(_write, max_size=25))
def test_any_bar_write_sequence_decodes_like_the_reference(gm, writes):
    bus, ts = make_bus(gm)
    try:
        for i, page, low, size, byte in writes:
            t = ts[i]
            value = page << pci.BAR0_SHIFT | low
            if size == 4:
                set_bar(bus, t, value)
            else:
                off = byte & (4 - size) if size == 2 else byte
                testing.conf1_write(bus, t.slot, pci.PCI_BASE_ADDRESS_0 + off, size,
                                (value >> 8 * off) & ((1 << 8 * size) - 1))
            bars = {u.slot: testing.conf1_read(bus, u.slot, pci.PCI_BASE_ADDRESS_0, 4) for u in ts}
            want = bar_decode(bars, pci.BAR0_SIZE)
            for p in {*_PAGES, *want}:
                assert decoder_at(bus, p) == want.get(p), (hex(p), bars)
            notify = {gpa: fd for gpa, _, fd in bus.ioeventfds()}
            want_notify = {(p << pci.BAR0_SHIFT) + pci.NOTIFY_OFF + 4 * q: bus.slots[s].notify_fds[q]
                           for p, s in want.items() for q in range(2)}
            assert notify == want_notify
    finally:
        bus.close()


# --- status quirk: DRIVER_OK after a refused feature set --------------------

@pytest.mark.parametrize("strict", [False, True])
def test_driver_ok_without_version_1_is_refused(gm, strict):
    bus = pci.Bus(gm, strict=strict)
    dev = Dev("d")
    t = bus.add_device(dev)
    w = lambda off, size, v: bus.mmio(t.bar0 + off, size, True, v)
    w(STATUS, 1, pci.ACKNOWLEDGE)
    w(STATUS, 1, pci.ACKNOWLEDGE | pci.DRIVER)
    w(GFSEL, 4, 1)
    w(GF, 4, 0)                                   # VERSION_1 (bit 32) not accepted
    if strict:
        with pytest.raises(pci.BadDriver, match="3.1.1"):
            w(STATUS, 1, 0x0F)
    else:
        w(STATUS, 1, 0x0F)
    status = bus.mmio(t.bar0 + STATUS, 1, False, 0)
    assert not status & pci.FEATURES_OK           # §2.2.3: the feature set is refused
    assert not status & pci.DRIVER_OK             # before the fix: 0x07
    assert status == pci.ACKNOWLEDGE | pci.DRIVER
    assert dev.activated == 0                     # and the device was activated
    bus.close()


# --- fault 3: a kernel file larger than host memory ---------------------------

def test_loader_sizes_the_kernel_file_before_reading_it(tmp_path):
    from lguest_jit.hw import loader
    huge = tmp_path / "vmlinux"
    with open(huge, "wb") as f:
        f.truncate(1 << 40)               # sparse: costs nothing on disk
    gm = GuestMemory(8 << 20)
    try:
        with pytest.raises(loader.LoadError, match="free memory") as ei:   # before the fix: MemoryError
            loader.load_linux(gm, str(huge))
        assert "\n" not in str(ei.value) and str(huge) in str(ei.value)
    finally:
        gm.close()
