"""One test per driver-conformance rule, each under both policies.

strict: the access raises BadDriver naming device, rule and section (the
launcher stops with "bad driver: ...").  default: nothing raises; the bad
access is dropped (or the device sets DEVICE_NEEDS_RESET and raises a config
interrupt), the rule is logged once, and the device keeps working.
"""
import select

import pytest

from lguest_jit import pci, testing, vring
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.testing import RecordingDevice

# common configuration offsets (§4.1.4.3)
DFSEL, DF, GFSEL, GF, MSIX, NUMQ, STATUS, GEN = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x12, 0x14, 0x15
QSEL, QSIZE, QMSIX, QENABLE, QNOFF, QDESC, QDRIVER, QDEVICE = 0x16, 0x18, 0x1A, 0x1C, 0x1E, 0x20, 0x28, 0x30


class Dev(RecordingDevice):
    device_type = 3
    name = "testdev"
    queue_max_sizes = (256, 16)
    features = 1 << vring.VIRTIO_RING_F_INDIRECT_DESC

    def __init__(self):
        super().__init__(bytes([1, 2, 3, 4, 5, 6, 7, 8]))     # byte 0 writable, the rest read-only

    def config_write(self, offset, size, value):
        if offset == 0 and size == 1:
            self.config[0] = value
            return True
        return False


class Driver:
    def __init__(self, policy, notify_mode="per-queue", msix=False):
        self.gm = GuestMemory(4 << 20)
        self.log = []
        self.fatal_calls = []
        self.bus = pci.Bus(self.gm, strict=policy == "strict", notify_mode=notify_mode,
                           log=self.log.append, fatal=self.fatal_calls.append, msix=msix)
        self.dev = Dev()
        self.t = self.bus.add_device(self.dev)
        self.base = self.t.bar0

    def close(self):
        self.bus.close()
        self.gm.close()

    def r(self, off, size):
        return self.bus.mmio(self.base + off, size, False, 0)

    def w(self, off, size, v):
        self.bus.mmio(self.base + off, size, True, v)

    # -- the legitimate sequence, in steps --
    def status_add(self, bit, reread=True):
        self.w(STATUS, 1, self.r(STATUS, 1) | bit)
        if reread:
            self.r(STATUS, 1)

    def to_driver(self):
        self.w(STATUS, 1, 0)
        self.status_add(pci.ACKNOWLEDGE)
        self.status_add(pci.DRIVER)

    def to_features_ok(self, reread=True):
        self.to_driver()
        self.w(GFSEL, 4, 0)
        self.w(GF, 4, 1 << vring.VIRTIO_RING_F_INDIRECT_DESC)
        self.w(GFSEL, 4, 1)
        self.w(GF, 4, 1)
        self.status_add(pci.FEATURES_OK, reread)

    def setup_queue(self, q, desc=0x10000, size=16):
        self.w(QSEL, 2, q)
        self.w(QSIZE, 2, size)
        self.w(QDESC, 4, desc + q * 0x4000)
        self.w(QDESC + 4, 4, 0)
        self.w(QDRIVER, 4, desc + q * 0x4000 + 0x1000)
        self.w(QDRIVER + 4, 4, 0)
        self.w(QDEVICE, 4, desc + q * 0x4000 + 0x2000)
        self.w(QDEVICE + 4, 4, 0)

    def enable(self, q):
        self.w(QSEL, 2, q)
        self.w(QENABLE, 2, 1)

    def to_driver_ok(self, queues=(0, 1)):
        self.to_features_ok()
        for q in queues:
            self.setup_queue(q)
            self.enable(q)
        self.status_add(pci.DRIVER_OK)


@pytest.fixture(params=["strict", "default"])
def policy(request):
    return request.param


def _pending(fd):
    return bool(select.select([fd], [], [], 0)[0])


PROVOKED = set()     # rule codes a strict violate() has seen raised (test_every_rule_has_a_test)


def violate(policy, drv, code, action, logged_before=False):
    """Run ``action`` (the bad access) under ``policy``.  Strict: must raise
    BadDriver for ``code``; returns None.  Default: must not raise; runs it
    twice and checks the rule was logged exactly once (or not again, when
    ``logged_before``); returns True."""
    text, section, _ = pci.RULES[code]
    if policy == "strict":
        with pytest.raises(pci.BadDriver) as ei:
            action()
        e = ei.value
        assert e.code == code and e.section == section and e.device == drv.dev.name
        assert str(e).startswith(f"{drv.dev.name}: ") and str(e).endswith(f"(§{section})")
        PROVOKED.add(code)
        return None
    before = len(drv.log)
    action()
    action()
    hits = [line for line in drv.log[before:] if f"(§{section})" in line and "driver error" in line]
    assert len(hits) == (0 if logged_before else 1), drv.log[before:]
    return True


def needs_reset_signalled(drv):
    st = drv.r(STATUS, 1)
    assert st & pci.DEVICE_NEEDS_RESET
    assert drv.t.isr[0] & 2 and _pending(drv.t.irq_fd)


@pytest.fixture
def make(policy):
    made = []

    def _make(**kw):
        d = Driver(policy, **kw)
        made.append(d)
        return d
    yield _make
    for d in made:
        d.close()


# --- §4.1.3.1 access width --------------------------------------------------

@pytest.mark.parametrize("off,size,is_write", [(QSIZE, 1, False), (NUMQ - 2, 4, False), (STATUS, 2, True),
                                               (QSEL, 4, True), (DF + 2, 2, False), (pci.ISR_OFF, 4, False),
                                               (QDESC, 2, True)])
def test_width(policy, make, off, size, is_write):
    drv = make()
    drv.to_features_ok()
    drv.w(QSEL, 2, 1)
    before_sel = drv.r(QSEL, 2)
    before_status = drv.r(STATUS, 1)
    out = []
    if violate(policy, drv, pci.E_WIDTH,
               lambda: out.append(drv.bus.mmio(drv.base + off, size, is_write, 0))):
        assert all(v == 0 for v in out)
        assert drv.r(QSEL, 2) == before_sel and drv.r(STATUS, 1) == before_status
        assert drv.r(QDESC, 4) == 0


def test_width_64bit_queue_address_is_allowed(policy, make):
    drv = make()
    drv.to_features_ok()
    drv.w(QSEL, 2, 0)
    drv.bus.mmio(drv.base + QDESC, 8, True, 0x1234_0000_5000)
    assert drv.r(QDESC, 4) == 0x5000 and drv.r(QDESC + 4, 4) == 0x1234
    assert drv.bus.mmio(drv.base + QDESC, 8, False, 0) == 0x1234_0000_5000
    assert not any("driver error" in line for line in drv.log)


# --- §4.1.4.3.2 read-only fields ---------------------------------------------

@pytest.mark.parametrize("off,size", [(DF, 4), (NUMQ, 2), (GEN, 1), (QNOFF, 2)])
def test_read_only_fields(policy, make, off, size):
    drv = make()
    drv.to_driver()
    drv.w(QSEL, 2, 1)
    before = drv.r(off, size)
    if violate(policy, drv, pci.E_READ_ONLY, lambda: drv.w(off, size, 0x5A5A)):
        assert drv.r(off, size) == before


def test_isr_write(policy, make):
    drv = make()
    drv.t.isr[0] = 1
    if violate(policy, drv, pci.E_ISR_WRITE, lambda: drv.w(pci.ISR_OFF, 1, 0)):
        assert drv.r(pci.ISR_OFF, 1) == 1    # still set until read
        assert drv.r(pci.ISR_OFF, 1) == 0


# --- §3.1.1 feature negotiation order, §2.2.1 offered features ---------------

def test_feature_write_before_driver(policy, make):
    drv = make()
    drv.w(STATUS, 1, 0)
    drv.status_add(pci.ACKNOWLEDGE)
    if violate(policy, drv, pci.E_FEATURE_BEFORE_DRIVER, lambda: drv.w(GF, 4, 1 << 28)):
        assert drv.t.features == 0


def test_feature_read_before_driver(policy, make):
    drv = make()
    drv.w(STATUS, 1, 0)
    drv.status_add(pci.ACKNOWLEDGE)
    out = []
    if violate(policy, drv, pci.E_FEATURE_READ_BEFORE_DRIVER, lambda: out.append(drv.r(DF, 4))):
        assert out == [1 << 28, 1 << 28]    # a device answers anyway


def test_feature_write_after_features_ok(policy, make):
    drv = make()
    drv.to_features_ok()
    before = drv.t.features
    if violate(policy, drv, pci.E_FEATURE_AFTER_FEATURES_OK, lambda: drv.w(GF, 4, 0)):
        assert drv.t.features == before


def test_feature_not_offered(policy, make):
    drv = make()
    drv.to_driver()
    drv.w(GFSEL, 4, 0)
    if violate(policy, drv, pci.E_FEATURE_NOT_OFFERED, lambda: drv.w(GF, 4, (1 << 28) | (1 << 29) | 1)):
        assert drv.t.features == 1 << 28      # only what was offered sticks
        assert drv.r(GF, 4) == 1 << 28


def test_features_ok_refused_without_version_1(make):
    drv = make()
    drv.to_driver()
    drv.w(GFSEL, 4, 0)
    drv.w(GF, 4, 0)
    drv.w(STATUS, 1, drv.r(STATUS, 1) | pci.FEATURES_OK)
    assert not drv.r(STATUS, 1) & pci.FEATURES_OK   # §6.1: device refuses legacy negotiation


def test_driver_ok_after_refused_features(policy, make):
    drv = make()
    drv.to_driver()
    drv.w(GFSEL, 4, 1)
    drv.w(GF, 4, 0)                                   # no VERSION_1: FEATURES_OK will be refused
    if violate(policy, drv, pci.E_DRIVER_OK_WITHOUT_FEATURES_OK, lambda: drv.w(STATUS, 1, 0x0F)):
        assert drv.r(STATUS, 1) == pci.ACKNOWLEDGE | pci.DRIVER and drv.dev.ctx is None


# --- §2.1.1 / §3.1.1 device status -----------------------------------------

def test_status_clear(policy, make):
    drv = make()
    drv.to_driver()
    if violate(policy, drv, pci.E_STATUS_CLEAR, lambda: drv.w(STATUS, 1, pci.ACKNOWLEDGE)):
        assert drv.r(STATUS, 1) == pci.ACKNOWLEDGE | pci.DRIVER


@pytest.mark.parametrize("start,value", [(0, pci.DRIVER), (3, 3 | pci.DRIVER_OK), (0, 0x20),
                                         (1, 1 | pci.FEATURES_OK)])
def test_status_unknown_transition(policy, make, start, value):
    drv = make()
    drv.w(STATUS, 1, 0)
    for bit in (1, 2):
        if start & bit:
            drv.status_add(bit)
    if violate(policy, drv, pci.E_STATUS_TRANSITION, lambda: drv.w(STATUS, 1, value)):
        needs_reset_signalled(drv)
        assert drv.r(STATUS, 1) == start | pci.DEVICE_NEEDS_RESET
        assert drv.dev.ctx is None
        # the driver recovers with a reset
        drv.w(STATUS, 1, 0)
        assert drv.r(STATUS, 1) == 0


def test_failed_and_needs_reset_bits_are_not_errors(make):
    drv = make()
    drv.to_driver()
    drv.t.needs_reset()
    st = drv.r(STATUS, 1)
    assert st == 3 | pci.DEVICE_NEEDS_RESET
    drv.w(STATUS, 1, st | pci.FAILED)           # Linux writes back what it read, plus FAILED
    assert drv.r(STATUS, 1) == st | pci.FAILED
    assert not any("driver error" in line for line in drv.log)


@pytest.mark.parametrize("when", ["queue setup", "DRIVER_OK"])
def test_features_ok_not_reread(policy, make, when):
    drv = make()
    drv.to_features_ok(reread=False)
    if when == "queue setup":
        if violate(policy, drv, pci.E_FEATURES_OK_NOT_REREAD, lambda: drv.w(QSIZE, 2, 32)):
            assert drv.r(QSIZE, 2) == 32     # harmless: the write proceeds
    else:
        if violate(policy, drv, pci.E_FEATURES_OK_NOT_REREAD,
                   lambda: drv.w(STATUS, 1, 0x0F)):
            assert drv.t.status == 0x0F and drv.dev.ctx is not None


# --- queue configuration --------------------------------------------------------

def test_queue_setup_before_features_ok(policy, make):
    drv = make()
    drv.to_driver()
    drv.w(QSEL, 2, 0)
    if violate(policy, drv, pci.E_SETUP_BEFORE_FEATURES_OK, lambda: drv.w(QDESC, 4, 0x10000)):
        assert drv.r(QDESC, 4) == 0


def test_enable_after_driver_ok(policy, make):
    drv = make()
    drv.to_driver_ok(queues=(0,))
    drv.setup_queue(1)
    if violate(policy, drv, pci.E_ENABLE_AFTER_DRIVER_OK, lambda: drv.enable(1)):
        drv.w(QSEL, 2, 1)
        assert drv.r(QENABLE, 2) == 0
        assert drv.dev.ctx.queues[1] is None


def test_enable_zero(policy, make):
    drv = make()
    drv.to_features_ok()
    drv.setup_queue(0)
    drv.enable(0)
    if violate(policy, drv, pci.E_ENABLE_ZERO, lambda: drv.w(QENABLE, 2, 0)):
        assert drv.r(QENABLE, 2) == 1


@pytest.mark.parametrize("size", [3, 0, 512, 100])
def test_queue_size(policy, make, size):
    drv = make()
    drv.to_features_ok()
    drv.w(QSEL, 2, 0)
    if violate(policy, drv, pci.E_QUEUE_SIZE_VALUE, lambda: drv.w(QSIZE, 2, size)):
        assert drv.r(QSIZE, 2) == 256


@pytest.mark.parametrize("off,size", [(QSIZE, 2), (QDESC, 4), (QDRIVER + 4, 4), (QDEVICE, 4)])
def test_queue_change_while_enabled(policy, make, off, size):
    drv = make()
    drv.to_features_ok()
    drv.setup_queue(0)
    drv.enable(0)
    before = drv.r(off, size)
    if violate(policy, drv, pci.E_QUEUE_LIVE, lambda: drv.w(off, size, 0x8)):
        assert drv.r(off, size) == before


def test_queue_layout_checked_at_enable(policy, make):
    drv = make()
    drv.to_features_ok()
    drv.setup_queue(0)
    drv.w(QDESC, 4, 0x10008)                   # not 16-byte aligned (§2.4)
    if policy == "strict":
        with pytest.raises(pci.BadDriver) as ei:
            drv.enable(0)
        assert ei.value.code == pci.E_QUEUE_LAYOUT
        PROVOKED.add(pci.E_QUEUE_LAYOUT)
        assert vring.error_message(vring.E_DESC_ALIGN) in str(ei.value)
    else:
        drv.enable(0)
        assert drv.r(QENABLE, 2) == 0
        needs_reset_signalled(drv)
        assert any(vring.error_message(vring.E_DESC_ALIGN) in line for line in drv.log)


# --- notifications ------------------------------------------------------------

def test_notify_before_driver_ok(policy, make):
    drv = make()
    drv.to_features_ok()
    drv.setup_queue(0)
    drv.enable(0)
    if violate(policy, drv, pci.E_NOTIFY_EARLY, lambda: drv.w(pci.NOTIFY_OFF, 2, 0)):
        assert not _pending(drv.t.notify_fds[0])


def test_notify_unknown_queue(policy, make):
    drv = make(notify_mode="single")
    drv.to_driver_ok()
    if violate(policy, drv, pci.E_NOTIFY_QUEUE, lambda: drv.w(pci.NOTIFY_OFF, 2, 7)):
        assert not any(_pending(fd) for fd in drv.t.notify_fds)
    drv.w(pci.NOTIFY_OFF, 2, 1)
    assert _pending(drv.t.notify_fds[1]) and not _pending(drv.t.notify_fds[0])


# --- MSI-X --------------------------------------------------------------------

@pytest.mark.parametrize("off", [MSIX, QMSIX])
def test_msix_vector_without_msix(policy, make, off):
    drv = make()
    drv.to_features_ok()
    drv.w(QSEL, 2, 0)
    drv.w(off, 2, pci.VIRTIO_MSI_NO_VECTOR)       # "no vector" is always acceptable
    if violate(policy, drv, pci.E_MSIX, lambda: drv.w(off, 2, 1)):
        assert drv.r(off, 2) == pci.VIRTIO_MSI_NO_VECTOR


@pytest.mark.parametrize("off", [MSIX, QMSIX])
def test_msix_vector_beyond_the_table(policy, make, off):
    drv = make(msix=True)
    drv.to_features_ok()
    drv.w(QSEL, 2, 0)
    vectors = len(Dev.queue_max_sizes) + 1
    drv.w(off, 2, vectors - 1)                      # the last entry is fine
    assert drv.r(off, 2) == vectors - 1
    if violate(policy, drv, pci.E_MSIX, lambda: drv.w(off, 2, vectors)):
        assert drv.r(off, 2) == pci.VIRTIO_MSI_NO_VECTOR


@pytest.mark.parametrize("off,size,is_write", [
    (pci.MSIX_TABLE_OFF + 1, 4, True), (pci.MSIX_TABLE_OFF + 8, 2, True), (pci.MSIX_TABLE_OFF + 12, 1, False),
    (pci.MSIX_TABLE_OFF + 16 * 3, 4, True), (pci.MSIX_PBA_OFF, 4, True), (pci.MSIX_PBA_OFF + 8, 4, False),
    (pci.MSIX_TABLE_OFF + 4, 8, True)])
def test_msix_table_access(policy, make, off, size, is_write):
    drv = make(msix=True)
    before = drv.t.msix.copy()
    if violate(policy, drv, pci.E_MSIX_ACCESS,
               lambda: drv.w(off, size, 0xFFFFFFFF) if is_write else drv.r(off, size)):
        assert (drv.t.msix == before).all()          # dropped: no entry, mask or pending bit changed


# --- BAR0 range ----------------------------------------------------------------

@pytest.mark.parametrize("off,size", [(0x3C, 4), (0x36, 4), (pci.DEVCFG_OFF + 6, 4), (pci.DEVCFG_OFF + 8, 1),
                                      (0x7FC, 4), (pci.BAR0_SIZE - 2, 4), (pci.NOTIFY_OFF + 8, 2)])
def test_read_past_structures(policy, make, off, size):
    drv = make()
    drv.to_driver()
    out = []
    if violate(policy, drv, pci.E_BAR_RANGE, lambda: out.append(drv.r(off, size))):
        assert out == [0, 0]


# --- PCI_CFG window (§4.1.4.7) ----------------------------------------------------

@pytest.mark.parametrize("bar,offset,length", [(1, 0, 4), (0, 0x14, 3), (0, 0x15, 2), (0, pci.BAR0_SIZE, 4)])
def test_cfg_window_invalid(policy, make, bar, offset, length):
    drv = make()
    drv.to_driver()
    w = drv.t.cfg_window
    slot = drv.t.slot
    testing.conf1_write(drv.bus, slot, w + 4, 1, bar)
    testing.conf1_write(drv.bus, slot, w + 8, 4, offset)
    testing.conf1_write(drv.bus, slot, w + 12, 4, length)
    if violate(policy, drv, pci.E_CFG_WINDOW, lambda: testing.conf1_read(drv.bus, slot, w + 16, 4)):
        assert drv.r(STATUS, 1) == 3
    if violate(policy, drv, pci.E_CFG_WINDOW, lambda: testing.conf1_write(drv.bus, slot, w + 16, 1, 0),
               logged_before=True):
        assert drv.r(STATUS, 1) == 3


# --- device config -----------------------------------------------------------

def test_device_config_read_only(policy, make):
    drv = make()
    drv.to_driver()
    drv.w(pci.DEVCFG_OFF, 1, 0x77)                     # the writable byte
    assert drv.r(pci.DEVCFG_OFF, 1) == 0x77
    if violate(policy, drv, pci.E_CONFIG_WRITE, lambda: drv.w(pci.DEVCFG_OFF + 4, 4, 0)):
        assert drv.r(pci.DEVCFG_OFF + 4, 4) == 0x08070605


# --- errors found by the device's queue threads ----------------------------------

def test_device_reported_error(policy, make):
    drv = make()
    drv.to_driver_ok()
    msg = vring.error_message(vring.E_HEAD_RANGE)
    drv.dev.ctx.driver_error(0, msg)
    drv.dev.ctx.driver_error(0, msg)
    if policy == "strict":
        assert len(drv.fatal_calls) == 2
        assert drv.fatal_calls[0] == f"testdev: {msg} (§2.4)"
    else:
        assert not drv.fatal_calls
        needs_reset_signalled(drv)
        assert sum(msg in line for line in drv.log) == 1


def test_device_reported_error_default_fatal_raises():
    drv = Driver("strict")
    try:
        drv.bus.fatal = None          # what Bus(fatal=None) gives: raise in the device thread
        drv.to_driver_ok()
        with pytest.raises(pci.BadDriver) as ei:
            drv.dev.ctx.driver_error(1, "bad chain")
        assert str(ei.value) == "testdev: bad chain (§2.4)"
        assert ei.value.code == pci.E_DEVICE
        PROVOKED.add(pci.E_DEVICE)
    finally:
        drv.close()


# One test per rule, with the arguments that make it break the rule.
RULE_TESTS = {
    pci.E_WIDTH: (test_width, dict(off=QSIZE, size=1, is_write=False)),
    pci.E_READ_ONLY: (test_read_only_fields, dict(off=NUMQ, size=2)),
    pci.E_ISR_WRITE: (test_isr_write, {}),
    pci.E_FEATURE_BEFORE_DRIVER: (test_feature_write_before_driver, {}),
    pci.E_FEATURE_READ_BEFORE_DRIVER: (test_feature_read_before_driver, {}),
    pci.E_FEATURE_AFTER_FEATURES_OK: (test_feature_write_after_features_ok, {}),
    pci.E_FEATURE_NOT_OFFERED: (test_feature_not_offered, {}),
    pci.E_STATUS_CLEAR: (test_status_clear, {}),
    pci.E_DRIVER_OK_WITHOUT_FEATURES_OK: (test_driver_ok_after_refused_features, {}),
    pci.E_STATUS_TRANSITION: (test_status_unknown_transition, dict(start=0, value=pci.DRIVER)),
    pci.E_FEATURES_OK_NOT_REREAD: (test_features_ok_not_reread, dict(when="queue setup")),
    pci.E_SETUP_BEFORE_FEATURES_OK: (test_queue_setup_before_features_ok, {}),
    pci.E_ENABLE_AFTER_DRIVER_OK: (test_enable_after_driver_ok, {}),
    pci.E_ENABLE_ZERO: (test_enable_zero, {}),
    pci.E_QUEUE_SIZE_VALUE: (test_queue_size, dict(size=3)),
    pci.E_QUEUE_LIVE: (test_queue_change_while_enabled, dict(off=QSIZE, size=2)),
    pci.E_NOTIFY_EARLY: (test_notify_before_driver_ok, {}),
    pci.E_NOTIFY_QUEUE: (test_notify_unknown_queue, {}),
    pci.E_MSIX: (test_msix_vector_without_msix, dict(off=MSIX)),
    pci.E_MSIX_ACCESS: (test_msix_table_access, dict(off=pci.MSIX_TABLE_OFF + 2, size=2, is_write=True)),
    pci.E_BAR_RANGE: (test_read_past_structures, dict(off=0x3C, size=4)),
    pci.E_CFG_WINDOW: (test_cfg_window_invalid, dict(bar=1, offset=0, length=4)),
    pci.E_CONFIG_WRITE: (test_device_config_read_only, {}),
    pci.E_QUEUE_LAYOUT: (test_queue_layout_checked_at_enable, {}),
    pci.E_DEVICE: (test_device_reported_error_default_fatal_raises, None),
}


@pytest.mark.parametrize("code", sorted(pci.RULES), ids=lambda c: pci.RULES[c][0][:40])
def test_every_rule_has_a_test(code):
    """Each rule's test, run under the strict policy, really makes the bus
    raise that rule's code (not just mentions its name)."""
    assert code in RULE_TESTS, f"no test for rule {code}: {pci.RULES[code][0]}"
    test, kwargs = RULE_TESTS[code]
    PROVOKED.discard(code)
    if kwargs is None:
        test()
    else:
        made = []

        def make(**kw):
            made.append(Driver("strict", **kw))
            return made[-1]
        try:
            test("strict", make, **kwargs)
        finally:
            for d in made:
                d.close()
    assert code in PROVOKED, f"{test.__name__} did not provoke rule {code} under the strict policy"
