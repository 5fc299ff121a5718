"""Target: PCI config/BAR/MMIO sequences on a bus of three devices: conf1
port accesses (BAR moves, sizing, COMMAND, the PCI_CFG window), MMIO
anywhere near the BARs, any width.  Nothing may raise (default policy);
after every step decoding and the ioeventfd list equal the plain decode
reference (tests/naive.bar_decode) and device status stays a valid prefix
of the §3.1.1 sequence.  Half the inputs give the devices MSI-X (table and
PBA at the top of each BAR): its state must stay what the capability and
the table say (mask bits, pending bits, enable bits), and every config
interrupt raised on the way must go where they say."""
from __future__ import annotations

import numpy as np

import naive
from lguest_jit import pci, testing
from lguest_jit.hw.memory import GuestMemory

from .common import Reader, digest, main

_gm = None
# BAR-sized pages: where the BARs start, beside them, far away, the top.
PAGES = tuple(a >> pci.BAR0_SHIFT for a in (0xE0000000, 0xE0002000, 0xE0004000, 0xE0006000, 0xF0000000,
                                            0xFFFFE000))
VALID = {0, 1, 3, 11, 15}       # ACK, ACK|DRIVER, +FEATURES_OK, +DRIVER_OK (FAILED/NEEDS_RESET masked)


class Dev(pci.VirtioDevice):
    def __init__(self, kind, nq):
        self.device_type, self.name = kind, f"dev{kind}"
        self.queue_max_sizes = (8,) * nq
        self.features = 1 << 28
        self.config = np.arange(8 * kind, dtype=np.uint8)

    def config_write(self, offset, size, value):
        return offset == 0 and size == 1


def one_input(data: bytes) -> str:
    global _gm
    if _gm is None:
        _gm = GuestMemory(1 << 20)
    r = Reader(data)
    flags = r.u8()
    bus = pci.Bus(_gm, notify_mode="single" if flags & 1 else "per-queue", msix=bool(flags & 2))
    ts = [bus.add_device(Dev(k, nq)) for k, nq in ((2, 1), (3, 2), (4, 1))]
    reads = []
    try:
        for _ in range(min(r.left() // 4, 200)):
            op = r.u8()
            size = (1, 2, 4, 8)[op >> 6 & 3]
            if op & 1:
                port = 0xCF8 + (r.u8() & 7)
                size = min(size, 4)
                if op & 2:
                    # a whole conf1 cycle: address, then data
                    t = ts[r.u8() % 3]
                    reg = r.u8()
                    bus.pio(0xCF8, 4, True, testing.conf1_address(t.slot, reg) if reg & 3 == 0 else r.u32())
                    port = 0xCFC + (reg & 3)
                if op & 4:
                    bar = r.pick(PAGES) << pci.BAR0_SHIFT | r.u16() & (pci.BAR0_SIZE - 1)
                    bus.pio(port, size, True, bar if op & 8 else r.u32())
                else:
                    reads.append(bus.pio(port, size, False, 0))
            else:
                addr = r.pick(PAGES) << pci.BAR0_SHIFT | r.u16() & (pci.BAR0_SIZE - 1)
                if op & 4:
                    bus.mmio(addr, size, True, r.u64() if op & 8 else r.u8())
                elif op & 8 and op & 0x30 == 0x30:
                    ts[op >> 1 & 1].config_changed()     # a config interrupt, wherever it is mapped
                else:
                    reads.append(bus.mmio(addr, size, False, 0))
            _check(bus, ts)
    finally:
        bus.close()
    return digest(reads)


def _check(bus, ts):
    bars = {t.slot: pci.read_le(bus.cfg[t.slot], pci.PCI_BASE_ADDRESS_0, 4) for t in ts}
    want = naive.bar_decode(bars, pci.BAR0_SIZE)
    got = {page: t.slot for page, t in bus._pages.items()}
    assert got == want, (got, want, bars)
    if bus.notify_mode == "per-queue":
        want_fds = sorted((p << pci.BAR0_SHIFT) + pci.NOTIFY_OFF + 4 * q for p, s in want.items()
                          for q in range(len(bus.slots[s].notify_fds)))
        assert sorted(g for g, _l, _f in bus.ioeventfds()) == want_fds
    for t in ts:
        assert t.status & 0x3F & ~pci.DEVICE_NEEDS_RESET in VALID, hex(t.status)
        assert not (t.active and not t.status & pci.DRIVER_OK), "active without DRIVER_OK"
        _check_msix(bus, t)


def _check_msix(bus, t):
    m, n = t.msix, t.msix_vectors
    assert m[0, pci.MX_VECTORS] == n
    assert not m[1 + n:].any(), "state beyond the table"
    if not n:
        assert not m[0, pci.MX_ENABLED] and t.msix_cap == 0
        return
    ctl = pci.read_le(bus.cfg[t.slot], t.msix_cap + pci.PCI_MSIX_FLAGS, 2)
    assert ctl & pci.PCI_MSIX_FLAGS_QSIZE == n - 1
    assert m[0, pci.MX_ENABLED] == bool(ctl & pci.PCI_MSIX_FLAGS_ENABLE)
    assert m[0, pci.MX_MASKED] == bool(ctl & pci.PCI_MSIX_FLAGS_MASKALL)
    rows = m[1:1 + n]
    assert set(rows[:, pci.MV_CTRL]) <= {0, 1} and set(rows[:, pci.MV_PENDING]) <= {0, 1}
    assert (rows[:, pci.MV_ADDR_LO] & 3 == 0).all() and (rows[:, :pci.MV_CTRL] >> 32 == 0).all()
    # While vectors can send, only a masked one holds a pending bit.
    if m[0, pci.MX_ENABLED] and not m[0, pci.MX_MASKED]:
        assert not (rows[:, pci.MV_PENDING] & (1 - rows[:, pci.MV_CTRL])).any(), "pending while unmasked"


if __name__ == "__main__":
    main("fuzz.fuzz_pci")
