"""MSI-X (PCI 3.0 §6.8; virtio 1.0 §4.1.4.3, §4.1.5): the capability, the
table and PBA in BAR0, masking and pending bits, vector assignment in the
common configuration, delivery from the queue threads, and the fallback to
INTx.  The driver side is lguest_jit.testing's harness playing Linux."""
import os
import select
import threading
import time

import numpy as np
import pytest

from lguest_jit import irq, pci, vring
from lguest_jit.devices import Rng
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.testing import MSI_ADDRESS, MSI_DATA_BASE, RecordingDevice, VirtioPciDriver

MASKALL, ENABLE = pci.PCI_MSIX_FLAGS_MASKALL, pci.PCI_MSIX_FLAGS_ENABLE
MSIX_CFG, QSEL, QMSIX = 0x10, 0x16, 0x1A


class Dev(RecordingDevice):
    device_type = 3
    name = "msixdev"
    queue_max_sizes = (16, 16, 16)
    features = 0


def _pending(fd):
    return bool(select.select([fd], [], [], 0)[0])


def _take(fd, timeout=5.0):
    """The message count of an eventfd within ``timeout`` s (0: none)."""
    if select.select([fd], [], [], timeout)[0]:
        return os.eventfd_read(fd)
    return 0


@pytest.fixture
def rig(request):
    made = []

    def make(msix=True, strict=False, device=Dev):
        gm = GuestMemory(64 << 20)
        log = []
        bus = pci.Bus(gm, msix=msix, strict=strict, log=log.append)
        bus.log_lines = log
        dev = device() if isinstance(device, type) else device
        t = bus.add_device(dev)
        drv = VirtioPciDriver(bus, t.slot, gm)
        made.append((bus, gm))
        return bus, t, drv
    yield make
    for bus, gm in made:
        bus.close()
        gm.close()


# --- the capability -------------------------------------------------------------

def test_capability_is_in_the_list_with_its_table_and_pba(rig):
    bus, t, drv = rig()
    assert drv.msix_cap, "MSI-X capability not found by walking the list"
    cap = drv.msix_cap
    assert drv.cfg_read(cap, 1) == pci.PCI_CAP_ID_MSIX
    assert drv.cfg_read(pci.PCI_STATUS, 2) & pci.PCI_STATUS_CAP_LIST
    # one vector per queue plus the configuration vector
    assert drv.msix_table_size() == len(Dev.queue_max_sizes) + 1
    assert drv.cfg_read(cap + pci.PCI_MSIX_TABLE, 4) == pci.MSIX_TABLE_OFF      # BIR 0
    assert drv.cfg_read(cap + pci.PCI_MSIX_PBA, 4) == pci.MSIX_PBA_OFF
    # Table size is read-only; Enable and Function Mask are the writable bits.
    drv.cfg_write(cap + 2, 2, 0xFFFF)
    assert drv.cfg_read(cap + 2, 2) == ENABLE | MASKALL | (drv.msix_table_size() - 1)
    assert t.msix_enabled and t.msix[0, irq.MX_MASKED] == 1
    drv.cfg_write(cap + 2, 2, 0)
    assert drv.cfg_read(cap + 2, 2) == drv.msix_table_size() - 1 and not t.msix_enabled
    # Table and PBA lie inside BAR0, past the virtio structures.
    assert pci.NOTIFY_OFF + pci.NOTIFY_STRIDE * pci.MAX_QUEUES <= pci.MSIX_TABLE_OFF
    assert pci.MSIX_TABLE_OFF + 16 * pci.MSIX_MAX_VECTORS <= pci.MSIX_PBA_OFF < pci.BAR0_SIZE


def test_vectors_are_capped(rig):
    class Wide(Dev):
        queue_max_sizes = (16,) * (pci.MSIX_MAX_VECTORS + 3)
    bus, t, drv = rig(device=Wide)
    assert drv.msix_table_size() == pci.MSIX_MAX_VECTORS


def test_bus_without_msix_offers_no_capability(rig):
    bus, t, drv = rig(msix=False)
    assert drv.msix_cap == 0 and bus.msi_routes() == []
    # the table area is then outside the virtio structures
    assert bus.mmio(t.bar0 + pci.MSIX_TABLE_OFF, 4, False, 0) == 0
    assert any("outside the virtio structures" in line for line in bus.log_lines)


# --- table and PBA ----------------------------------------------------------------

def test_table_reset_state_and_dword_access(rig):
    bus, t, drv = rig()
    for v in range(drv.msix_table_size()):
        assert [bus.mmio(drv.msix_entry(v, f), 4, False, 0) for f in range(4)] == [0, 0, 0, 1]   # masked
    assert drv.msix_pba(0) == 0
    bus.mmio(drv.msix_entry(1, 0), 4, True, 0xFEE0100F)
    bus.mmio(drv.msix_entry(1, 1), 4, True, 0x12345678)
    bus.mmio(drv.msix_entry(1, 2), 4, True, 0xDEADBEEF)
    bus.mmio(drv.msix_entry(1, 3), 4, True, 0xFFFFFFFE)
    assert bus.mmio(drv.msix_entry(1, 0), 4, False, 0) == 0xFEE0100C        # bits 1:0 read 0
    assert bus.mmio(drv.msix_entry(1, 1), 4, False, 0) == 0x12345678
    assert bus.mmio(drv.msix_entry(1, 2), 4, False, 0) == 0xDEADBEEF
    assert bus.mmio(drv.msix_entry(1, 3), 4, False, 0) == 0                  # reserved bits read 0
    # the neighbours did not move
    assert [bus.mmio(drv.msix_entry(0, f), 4, False, 0) for f in range(4)] == [0, 0, 0, 1]


def test_qword_access(rig):
    bus, t, drv = rig()
    bus.mmio(drv.msix_entry(2, 0), 8, True, 0x00000001_FEE02000)
    assert bus.mmio(drv.msix_entry(2, 0), 8, False, 0) == 0x00000001_FEE02000
    bus.mmio(drv.msix_entry(2, 2), 8, True, 0x00000000_00000055)            # data, then unmask
    assert bus.mmio(drv.msix_entry(2, 2), 8, False, 0) == 0x55
    assert bus.mmio(t.bar0 + pci.MSIX_PBA_OFF, 8, False, 0) == 0


@pytest.mark.parametrize("where,size", [("entry+1", 4), ("entry", 2), ("entry", 1), ("entry+2", 2),
                                        ("past-table", 4), ("pba", 1), ("past-pba", 4), ("entry+4", 8)])
@pytest.mark.parametrize("policy", ["default", "strict"])
def test_bad_table_and_pba_accesses_are_dropped(rig, where, size, policy):
    bus, t, drv = rig(strict=policy == "strict")
    n = drv.msix_table_size()
    addr = {"entry": drv.msix_entry(1, 0), "entry+1": drv.msix_entry(1, 0) + 1, "entry+2": drv.msix_entry(1, 0) + 2,
            "entry+4": drv.msix_entry(1, 1), "past-table": drv.msix_entry(n, 0),
            "pba": t.bar0 + pci.MSIX_PBA_OFF, "past-pba": t.bar0 + pci.MSIX_PBA_OFF + 8}[where]
    before = t.msix.copy()
    for is_write in (True, False):
        if policy == "strict":
            with pytest.raises(pci.BadDriver) as ei:
                bus.mmio(addr, size, is_write, 0x12345678)
            assert ei.value.code == pci.E_MSIX_ACCESS
        else:
            r = bus.mmio(addr, size, is_write, 0x12345678)
            assert r == 0
    assert np.array_equal(t.msix, before)          # nothing changed anywhere


def test_pba_is_read_only(rig):
    bus, t, drv = rig()
    t.msix[1 + 2, irq.MV_PENDING] = 1
    assert drv.msix_pba(0) == 1 << 2
    bus.mmio(t.bar0 + pci.MSIX_PBA_OFF, 4, True, 0)
    assert drv.msix_pba(0) == 1 << 2
    assert any("read-only PBA" in line for line in bus.log_lines)


def test_table_follows_a_bar_move(rig):
    bus, t, drv = rig()
    old = t.bar0
    new = old + 16 * pci.BAR0_SIZE
    drv.cfg_write(pci.PCI_BASE_ADDRESS_0, 4, new)
    assert t.bar0 == new
    drv.bar0 = new
    bus.mmio(drv.msix_entry(0, 2), 4, True, 0x77)
    assert bus.mmio(drv.msix_entry(0, 2), 4, False, 0) == 0x77
    assert bus.mmio(old + pci.MSIX_TABLE_OFF + 8, 4, False, 0) == 0xFFFFFFFF   # nothing decodes there now


# --- vector assignment (virtio 1.0 §4.1.4.3, §4.1.5.1.2) -------------------------

def test_vector_assignment_reads_back(rig):
    bus, t, drv = rig()
    drv.common_write(MSIX_CFG, 2, 3)
    assert drv.common_read(MSIX_CFG, 2) == 3
    for q in range(3):
        drv.common_write(QSEL, 2, q)
        drv.common_write(QMSIX, 2, q)
    for q in range(3):
        drv.common_write(QSEL, 2, q)
        assert drv.common_read(QMSIX, 2) == q
    # beyond the table: NO_VECTOR, the driver's cue to fall back
    drv.common_write(QSEL, 2, 1)
    drv.common_write(QMSIX, 2, drv.msix_table_size())
    assert drv.common_read(QMSIX, 2) == pci.VIRTIO_MSI_NO_VECTOR
    # a queue the device does not have reads NO_VECTOR
    drv.common_write(QSEL, 2, 7)
    assert drv.common_read(QMSIX, 2) == pci.VIRTIO_MSI_NO_VECTOR
    # device reset forgets the mapping (not the table)
    bus.mmio(drv.msix_entry(0, 2), 4, True, 0x99)
    drv.common_write(0x14, 1, 0)
    assert drv.common_read(MSIX_CFG, 2) == pci.VIRTIO_MSI_NO_VECTOR
    drv.common_write(QSEL, 2, 0)
    assert drv.common_read(QMSIX, 2) == pci.VIRTIO_MSI_NO_VECTOR
    assert bus.mmio(drv.msix_entry(0, 2), 4, False, 0) == 0x99


# --- delivery ------------------------------------------------------------------------

def _rng(rig, msix=True):
    bus, t, drv = rig(device=Rng)
    drv.init(msix=msix)
    return bus, t, drv


def _request(drv):
    drv.queues[0].add(in_=[64])
    drv.kick(0)


def _wait_pending(drv, v, timeout=30.0):
    """Until the device thread set vector ``v``'s pending bit (it runs
    after the request was kicked)."""
    for _ in range(int(timeout / 0.01)):
        if drv.msix_pba(v) >> (v % 32) & 1:
            return
        select.select([], [], [], 0.01)


def test_linux_setup_then_used_buffers_arrive_as_messages(rig):
    bus, t, drv = _rng(rig)
    assert t.msix_enabled and drv.cfg_read(pci.PCI_COMMAND, 2) & pci.PCI_COMMAND_INTX_DISABLE
    routes = bus.msi_routes()
    assert [(a, d) for _, a, d in routes] == [(MSI_ADDRESS, MSI_DATA_BASE + v) for v in range(2)]
    assert [fd for fd, _, _ in routes] == t.vector_fds
    for _ in range(3):
        _request(drv)
        head, length, data = drv.wait_used(0, timeout=30)
        assert length == 64 and len(data[0]) == 64
    assert t.st[pci.S_ISR_READS] == 0 and t.isr[0] == 0
    assert not _pending(t.irq_fd) and not bus.irq_pending(t.irq_line)
    stats = t.interrupt_stats()
    assert stats == {"mode": "msix", "vectors": 2, "isr_reads": 0}
    assert t.device.counters()["requests"]["interrupts"] >= 1


def test_masked_vector_sets_the_pending_bit_and_unmask_sends_it(rig):
    bus, t, drv = _rng(rig)
    fd = drv.vector_fd(1)
    drv.mask_vector(1)
    _request(drv)
    # the device used the buffer but could only set the pending bit
    _wait_pending(drv, 1)
    assert drv.msix_pba(0) == 1 << 1
    assert not _pending(fd) and t.isr[0] == 0 and not _pending(t.irq_fd)
    assert drv.queues[0].get_used() is not None
    q = t.queues[0]
    assert q[vring.Q_N_IRQ_MASKED] >= 1
    drv.mask_vector(1, False)                      # PCI 3.0 §6.8.3.4: unmasking sends it
    assert _take(fd, 30) == 1
    assert drv.msix_pba(0) == 0
    drv.mask_vector(1)
    drv.mask_vector(1, False)                      # nothing pending: nothing sent
    assert not _pending(fd)


def test_function_mask_holds_every_vector(rig):
    bus, t, drv = _rng(rig)
    fd = drv.vector_fd(1)
    drv.msix_control(MASKALL)
    _request(drv)
    _wait_pending(drv, 1)
    assert drv.msix_pba(0) == 1 << 1 and not _pending(fd)
    # the entry's own mask bit is unchanged: only the function mask holds it
    assert bus.mmio(drv.msix_entry(1, 3), 4, False, 0) == 0
    drv.msix_control(clear_bits=MASKALL)
    assert _take(fd, 30) == 1 and drv.msix_pba(0) == 0


def test_config_interrupt_goes_to_msix_config_vector(rig):
    bus, t, drv = _rng(rig)
    fd0 = drv.vector_fd(0)
    t.config_changed()
    assert _take(fd0, 30) == 1
    assert t.isr[0] == 0 and not _pending(t.irq_fd)
    drv.mask_vector(0)
    t.config_changed()
    assert drv.msix_pba(0) == 1 and not _pending(fd0)
    drv.mask_vector(0, False)
    assert _take(fd0, 30) == 1


def test_event_without_vector_raises_nothing(rig):
    bus, t, drv = _rng(rig)
    drv.common_write(MSIX_CFG, 2, pci.VIRTIO_MSI_NO_VECTOR)
    t.config_changed()
    assert not any(_pending(fd) for fd in t.vector_fds) and not _pending(t.irq_fd) and t.isr[0] == 0


def test_queue_vector_change_reaches_a_running_queue(rig):
    bus, t, drv = _rng(rig)
    drv.common_write(QSEL, 2, 0)
    drv.common_write(QMSIX, 2, pci.VIRTIO_MSI_NO_VECTOR)
    assert t.queues[0][vring.Q_VECTOR] == pci.VIRTIO_MSI_NO_VECTOR
    _request(drv)
    for _ in range(3000):
        if t.queues[0][vring.Q_N_IRQ_NO_VECTOR]:
            break
        select.select([], [], [], 0.01)
    assert t.queues[0][vring.Q_N_IRQ_NO_VECTOR] == 1
    assert not any(_pending(fd) for fd in t.vector_fds) and not _pending(t.irq_fd)
    assert drv.queues[0].get_used() is not None      # reaped: used_event moves on (§2.4.7.2)
    drv.common_write(QMSIX, 2, 0)                   # share the config vector
    assert t.queues[0][vring.Q_VECTOR] == 0
    _request(drv)
    assert _take(drv.vector_fd(0), 30) >= 1


def test_without_msix_enabled_the_device_uses_isr_and_intx(rig):
    bus, t, drv = _rng(rig, msix=False)          # capability there, driver never enables it
    assert drv.msix_cap and not t.msix_enabled
    _request(drv)
    drv.wait_used(0, timeout=30)
    if t.st[pci.S_ISR_READS] == 0:
        # The used entry was there before the driver looked for an interrupt:
        # the INTx line still carries it.
        assert drv.wait_interrupt(30) and drv.isr() & 1
    assert t.st[pci.S_ISR_READS] >= 1                 # the INTx driver read the ISR
    assert not any(_pending(fd) for fd in t.vector_fds)
    assert t.interrupt_stats()["mode"] == "intx"
    # Enabling and then disabling MSI-X goes back to INTx as well.
    drv.msix_control(ENABLE)
    drv.msix_control(clear_bits=ENABLE)
    t.config_changed()
    assert t.isr[0] & 2 and _pending(t.irq_fd) and bus.irq_pending(t.irq_line)


def test_routes_are_updated_before_a_vector_can_send(rig):
    bus, t, drv = _rng(rig)
    seen = []
    fd = drv.vector_fd(1)

    def listener():
        # at this point the vector must not have sent on its old route
        seen.append((bus.msi_routes()[1], _pending(fd)))
    bus.add_msi_listener(listener)
    drv.mask_vector(1)
    _request(drv)
    _wait_pending(drv, 1)
    bus.mmio(drv.msix_entry(1, 2), 4, True, 0x61)      # masked: no route change yet
    assert seen == []
    drv.mask_vector(1, False)
    assert seen == [((fd, MSI_ADDRESS, 0x61), False)]
    assert _take(fd, 30) == 1
    bus.mmio(drv.msix_entry(1, 2), 4, True, 0x62)      # unmasked entry rewritten: routes follow
    assert seen[-1][0] == (fd, MSI_ADDRESS, 0x62)
    drv.msix_control(clear_bits=ENABLE)
    assert seen[-1][0] == (fd, None, 0)
    # A message held pending across a disable goes out on re-enabling, and
    # only after the routes were refreshed.
    fd0 = drv.vector_fd(0) or t.vector_fds[0]
    drv.msix_control(ENABLE | MASKALL)
    t.config_changed()
    assert drv.msix_pba(0) & 1
    drv.msix_control(clear_bits=ENABLE | MASKALL)
    seen.clear()
    bus.add_msi_listener(lambda: seen.append(("vector 0", _pending(fd0))))
    drv.msix_control(ENABLE)
    assert ("vector 0", False) in seen and _take(fd0, 30) == 1 and drv.msix_pba(0) == 0


def test_raise_and_unmask_race_delivers_each_raise_exactly_once(rig):
    """A queue thread raising while the vCPU masks and unmasks: every raise
    ends as one message, sent either by the raise or by the unmask that
    found its pending bit, never by both and never by neither.  The raiser
    waits for each raise's message before the next (no two raises share a
    pending bit), so the eventfd must count exactly one per raise."""
    bus, t, drv = rig()
    drv.enable_msix(2)
    m, fd = t.msix, drv.vector_fd(1)
    os.set_blocking(fd, False)
    isr = t.isr
    raises, got, outcomes, finished = 20000, [], {}, threading.Event()

    def raiser():
        scratch = np.zeros(1, np.uint64)
        try:
            # until both sides have sent a good number of times (bounded)
            while min(outcomes.get(irq.IRQ_SENT, 0), outcomes.get(irq.IRQ_MASKED, 0)) < 30 \
                    and len(got) < raises:
                r = int(irq.raise_msix(isr, m, scratch, 1, 1))
                outcomes[r] = outcomes.get(r, 0) + 1
                # the vCPU below keeps unmasking: a message must come (generous bound, no timing claim)
                if not select.select([fd], [], [], 30)[0]:
                    got.append(0)
                    return
                got.append(os.eventfd_read(fd))
        finally:
            finished.set()
    th = threading.Thread(target=raiser)
    th.start()
    try:
        while not finished.is_set():
            drv.mask_vector(1)
            time.sleep(0)           # let the raiser run while masked too, not only between toggles
            drv.mask_vector(1, False)
    finally:
        th.join()
    drv.mask_vector(1, False)
    assert got and got == [1] * len(got), [(i, n) for i, n in enumerate(got) if n != 1][:5]
    # both ways were taken: sent by the raise, and left pending for the unmask to send
    assert set(outcomes) == {irq.IRQ_SENT, irq.IRQ_MASKED}, outcomes
    assert not _pending(fd), "a message beyond one per raise"
    assert m[2, irq.MV_PENDING] == 0 and drv.msix_pba(0) == 0
    assert t.isr[0] == 0


def test_enable_without_unmasking_keeps_everything_pending(rig):
    bus, t, drv = rig()
    drv.msix_control(ENABLE | MASKALL)
    for v in range(drv.msix_table_size()):
        bus.mmio(drv.msix_entry(v, 0), 4, True, 0xDEAD0000)       # garbage: no CPU there
    r = irq.raise_msix(t.isr, t.msix, np.zeros(1, np.uint64), 2, 1)
    assert r == irq.IRQ_MASKED and drv.msix_pba(0) == 1 << 2
    assert not any(_pending(fd) for fd in t.vector_fds) and t.isr[0] == 0
