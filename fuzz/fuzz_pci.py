"""Target: PCI config/BAR/MMIO sequences on a bus of three devices: conf1
port accesses (BAR moves, sizing, COMMAND, the PCI_CFG window), MMIO
anywhere near the BARs, any width.  Nothing may raise (default policy);
after every step decoding and the ioeventfd list equal the plain decode
reference (tests/naive.bar_decode) and device status stays a valid prefix
of the §3.1.1 sequence."""
from __future__ import annotations

import numpy as np

import naive
from lguest_jit import pci
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
    bus = pci.Bus(_gm, notify_mode="single" if r.u8() & 1 else "per-queue")
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
                    bus.pio(0xCF8, 4, True, pci.conf1_address(t.slot, reg) if reg & 3 == 0 else r.u32())
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
                else:
                    reads.append(bus.mmio(addr, size, False, 0))
            _check(bus, ts)
    finally:
        bus.close()
    return digest(reads)


def _check(bus, ts):
    bars = {t.slot: pci._le(bus.cfg[t.slot], pci.PCI_BASE_ADDRESS_0, 4) for t in ts}
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


if __name__ == "__main__":
    main("fuzz.fuzz_pci")
