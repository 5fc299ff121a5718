"""The lguest backend against a simulated /dev/lguest.

The guest is a thread that executes real x86 instructions one trap at a
time (tests/lguest_sim.py): PCI enumeration over conf1 with ``in``/``out``
(trap 13), the virtio handshake and queue notifications with ``mov`` (trap
14), interrupts back through LHREQ_IRQ.  The launcher side is the real
backend, bus and devices.
"""
import errno
import os
import struct
import threading

import numpy as np
import pytest

from lguest_jit import pci, testing
from lguest_jit.devices import Block, Console, Rng
from lguest_jit.devices import block as blk
from lguest_jit.devices import console as con
from lguest_jit.hw import lguest as lg
from lguest_jit.hw.decode import decode_mmio, decode_pio
from lguest_jit.hw.memory import PAGE_SIZE, GuestMemory
from lguest_jit.testing import VirtioPciDriver

from lguest_sim import (CODE_PHYS, FORMS, USER_CS, SimulatedLguest, TrappedBus, mmio_insn,
                        pio_insn)

ENTRY = 0x100000
MEM = 32 << 20


class TrappedDriver(VirtioPciDriver):
    """Linux's virtio_pci_modern whose every device access traps; it takes
    interrupts from the simulated host and acknowledges them by reading ISR."""

    def __init__(self, sim, slot, gm, **kw):
        self.sim = sim
        super().__init__(TrappedBus(sim), slot, gm, **kw)
        self._seen = sim.irqs.get(self.irq_line, 0)

    def wait_interrupt(self, timeout):
        # The simulated host counts LHREQ_IRQs per line instead of an eventfd.
        now = self.sim.wait_irq(self.irq_line, self._seen, timeout)
        if now > self._seen:
            self._seen = now
            return True
        return False


class Machine:
    def __init__(self, devices=(), **kw):
        self.gm = GuestMemory(MEM)
        self.bus = pci.Bus(self.gm, notify_mode="single")
        self.transports = [self.bus.add_device(d) for d in devices]
        self.sim = SimulatedLguest(self.gm)
        self.logs = []
        self.be = lg.LguestBackend(self.gm, self.bus, ENTRY, host=self.sim, log=self.logs.append, **kw)
        self.result = None
        self.thread = None

    def start(self):
        def run():
            self.result = self.be.run()
        self.thread = threading.Thread(target=run, name="vcpu", daemon=True)
        self.thread.start()
        return self

    def finish(self, reason="guest test finished"):
        self.sim.die(reason)
        if self.thread is not None:
            self.thread.join(10)
            assert not self.thread.is_alive(), "run() did not return after the guest died"
        return self.result

    def close(self):
        if self.thread is not None and self.thread.is_alive():
            self.finish()
        self.bus.close()
        self.be.close()
        self.gm.close()


@pytest.fixture
def machines():
    made = []

    def make(devices=(), start=True, **kw):
        m = Machine(devices, **kw)
        made.append(m)
        return m.start() if start else m
    yield make
    for m in made:
        m.close()


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    return path


# ---------------------------------------------------------------------------
# Protocol details


def test_request_encoding():
    assert lg.encode_request(lg.LHREQ_SETREG, lg.REG["eip"], 0xC0100000, word_bytes=4) == \
        struct.pack("<3I", 6, 48, 0xC0100000)
    assert lg.encode_request(lg.LHREQ_IRQ, 5, word_bytes=8) == struct.pack("<2Q", 2, 5)
    assert lg.decode_request(struct.pack("<3I", 6, 48, 7), 4) == (6, 48, 7)
    with pytest.raises(ValueError, match="does not fit"):
        lg.encode_request(lg.LHREQ_INITIALIZE, 1 << 32, word_bytes=4)
    with pytest.raises(ValueError):
        lg.encode_request(lg.LHREQ_IRQ, 1, word_bytes=2)
    with pytest.raises(ValueError):
        lg.decode_request(b"\0" * 6, 4)
    # struct lguest_pending: u8 trap, u8 insn[7], u32 addr.
    assert lg.PENDING.size == 12
    assert lg.PENDING.pack(14, b"\x89\x05\0\0\0\xe0\0", 0xE0000014)[8:] == struct.pack("<I", 0xE0000014)
    # i386 user_regs_struct offsets the reference's getreg() macros produce.
    assert (lg.REG["ebx"], lg.REG["eax"], lg.REG["eip"], lg.REG["xcs"], lg.REG["esp"]) == (0, 24, 48, 52, 60)
    assert lg.REG_BY_NUMBER == (24, 4, 8, 0, 60, 20, 12, 16)


def test_initialize_arguments(machines):
    m = machines(start=False)
    assert m.sim.records[0] == ("init", m.gm.base, MEM // PAGE_SIZE, ENTRY, m.be.mmio_limit // PAGE_SIZE)
    assert m.be.mmio_limit == 1 << 32          # default: every page above RAM traps
    # The launcher passes the end of its BAR window; INITIALIZE carries it page-rounded.
    bars_end = 0xE0000000 + 2 * pci.BAR0_SIZE
    m2 = machines([Rng(), Rng()], start=False, mmio_limit=bars_end - 100)
    last = m2.transports[-1]
    assert m2.sim.init[3] * PAGE_SIZE == last.bar0 + pci.BAR0_SIZE == bars_end


def test_constructor_checks():
    gm = GuestMemory(1 << 20)
    try:
        with pytest.raises(ValueError, match="notify_mode='single'"):
            lg.LguestBackend(gm, pci.Bus(gm), 0, host=SimulatedLguest(gm))
        bus = pci.Bus(gm, notify_mode="single")
        with pytest.raises(ValueError, match="outside guest RAM"):
            lg.LguestBackend(gm, bus, 1 << 20, host=SimulatedLguest(gm))
        with pytest.raises(ValueError, match="above RAM"):
            lg.LguestBackend(gm, bus, 0, host=SimulatedLguest(gm), mmio_limit=4096)
        sim = SimulatedLguest(gm)
        lg.LguestBackend(gm, bus, 0, host=sim)
        with pytest.raises(lg.LguestError, match="LHREQ_INITIALIZE"):
            lg.LguestBackend(gm, bus, 0, host=sim)       # the host refuses a second INITIALIZE
    finally:
        gm.close()


def test_available(tmp_path):
    assert not lg.available(str(tmp_path / "lguest"))
    gm = GuestMemory(1 << 20)
    try:
        with pytest.raises(FileNotFoundError):
            lg.LguestBackend(gm, pci.Bus(gm, notify_mode="single"), 0, dev=str(tmp_path / "lguest"))
    finally:
        gm.close()
    (tmp_path / "lguest").touch()
    assert lg.available(str(tmp_path / "lguest"))


# ---------------------------------------------------------------------------
# Trap 13: port I/O


def test_port_io_forms_through_conf1(machines):
    m = machines()
    tb = TrappedBus(m.sim)
    for width in (4, 2, 1):
        # Host bridge vendor/device at 00:00.0, read through 0xCFC..0xCFF.
        tb.pio(0xCF8, 4, True, testing.conf1_address(0, 0))
        got = sum(tb.pio(0xCFC + i, width, False, 0) << 8 * i for i in range(0, 4, width))
        assert got == pci.HOST_BRIDGE_DEVICE << 16 | pci.HOST_BRIDGE_VENDOR
    # The address register reads back what was written (Linux's conf1 probe).
    tb.pio(0xCFB, 1, True, 0x01)
    assert tb.pio(0xCF8, 4, False, 0) >> 24 == 0x01
    # imm8 forms: ports below 0x100 alternate between DX and imm8 encodings.
    assert [tb.pio(0x80, 1, False, 0) for _ in range(2)] == [0xFF, 0xFF]
    assert m.sim.traps[lg.TRAP_GPF] == tb.n and m.be.stats.pio == tb.n
    assert m.finish().reason == "died"


def test_ps2_status_cli_and_reinjection(machines):
    m = machines()
    tb = TrappedBus(m.sim)
    tb.n = 1      # odd: imm8 form
    assert tb.pio(0x64, 1, False, 0) == 1            # in al, 0x64: "output buffer full"
    # cli: skipped, nothing else touched.
    before = m.sim.snapshot()
    after = m.sim.execute(lg.TRAP_GPF, b"\xfa", regs={"eip": before["eip"]})
    assert after == dict(before, eip=before["eip"] + 1) and m.sim.reinjected is None
    assert m.be.stats.assists["cli"] == 1
    # hlt is not ours to emulate; an out from guest user mode is not either.
    for insn, regs in ((b"\xf4", {}), (pio_insn(True, 1), {"xcs": USER_CS}), (b"\xf3\xee", {})):
        eip = m.sim.reg("eip")
        after = m.sim.execute(lg.TRAP_GPF, insn, regs=regs)
        assert m.sim.reinjected == lg.TRAP_GPF and after["eip"] == eip
        m.sim.regs[lg.REG["xcs"] // 4] = 0x61
    assert m.be.stats.assists["reinject13"] == 3
    assert any("user mode" in line for line in m.logs) and any("lock/rep" in line for line in m.logs)
    m.finish()


# ---------------------------------------------------------------------------
# Trap 14: MMIO


def test_assembler_matches_decoder_and_capstone():
    capstone = pytest.importorskip("capstone")
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    for form in FORMS:
        for width in (1, 2, 4):
            for is_write in (True, False):
                for reg, high in ((0, False), (3, True), (6, False)):
                    if width != 1 if high else (width == 1 and reg >= 4):
                        continue    # byte ops: reg fields 4..7 are AH..BH
                    insn = mmio_insn(is_write, width, reg, high, form, disp=0xE0000014)
                    d = decode_mmio(insn)
                    assert (d.length, d.reg, d.width, d.is_write, d.high) == (len(insn), reg, width, int(is_write), int(high))
                    (ci,) = md.disasm(insn, 0)
                    assert ci.size == len(insn) and ci.mnemonic == "mov"
    for is_write in (True, False):
        for width in (1, 2, 4):
            for imm in (None, 0x70):
                insn = pio_insn(is_write, width, imm)
                d = decode_pio(insn)
                assert (d.length, d.width, d.is_write, d.port) == (len(insn), width, int(is_write), -1 if imm is None else imm)
                (ci,) = md.disasm(insn, 0)
                assert ci.mnemonic == ("out" if is_write else "in")


def test_mmio_every_form_and_register(machines):
    m = machines([Rng()])
    t = m.transports[0]
    tb = TrappedBus(m.sim)
    common = t.bar0 + pci.COMMON_OFF
    # 32-, 16- and 8-bit fields written and read back through every form
    # and register, the high byte registers included.
    for i in range(len(FORMS) * 3):
        tb.mmio(common + 0x16, 2, True, 0)
        assert tb.mmio(common + 0x16, 2, False, 0) == 0
        assert tb.mmio(common + 0x18, 2, False, 0) == t.device.queue_max_sizes[0]      # queue_size
        tb.mmio(common + 0x14, 1, True, pci.ACKNOWLEDGE)                            # device_status
        assert tb.mmio(common + 0x14, 1, False, 0) == pci.ACKNOWLEDGE == t.status
        tb.mmio(common + 0x14, 1, True, 0)                                           # reset
        assert tb.mmio(common + 0x14, 1, False, 0) == 0
        tb.mmio(common + 0x00, 4, True, 1)                                           # device_feature_select
        assert tb.mmio(common + 0x04, 4, False, 0) == 1                              # VIRTIO_F_VERSION_1 (§6)
    assert m.sim.traps[lg.TRAP_PAGE_FAULT] == tb.n and m.be.stats.mmio == tb.n
    m.finish()


def test_long_instruction_is_refetched_from_guest_memory(machines):
    m = machines([Rng()])
    t = m.transports[0]
    insn = mmio_insn(False, 2, 1, form="sib_disp32", disp=0x12345678)   # 66 8B 8C C3 disp32: 8 bytes
    assert len(insn) == 8 and not decode_mmio(insn[:7]).ok
    eip = lg.GUEST_PAGE_OFFSET + CODE_PHYS
    after = m.sim.execute(lg.TRAP_PAGE_FAULT, insn, t.bar0 + 0x18, {"eip": eip, "ecx": 0xFFFF0000})
    assert after["eip"] == eip + 8 and after["ecx"] == 0xFFFF0000 | t.device.queue_max_sizes[0]
    # Memory that no longer starts with the host's bytes is not trusted.
    after = m.sim.execute(lg.TRAP_PAGE_FAULT, insn, t.bar0 + 0x18, {"eip": eip + 16},
                          memory_insn=b"\x90" + insn[1:])
    assert m.sim.reinjected == lg.TRAP_PAGE_FAULT and after["eip"] == eip + 16
    # Nor is an EIP outside the guest kernel's linear map.
    after = m.sim.execute(lg.TRAP_PAGE_FAULT, insn, t.bar0 + 0x18, {"eip": 0x08048000}, store=False)
    assert m.sim.reinjected == lg.TRAP_PAGE_FAULT and m.sim.reg("eip") == 0x08048000
    m.finish()


def test_mmio_reinjection(machines):
    m = machines([Rng()])
    t = m.transports[0]
    cases = [
        (mmio_insn(False, 4, 0), t.bar0 + pci.BAR0_SIZE + 0x10, "no device's BAR0"),   # past the last BAR
        (mmio_insn(False, 4, 0), t.bar0 + pci.BAR0_SIZE - 2, "no device's BAR0"),      # straddles its end
        (b"\x01\x05\x00\x00\x00\xe0\x00", t.bar0, "not a supported device access"),     # add [mem], eax
        (b"\x8b\xc1\x90\x90\x90\x90\x90", t.bar0, "register-to-register"),              # mov eax, ecx
    ]
    for insn, addr, why in cases:
        eip = m.sim.reg("eip")
        regs = m.sim.snapshot()
        after = m.sim.execute(lg.TRAP_PAGE_FAULT, insn, addr)
        assert m.sim.reinjected == lg.TRAP_PAGE_FAULT and after == regs and after["eip"] == eip
        assert why in m.logs[-1]
    m.finish()


def test_unknown_trap_ends_the_run(machines):
    m = machines(start=False)
    m.sim.post(6, b"\x0f\x0b" + bytes(5), 0)
    r = m.be.run()
    assert r.reason == "internal-error" and "unknown trap 6" in r.message and r.exit_status == 1


# ---------------------------------------------------------------------------
# Ending a run


def test_guest_death_reason(machines):
    m = machines(start=False)
    m.sim.die("Timer went backwards by 12 ms")
    r = m.be.run()
    assert (r.reason, r.message, r.exit_status) == ("died", "Timer went backwards by 12 ms", 1)
    assert "Timer went backwards" in r.report()


def test_restart(machines):
    m = machines(start=False)
    m.sim.request_restart()
    r = m.be.run()
    assert r.reason == "reboot" and r.exit_status is None


def test_stop_interrupts_a_waiting_run(machines):
    m = machines()
    with m.sim._cv:                                   # wait until run() blocks in pread
        assert m.sim._cv.wait_for(lambda: m.sim._resumed >= 1, 5)
    m.be.stop()
    m.thread.join(5)
    assert not m.thread.is_alive() and m.result.reason == "stopped"


def test_max_traps(machines):
    m = machines(start=False)
    m.sim.post(lg.TRAP_GPF, b"\xfa" + bytes(6))
    r = m.be.run(max_traps=1)
    assert r.reason == "stopped" and m.be.stats.total == 1


def test_device_interrupt_becomes_lhreq_irq(machines):
    m = machines([Rng(), Rng()])
    for t in m.transports:
        os.eventfd_write(t.irq_fd, 1)
        assert m.sim.wait_irq(t.irq_line, 0, 5) == 1
    assert ("irq", m.transports[1].irq_line) in m.sim.records
    m.finish()
    assert m.be.stats.intr == 2


def test_host_errors_end_the_run(machines, monkeypatch):
    m = machines([Rng()], start=False)
    real = m.sim.pwrite

    def no_setreg(data, offset):
        if lg.decode_request(data)[0] == lg.LHREQ_SETREG:
            raise OSError(errno.EFAULT, "Bad address")
        return real(data, offset)
    monkeypatch.setattr(m.sim, "pwrite", no_setreg)
    m.sim.post(lg.TRAP_GPF, b"\xfa" + bytes(6))
    r = m.be.run()
    assert r.reason == "internal-error" and "LHREQ_SETREG" in r.message and "Bad address" in r.message


def test_failed_interrupt_ends_the_run(machines, monkeypatch):
    m = machines([Rng()], start=False)
    real = m.sim.write

    def no_irq(data):
        if lg.decode_request(data)[0] == lg.LHREQ_IRQ:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(data)
    monkeypatch.setattr(m.sim, "write", no_irq)
    os.eventfd_write(m.transports[0].irq_fd, 1)
    r = m.be.run()
    assert r.reason == "internal-error" and f"raising interrupt {m.transports[0].irq_line}" in r.message


# ---------------------------------------------------------------------------
# Whole devices: enumeration to DRIVER_OK, then data, trap 13/14 only


def enumerate_like_linux(sim, want_slot):
    tb = TrappedBus(sim)
    found = {}
    for slot in range(8):
        tb.pio(0xCF8, 4, True, testing.conf1_address(slot, 0))
        vid = tb.pio(0xCFC, 4, False, 0)
        if vid != 0xFFFFFFFF:
            found[slot] = vid
    # BAR0 sizing, as pci_read_bases does it.
    addr = testing.conf1_address(want_slot, pci.PCI_BASE_ADDRESS_0)
    tb.pio(0xCF8, 4, True, addr)
    bar = tb.pio(0xCFC, 4, False, 0)
    tb.pio(0xCFC, 4, True, 0xFFFFFFFF)
    mask = tb.pio(0xCFC, 4, False, 0)
    tb.pio(0xCFC, 4, True, bar)
    assert tb.pio(0xCFC, 4, False, 0) == bar
    return found, bar, mask


def test_block_bring_up_and_data(machines, disk):
    m = machines([Block(str(disk))])
    t = m.transports[0]
    found, bar, mask = enumerate_like_linux(m.sim, t.slot)
    assert found == {0: pci.HOST_BRIDGE_DEVICE << 16 | pci.HOST_BRIDGE_VENDOR,
                     t.slot: (pci.VIRTIO_PCI_DEVICE_BASE + 2) << 16 | pci.VIRTIO_PCI_VENDOR}
    assert bar == t.bar0 and mask == (~(pci.BAR0_SIZE - 1)) & 0xFFFFFFFF
    drv = TrappedDriver(m.sim, t.slot, m.gm, slot_bytes=16384)
    assert drv.notify_mult == 0                       # lguest's single notify register
    drv.init()
    assert drv.status & pci.DRIVER_OK and t.status & pci.DRIVER_OK
    cap = drv.config_read(blk.CFG_CAPACITY, 4) | drv.config_read(blk.CFG_CAPACITY + 4, 4) << 32
    assert cap == (1 << 20) // 512

    ref = bytearray(disk.read_bytes())
    kicks = []

    def request(rtype, sector, out=(), in_lens=()):
        drv.queues[0].add(out=[struct.pack("<IIQ", rtype, 0, sector), *out], in_=[*in_lens, 1])
        kicks.append(drv.kick(0))       # False when the device is awake (event idx)
        head, length, data = drv.wait_used(0)
        return data[-1][0], length, data[:-1]

    status, length, data = request(blk.T_IN, 8, in_lens=[4096])
    assert status == blk.BLK_S_OK and length == 4097 and data[0] == ref[4096:8192]
    payload = os.urandom(8192)
    status, length, _ = request(blk.T_OUT, 100, out=[payload])
    assert status == blk.BLK_S_OK and length == 1
    ref[100 * 512:100 * 512 + 8192] = payload
    status, _, data = request(blk.T_IN, 100, in_lens=[8192])
    assert status == blk.BLK_S_OK and data[0] == payload
    assert disk.read_bytes() == ref

    # Each kick was one 16-bit write of the queue index to the single notify register.
    notifies = [a for a in drv.bus.accesses if a[:2] == ("mmio", t.notify_gpa(0))]
    assert notifies == [("mmio", t.notify_gpa(0), 2, True, 0)] * sum(kicks)
    # Everything went through traps and interrupts: no eventfd on the guest side.
    assert drv.irq_fd is None and m.sim.wait_irq(t.irq_line, 0, 5) >= 1
    assert m.sim.traps[lg.TRAP_GPF] > 20 and m.sim.traps[lg.TRAP_PAGE_FAULT] > 30
    assert m.sim.reinjected is None and "reinject13" not in m.be.stats.assists
    r = m.finish("poweroff")
    assert r.reason == "died" and r.message == "poweroff"


def test_console_data_both_ways(machines):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        m = machines([Console(input_fd=in_r, output_fd=out_w)])
        t = m.transports[0]
        drv = TrappedDriver(m.sim, t.slot, m.gm)
        assert drv.device_id == pci.VIRTIO_PCI_DEVICE_BASE + con.VIRTIO_ID_CONSOLE
        drv.init()
        assert t.status & pci.DRIVER_OK
        # Guest -> host: the transmit queue to the output fd.
        msg = b"Linux version 4.14 (lguest)\n"
        drv.queues[con.TRANSMITQ].add(out=[msg])
        drv.kick(con.TRANSMITQ)
        _, length, _ = drv.wait_used(con.TRANSMITQ)
        assert os.read(out_r, 4096) == msg
        # Host -> guest: typed input lands in a posted receive buffer.
        drv.queues[con.RECEIVEQ].add(in_=[64])
        drv.kick(con.RECEIVEQ)
        os.write(in_w, b"root\n")
        _, length, data = drv.wait_used(con.RECEIVEQ)
        assert data[0][:length] == b"root\n"
        assert m.sim.wait_irq(t.irq_line, 0, 5) >= 1     # completions interrupt through LHREQ_IRQ
        m.finish()
        m.bus.close()
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)
