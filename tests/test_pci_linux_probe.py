"""Replay Linux 6.1's probe of our bus, access by access, and check every
value Linux reads.

The sequence follows arch/x86/pci/direct.c (pci_check_type1),
drivers/pci/probe.c (pci_scan_slot -> pci_scan_device -> pci_setup_device:
vendor/class/header, pci_intx_mask_broken, pci_read_irq, pci_read_bases with
__pci_read_base's sizing, pci_subsystem_ids, capability walks),
drivers/virtio/virtio_pci_modern_dev.c (vp_modern_probe: capability walk,
vp_modern_map_capability) and virtio_pci_modern.c / virtio.c (reset,
ACKNOWLEDGE, DRIVER, features, FEATURES_OK and re-read, setup_vq per queue,
queue enable after all queues, DRIVER_OK).
"""
import os
import select

import pytest

from lguest_jit import pci, testing, vring
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.testing import RecordingDevice

PCI_ROM_ADDRESS_MASK = 0xFFFFF800
PCI_COMMAND_DECODE_ENABLE = 0x3


class ConsoleLike(RecordingDevice):
    """Two queues of different maxima and an 8-byte config (cols, rows,
    max_nr_ports) so every structure is present."""
    device_type = 3
    name = "console"
    pci_class = (0x07, 0x80)        # a device declares its class (as devices.Console does)
    queue_max_sizes = (256, 64)
    features = 1 << vring.VIRTIO_RING_F_EVENT_IDX

    def __init__(self):
        super().__init__(bytes([80, 0, 25, 0, 1, 0, 0, 0]))


class Rng(RecordingDevice):
    device_type = 4
    name = "rng"
    queue_max_sizes = (128,)


class Linux:
    """The guest's config accessors (pci_conf1_read/write: an outl to 0xCF8
    for every access, then the data port at offset & 3)."""

    def __init__(self, bus):
        self.bus = bus

    def outl(self, port, v):
        self.bus.pio(port, 4, True, v)

    def inl(self, port):
        return self.bus.pio(port, 4, False, 0)

    def read(self, dev, off, size):
        return testing.conf1_read(self.bus, dev, off, size)

    def write(self, dev, off, size, v):
        testing.conf1_write(self.bus, dev, off, size, v)

    def find_capability(self, dev, cap_id, start=None):
        """__pci_find_next_cap_ttl: byte at the pointer, then a word per cap."""
        if start is None:
            status = self.read(dev, pci.PCI_STATUS, 2)
            if not status & pci.PCI_STATUS_CAP_LIST:
                return 0
            pos = self.read(dev, pci.PCI_CAPABILITY_LIST, 1)
        else:
            pos = self.read(dev, start + 1, 1)
        ttl = 48
        while ttl:
            ttl -= 1
            if pos < 0x40:
                break
            pos &= ~3
            ent = self.read(dev, pos, 2)
            if ent & 0xFF == 0xFF:
                break
            if ent & 0xFF == cap_id:
                return pos
            pos = ent >> 8
        return 0

    # MMIO accessors (ioread*/iowrite*)
    def r(self, addr, size):
        return self.bus.mmio(addr, size, False, 0)

    def w(self, addr, size, v):
        self.bus.mmio(addr, size, True, v)


def _pending(fd):
    return bool(select.select([fd], [], [], 0)[0])


def read_base(linux, dev, pos, rom, mmio_always_on=False):
    """__pci_read_base: returns (l, sz) and checks COMMAND is restored."""
    orig_cmd = None
    if not mmio_always_on:
        orig_cmd = linux.read(dev, pci.PCI_COMMAND, 2)
        if orig_cmd & PCI_COMMAND_DECODE_ENABLE:
            linux.write(dev, pci.PCI_COMMAND, 2, orig_cmd & ~PCI_COMMAND_DECODE_ENABLE)
    mask = PCI_ROM_ADDRESS_MASK if rom else 0xFFFFFFFF
    l = linux.read(dev, pos, 4)
    linux.write(dev, pos, 4, l | mask)
    sz = linux.read(dev, pos, 4)
    linux.write(dev, pos, 4, l)
    if orig_cmd is not None and orig_cmd & PCI_COMMAND_DECODE_ENABLE:
        linux.write(dev, pci.PCI_COMMAND, 2, orig_cmd)
    assert linux.read(dev, pos, 4) == l, "BAR not restored"
    return l, sz


@pytest.fixture(params=["per-queue", "single"])
def machine(request):
    gm = GuestMemory(8 << 20)
    lines = []
    bus = pci.Bus(gm, strict=True, notify_mode=request.param, log=lines.append)
    con = ConsoleLike()
    rng = Rng()
    tcon = bus.add_device(con)
    trng = bus.add_device(rng)
    yield bus, gm, (con, tcon), (rng, trng), lines
    bus.close()
    gm.close()


def test_linux_61_probe_replay(machine):
    bus, gm, (con, tcon), (rng, trng), lines = machine
    linux = Linux(bus)

    # --- arch/x86/pci/direct.c: pci_check_type1 --------------------------
    bus.pio(0xCFB, 1, True, 0x01)
    tmp = linux.inl(0xCF8)
    assert tmp == 0x01000000
    linux.outl(0xCF8, 0x80000000)
    assert linux.inl(0xCF8) == 0x80000000, "conf1 not detected"
    linux.outl(0xCF8, tmp)
    # pci_sanity_check: a host bridge (class 0x0600) answers on bus 0.
    found = False
    for devfn in range(0, 0x100):
        linux.outl(0xCF8, 0x80000000 | devfn << 8 | 0x08)
        cls = bus.pio(0xCFE, 2, False, 0)   # class at byte 2 of dword 8
        linux.outl(0xCF8, 0x80000000 | devfn << 8 | 0x00)
        vendor = bus.pio(0xCFC, 2, False, 0)
        if cls in (0x0600, 0x0300) or vendor in (0x8086, 0x0E11):
            found = True
            break
    assert found and devfn == 0 and cls == 0x0600

    # --- drivers/pci/probe.c: pci_scan_child_bus -> pci_scan_slot ---------
    present = {}
    for slot in range(32):
        l = linux.read(slot, pci.PCI_VENDOR_ID, 4)
        if l in (0xFFFFFFFF, 0, 0x0000FFFF, 0xFFFF0000):
            assert l == 0xFFFFFFFF     # empty slots read all-ones
            continue
        present[slot] = l
    assert present == {0: pci.HOST_BRIDGE_DEVICE << 16 | pci.HOST_BRIDGE_VENDOR,
                       1: 0x1043 << 16 | 0x1AF4, 2: 0x1044 << 16 | 0x1AF4}
    # Functions 1-7 of a single-function device are not probed; they must
    # read as absent anyway.
    assert testing.conf1_read(bus, 1, 0, 4) == 0x10431AF4
    bus.pio(0xCF8, 4, True, testing.conf1_address(1, 0, function=1))
    assert bus.pio(0xCFC, 4, False, 0) == 0xFFFFFFFF

    expected_class = {0: 0x060000, 1: 0x078000, 2: 0xFF0000}
    bar0 = {}
    for slot in present:
        hdr = linux.read(slot, pci.PCI_HEADER_TYPE, 1)
        assert hdr == 0                               # normal header, single function
        class_rev = linux.read(slot, pci.PCI_REVISION_ID, 4)
        assert class_rev >> 8 == expected_class[slot]
        assert class_rev & 0xFF == (0 if slot == 0 else 1)   # §4.1.2.1: revision >= 1
        # set_pcie_port_type / pci_init_capabilities: looking for the PCIe,
        # MSI, MSI-X and PM capabilities must walk the chain and find none.
        for cap in (0x10, 0x05, 0x11, 0x01, 0x14):
            assert linux.find_capability(slot, cap) == 0
        # pci_intx_mask_broken: toggle INTx disable, read back, restore.
        orig = linux.read(slot, pci.PCI_COMMAND, 2)
        assert orig == 0
        toggle = orig ^ pci.PCI_COMMAND_INTX_DISABLE
        linux.write(slot, pci.PCI_COMMAND, 2, toggle)
        assert linux.read(slot, pci.PCI_COMMAND, 2) == toggle   # masking works
        linux.write(slot, pci.PCI_COMMAND, 2, orig)
        assert linux.read(slot, pci.PCI_COMMAND, 2) == orig
        # pci_read_irq
        pin = linux.read(slot, pci.PCI_INTERRUPT_PIN, 1)
        if slot == 0:
            assert pin == 0
        else:
            assert pin == 1
            line = linux.read(slot, pci.PCI_INTERRUPT_LINE, 1)
            t = bus.slots[slot]
            assert line == t.irq_line and line not in (0, 1, 2, 4, 8, 12, 13, 14)
        # pci_read_bases(dev, 6, PCI_ROM_ADDRESS); host bridges are
        # mmio_always_on (quirk_mmio_always_on), so no COMMAND toggling.
        for i in range(6):
            l, sz = read_base(linux, slot, pci.PCI_BASE_ADDRESS_0 + 4 * i, rom=False, mmio_always_on=slot == 0)
            if slot != 0 and i == 0:
                assert l == bus.slots[slot].bar0 and l & 0xF == 0    # 32-bit memory BAR
                assert sz == (~(pci.BAR0_SIZE - 1)) & 0xFFFFFFFF
                bar0[slot] = l
            else:
                assert (l, sz) == (0, 0)                              # unimplemented
        l, sz = read_base(linux, slot, pci.PCI_ROM_ADDRESS, rom=True, mmio_always_on=slot == 0)
        assert (l, sz) == (0, 0)                                       # no ROM
        # pci_subsystem_ids
        sv = linux.read(slot, pci.PCI_SUBSYSTEM_VENDOR_ID, 2)
        sd = linux.read(slot, pci.PCI_SUBSYSTEM_ID, 2)
        if slot:
            assert sv == 0x1AF4 and sd >= 0x40
    assert bar0 == {1: tcon.bar0, 2: trng.bar0}
    assert bus.mmio(tcon.bar0 + 0x12, 2, False, 0) == 2   # BAR still decodes after sizing

    # --- drivers/virtio: virtio_pci_probe for each virtio device ----------
    for slot, (dev, t, nq, cfglen) in {1: (con, tcon, 2, 8), 2: (rng, trng, 1, 0)}.items():
        # pci_enable_device: decode on; pci_set_master; pcibios_set_master
        # programs the latency timer when it is below 16.
        cmd = linux.read(slot, pci.PCI_COMMAND, 2)
        linux.write(slot, pci.PCI_COMMAND, 2, cmd | pci.PCI_COMMAND_MEMORY)
        cmd = linux.read(slot, pci.PCI_COMMAND, 2)
        linux.write(slot, pci.PCI_COMMAND, 2, cmd | pci.PCI_COMMAND_MASTER)
        assert linux.read(slot, pci.PCI_COMMAND, 2) == pci.PCI_COMMAND_MEMORY | pci.PCI_COMMAND_MASTER
        if linux.read(slot, pci.PCI_LATENCY_TIMER, 1) < 16:
            linux.write(slot, pci.PCI_LATENCY_TIMER, 1, 64)
        assert linux.read(slot, pci.PCI_LATENCY_TIMER, 1) == 64

        # vp_modern_probe: device id range and the virtio id.
        device_id = linux.read(slot, pci.PCI_DEVICE_ID, 2)
        assert 0x1040 <= device_id <= 0x107F
        assert device_id - 0x1040 == dev.device_type

        # virtio_pci_find_capability for each type: walk vendor caps.
        def find(cfg_type):
            pos = linux.find_capability(slot, pci.PCI_CAP_ID_VNDR)
            while pos:
                typ = linux.read(slot, pos + 3, 1)
                bar = linux.read(slot, pos + 4, 1)
                if bar < 6 and typ == cfg_type:
                    return pos
                pos = linux.find_capability(slot, pci.PCI_CAP_ID_VNDR, start=pos)
            return 0

        def map_cap(pos, minlen, align, start, size):
            """vp_modern_map_capability: returns (bar offset, length)."""
            bar = linux.read(slot, pos + 4, 1)
            offset = linux.read(slot, pos + 8, 4)
            length = linux.read(slot, pos + 12, 4)
            assert bar == 0
            assert length > start and length - start >= minlen
            length -= start
            offset += start
            assert offset % align == 0
            length = min(length, size)
            assert offset + length <= pci.BAR0_SIZE          # fits pci_resource_len(BAR0)
            return offset, length

        common = find(pci.VIRTIO_PCI_CAP_COMMON_CFG)
        isr = find(pci.VIRTIO_PCI_CAP_ISR_CFG)
        notify = find(pci.VIRTIO_PCI_CAP_NOTIFY_CFG)
        device = find(pci.VIRTIO_PCI_CAP_DEVICE_CFG)
        window = find(pci.VIRTIO_PCI_CAP_PCI_CFG)
        assert common and isr and notify and window
        assert bool(device) == bool(cfglen)
        c_off, c_len = map_cap(common, 0x38, 4, 0, 0x3C)
        assert (c_off, c_len) == (0, 0x38)
        i_off, i_len = map_cap(isr, 1, 1, 0, 1)
        mult = linux.read(slot, notify + 16, 4)
        n_len = linux.read(slot, notify + 12, 4)
        n_off = linux.read(slot, notify + 8, 4)
        if bus.notify_mode == "single":
            assert mult == 0 and n_len == 2
        else:
            assert mult == 4 and n_len == 4 * nq      # §4.1.4.4.1: even power of 2
        assert n_len + (n_off % 4096) <= 4096         # so Linux maps it whole
        n_off, n_len = map_cap(notify, 2, 2, 0, n_len)
        if device:
            d_off, d_len = map_cap(device, 0, 4, 0, 4096)
            assert d_len == cfglen
        base = bar0[slot]
        C = base + c_off

        # register_virtio_device -> vp_reset: write 0, poll until 0.
        linux.w(C + 0x14, 1, 0)
        assert linux.r(C + 0x14, 1) == 0
        # virtio_add_status(ACKNOWLEDGE), then DRIVER (read-modify-write)
        for bit in (pci.ACKNOWLEDGE, pci.DRIVER):
            st = linux.r(C + 0x14, 1)
            linux.w(C + 0x14, 1, st | bit)
        assert linux.r(C + 0x14, 1) == pci.ACKNOWLEDGE | pci.DRIVER
        # vp_get_features
        linux.w(C + 0x00, 4, 0)
        lo = linux.r(C + 0x04, 4)
        linux.w(C + 0x00, 4, 1)
        hi = linux.r(C + 0x04, 4)
        offered = hi << 32 | lo
        assert offered == dev.features | 1 << 32
        # device config reads during feature negotiation are allowed
        if device:
            gen = linux.r(C + 0x15, 1)
            cols = linux.r(base + d_off, 2)
            rows = linux.r(base + d_off + 2, 2)
            ports = linux.r(base + d_off + 4, 4)
            assert (cols, rows, ports) == (80, 25, 1)
            assert linux.r(C + 0x15, 1) == gen
        # vp_finalize_features -> vp_modern_set_features
        accepted = offered
        linux.w(C + 0x08, 4, 0)
        linux.w(C + 0x0C, 4, accepted & 0xFFFFFFFF)
        linux.w(C + 0x08, 4, 1)
        linux.w(C + 0x0C, 4, accepted >> 32)
        # virtio_features_ok: add FEATURES_OK, re-read it
        st = linux.r(C + 0x14, 1)
        linux.w(C + 0x14, 1, st | pci.FEATURES_OK)
        assert linux.r(C + 0x14, 1) & pci.FEATURES_OK
        assert t.features == accepted

        # vp_modern_find_vqs -> vp_find_vqs_intx -> setup_vq for each queue
        rings = []
        for q in range(nq):
            assert linux.r(C + 0x12, 2) == nq            # num_queues
            linux.w(C + 0x16, 2, q)
            num = linux.r(C + 0x18, 2)                    # queue_size
            assert num == dev.queue_max_sizes[q]
            linux.w(C + 0x16, 2, q)
            assert linux.r(C + 0x1C, 2) == 0             # not yet enabled
            num = min(num, 64)                            # the driver may shrink it
            linux.w(C + 0x16, 2, q)
            linux.w(C + 0x18, 2, num)
            desc = 0x100000 + slot * 0x40000 + q * 0x10000
            avail = desc + 16 * num
            used = (avail + 6 + 2 * num + 3) & ~3
            linux.w(C + 0x16, 2, q)
            for off, addr in ((0x20, desc), (0x28, avail), (0x30, used)):
                linux.w(C + off, 4, addr & 0xFFFFFFFF)     # vp_iowrite64_twopart
                linux.w(C + off + 4, 4, addr >> 32)
            linux.w(C + 0x16, 2, q)
            noff = linux.r(C + 0x1E, 2)                   # queue_notify_off
            assert noff * mult + 2 <= n_len
            rings.append((num, desc, avail, used, base + n_off + noff * mult))
        # the per-queue registers survived the other queue's selection
        for q in range(nq):
            linux.w(C + 0x16, 2, q)
            assert linux.r(C + 0x18, 2) == rings[q][0]
            assert linux.r(C + 0x20, 4) == rings[q][1]
        # a queue past num_queues reads size 0 (§4.1.4.3.1)
        linux.w(C + 0x16, 2, nq)
        assert linux.r(C + 0x18, 2) == 0
        # vp_modern_find_vqs: enable all queues last
        for q in range(nq):
            linux.w(C + 0x16, 2, q)
            linux.w(C + 0x1C, 2, 1)
            assert linux.r(C + 0x1C, 2) == 1
        # virtio_device_ready
        st = linux.r(C + 0x14, 1)
        linux.w(C + 0x14, 1, st | pci.DRIVER_OK)
        assert linux.r(C + 0x14, 1) == 0x0F
        ctx = dev.ctx
        assert ctx is not None and ctx.features == accepted and ctx.mem is gm
        for q, (num, desc, avail, used, naddr) in enumerate(rings):
            qa = ctx.queues[q]
            assert (qa[vring.Q_SIZE], qa[vring.Q_DESC], qa[vring.Q_AVAIL], qa[vring.Q_USED]) == \
                (num, desc, avail, used)
            # vp_notify: iowrite16(queue index, notify address)
            linux.w(naddr, 2, q)
            assert _pending(ctx.notify_fds[q]) and os.eventfd_read(ctx.notify_fds[q]) == 1
            if bus.notify_mode == "per-queue":
                assert (naddr, 2, ctx.notify_fds[q]) in bus.ioeventfds()
        # vp_interrupt: the device sets ISR bit 0 then raises; the driver
        # reads ISR (clearing it).
        ctx.isr[0] |= 1
        os.eventfd_write(ctx.irq_fd, 1)
        assert bus.irq_pending(t.irq_line)
        assert linux.r(base + i_off, 1) == 1
        assert linux.r(base + i_off, 1) == 0
        assert not any(t2.isr[0] for t2 in bus.devices)
        assert os.eventfd_read(ctx.irq_fd) == 1
    assert any("DRIVER_OK" in line for line in lines)
