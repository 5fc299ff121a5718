"""The KVM backend, driven by tiny guests assembled here (no Linux).

Under PVM (software KVM) CPL3 code runs natively and CPL0 code is emulated,
and PVM does not honour IOPL for CPL3 port I/O (an ``out`` at CPL3 raises
#GP), so port-I/O guests run at CPL0 and stay a few dozen instructions;
MMIO and notification guests run at CPL3.
"""
import os
import struct
import threading

import pytest

from lguest_jit import pci
from lguest_jit.hw import kvm as K
from lguest_jit.hw.kvm import RunResult, kvm_sregs, translate
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.hw.tinyguest import CODE, DATA, RAX, RCX, RDI, RDX, RSI, USTACK_TOP, Asm, setup_long_mode
from lguest_jit.hw.uart import COM1, Uart8250
from lguest_jit.vcpu import KvmVm

KVM_MISSING = K.kvm_available()
needs_kvm = pytest.mark.skipif(KVM_MISSING is not None, reason=f"no usable KVM: {KVM_MISSING}")

DONE_PORT = 0xF4          # a write here stops the run (like QEMU's isa-debug-exit)
MMIO_BASE = 0xE0000000    # above RAM: no memory slot, so accesses exit as MMIO
READY_PORT, COUNT_PORT = 0x510, 0x511   # free ports (0x40-0x43 belong to the in-kernel PIT)
RUN_TIMEOUT = 10.0        # a broken guest fails the test instead of hanging it


class FakeBus(pci.Bus):
    """A PCI bus with no devices whose Python fallback records every
    access nobody claimed and answers with predictable values; ioeventfds,
    interrupts and irq_pending come from the test."""

    def __init__(self, gm):
        super().__init__(gm)
        self.set_fallback(pio=self.on_pio, mmio=self.on_mmio)
        self.accesses = []
        self.vm = None
        self.notify = []                # (gpa, length, eventfd)
        self.irqs = []                  # (line, eventfd)
        self.pending_answers = {}       # line -> list of bools irq_pending returns, then False
        self.pending_calls = 0
        self.on_port = {}               # port -> callable run on a write there

    def on_pio(self, port, size, is_write, value):
        self.accesses.append(("pio", port, size, is_write, value))
        if is_write:
            if port == DONE_PORT:
                self.vm.stop()
            if port in self.on_port:
                self.on_port[port]()
            return 0
        # Reads: a value that shows port and width were decoded right.
        return (0xA5C3E100 | port) & ((1 << (8 * size)) - 1)

    def on_mmio(self, addr, size, is_write, value):
        self.accesses.append(("mmio", addr, size, is_write, value))
        if is_write:
            return 0
        return 0x0102030405060708 + (addr & 0xFF)

    def ioeventfds(self):
        return list(self.notify)

    def interrupts(self):
        return list(self.irqs)

    def irq_pending(self, line):
        self.pending_calls += 1
        answers = self.pending_answers.get(line, [])
        return answers.pop(0) if answers else False


@pytest.fixture
def gm():
    g = GuestMemory(4 << 20)
    yield g
    g.close()


def make_vm(gm, bus, **kw):
    vm = KvmVm(gm, bus, **kw)
    bus.vm = vm
    return vm


def done(a: Asm) -> Asm:
    """Tail of every CPL0 guest: write DONE_PORT (stops the run), then spin."""
    return a.mov_imm32(RDX, DONE_PORT).out(1).label("spin").jmp("spin")


def mmio_done(a: Asm) -> Asm:
    """Tail of CPL3 guests (no port I/O at CPL3 under PVM): a write to the
    last MMIO byte stops the run through the bus."""
    return a.mov_imm64(RDI, MMIO_BASE + 0xFFF).store_rdi(1).label("spin").jmp("spin")


class StopOnMmioBus(FakeBus):
    def on_mmio(self, addr, size, is_write, value):
        if is_write and addr == MMIO_BASE + 0xFFF:
            self.vm.stop()
            return 0
        return super().on_mmio(addr, size, is_write, value)


# ---------------------------------------------------------------------------
# No KVM needed


def test_ioctl_numbers_match_linux_headers():
    # Values from <linux/kvm.h> as compiled on x86-64 (e.g. strace output).
    assert K.KVM_GET_API_VERSION == 0xAE00
    assert K.KVM_CREATE_VM == 0xAE01
    assert K.KVM_RUN == 0xAE80
    assert K.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert K.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert K.KVM_SET_IDENTITY_MAP_ADDR == 0x4008AE48
    assert K.KVM_IRQ_LINE == 0x4008AE61
    assert K.KVM_IRQFD == 0x4020AE76
    assert K.KVM_CREATE_PIT2 == 0x4040AE77
    assert K.KVM_IOEVENTFD == 0x4040AE79
    assert K.KVM_GET_REGS == 0x8090AE81
    assert K.KVM_SET_REGS == 0x4090AE82
    assert K.KVM_GET_SREGS == 0x8138AE83
    assert K.KVM_SET_CPUID2 == 0x4008AE90
    assert K.KVM_GET_VCPU_EVENTS == 0x8040AE9F
    assert K.KVM_SET_VCPU_EVENTS == 0x4040AEA0


class _Ram:
    """Sparse fake guest RAM for the page-table walker."""

    def __init__(self, size=1 << 32):
        self.size = size
        self.words = {}

    def put(self, addr, val):
        self.words[addr] = val

    def u64(self, addr):
        return None if addr + 8 > self.size else self.words.get(addr, 0)

    def u32(self, addr):
        return None if addr + 4 > self.size else self.words.get(addr, 0) & 0xFFFFFFFF


def _sregs(cr0, cr3, cr4=0, efer=0):
    s = kvm_sregs()
    s.cr0, s.cr3, s.cr4, s.efer = cr0, cr3, cr4, efer
    return s


def test_translate_four_level_pages():
    ram = _Ram()
    s = _sregs(K.CR0_PE | K.CR0_PG, 0x1000, K.CR4_PAE, K.EFER_LME | K.EFER_LMA)
    va = 0xFFFF_8000_1234_5678
    i4, i3, i2, i1 = (va >> 39) & 511, (va >> 30) & 511, (va >> 21) & 511, (va >> 12) & 511
    ram.put(0x1000 + i4 * 8, 0x2000 | 1)
    ram.put(0x2000 + i3 * 8, 0x3000 | 1)
    ram.put(0x3000 + i2 * 8, 0x4000 | 1)
    ram.put(0x4000 + i1 * 8, 0xABCD000 | 1 | (1 << 63))   # NX bit is not address
    assert translate(ram.u64, ram.u32, s, va) == 0xABCD678
    ram.put(0x3000 + i2 * 8, 0x40000000 | 0x81)            # 2 MiB page
    assert translate(ram.u64, ram.u32, s, va) == 0x40000000 | (va & 0x1FFFFF)
    ram.put(0x2000 + i3 * 8, 0x80000000 | 0x81)            # 1 GiB page
    assert translate(ram.u64, ram.u32, s, va) == 0x80000000 | (va & 0x3FFFFFFF)
    ram.put(0x2000 + i3 * 8, 0)                            # not present
    assert translate(ram.u64, ram.u32, s, va) is None
    ram.put(0x1000 + i4 * 8, 0xFFFFF000 | 1)               # table past the end of RAM
    small = _Ram(size=0x10000)
    small.words = ram.words
    assert translate(small.u64, small.u32, s, va) is None


def test_translate_pae_and_legacy_32bit():
    ram = _Ram()
    pae = _sregs(K.CR0_PE | K.CR0_PG, 0x1020, K.CR4_PAE)
    va = 0xC0123456
    ram.put(0x1020 + 3 * 8, 0x5000 | 1)
    ram.put(0x5000 + ((va >> 21) & 511) * 8, 0x6000 | 1)
    ram.put(0x6000 + ((va >> 12) & 511) * 8, 0x77000 | 1)
    assert translate(ram.u64, ram.u32, pae, va) == 0x77456
    legacy = _sregs(K.CR0_PE | K.CR0_PG, 0x8000, K.CR4_PSE)
    ram.put(0x8000 + (va >> 22) * 4, 0x9000 | 1)
    ram.put(0x9000 + ((va >> 12) & 0x3FF) * 4, 0x123000 | 1)
    assert translate(ram.u64, ram.u32, legacy, va) == 0x123456
    ram.put(0x8000 + (va >> 22) * 4, 0x01C00000 | 0x81)     # 4 MiB page
    assert translate(ram.u64, ram.u32, legacy, va) == 0x01C00000 | (va & 0x3FFFFF)
    assert translate(ram.u64, ram.u32, _sregs(K.CR0_PE, 0), 0x1234) == 0x1234   # paging off


def test_run_result_exit_status():
    assert RunResult("poweroff").exit_status == 0
    assert RunResult("halt").exit_status == 0
    assert RunResult("reboot").exit_status is None
    assert RunResult("internal-error").exit_status == 1
    assert RunResult("shutdown").exit_status == 1
    rep = RunResult("internal-error", "x", {"rip": 0x10}, b"\x0f\xae\x17").report()
    assert "0f ae 17" in rep and "rip=0x0000000000000010" in rep


def test_uart_transmits_and_latches():
    out = []
    u = Uart8250(output=out.append)
    for ch in b"hi\n":
        u.pio(COM1, 1, True, ch)
    assert b"".join(out) == b"hi\n"
    assert u.pio(COM1 + 5, 1, False, 0) == 0x60          # LSR: THRE|TEMT
    assert u.pio(COM1 + 2, 1, False, 0) == 0x01          # IIR: no interrupt
    u.pio(COM1 + 3, 1, True, 0x83)                       # DLAB on
    u.pio(COM1, 1, True, 0x01)                           # DLL, not THR
    u.pio(COM1 + 1, 1, True, 0x00)                       # DLM
    assert b"".join(out) == b"hi\n"
    assert (u.pio(COM1, 1, False, 0), u.pio(COM1 + 1, 1, False, 0)) == (0x01, 0x00)
    u.pio(COM1 + 3, 1, True, 0x03)                       # 8N1, DLAB off
    u.pio(COM1 + 7, 1, True, 0x5A)
    assert u.pio(COM1 + 7, 1, False, 0) == 0x5A
    assert u.pio(COM1 + 3, 1, False, 0) == 0x03
    u.pio(COM1 + 4, 1, True, 0x1A)                       # loopback, RTS, OUT2: Linux's probe
    assert u.pio(COM1 + 6, 1, False, 0) & 0xF0 == 0x90
    u.pio(COM1, 1, True, ord("x"))                       # looped back, not sent
    assert b"".join(out) == b"hi\n"


def test_uart_thre_interrupt():
    levels = []
    u = Uart8250(output=lambda b: None, set_irq=levels.append)
    u.pio(COM1 + 1, 1, True, 0x02)                       # enable THRI: fires at once
    assert levels[-1] is True
    assert u.pio(COM1 + 2, 1, False, 0) == 0x02          # IIR says THRE and clears it
    assert levels[-1] is False
    assert u.pio(COM1 + 2, 1, False, 0) == 0x01
    u.pio(COM1, 1, True, ord("a"))
    assert levels[-1] is True


# ---------------------------------------------------------------------------
# Tiny guests


@needs_kvm
def test_port_io_each_width(gm):
    bus = FakeBus(gm)
    vm = make_vm(gm, bus)
    a = Asm()
    a.mov_imm32(RDI, DATA)
    for size, port in ((1, 0x80), (2, 0x82), (4, 0x84)):
        a.mov_imm32(RDX, port).inp(size).store_rdi(size)          # read, keep in memory
        a.mov_imm32(RAX, 0x11223344).out(size)                    # write a known value
        a.raw(b"\x48\x83\xc7\x08")                                # add rdi, 8
    setup_long_mode(vm, bytes(done(a)), cpl=0)
    res = vm.run(timeout=RUN_TIMEOUT)
    vm.close()
    assert res.reason == "stopped", res.report()
    assert [e for e in bus.accesses if e[1] != DONE_PORT] == [
        ("pio", 0x80, 1, False, 0), ("pio", 0x80, 1, True, 0x44),
        ("pio", 0x82, 2, False, 0), ("pio", 0x82, 2, True, 0x3344),
        ("pio", 0x84, 4, False, 0), ("pio", 0x84, 4, True, 0x11223344)]
    assert gm.read(DATA, 1) == bytes([0x80])
    assert gm.read(DATA + 8, 2) == struct.pack("<H", 0xE182)
    assert gm.read(DATA + 16, 4) == struct.pack("<I", 0xA5C3E184)
    assert vm.stats.pio == 7


@needs_kvm
def test_string_port_io(gm):
    bus = FakeBus(gm)
    vm = make_vm(gm, bus)
    gm.write(DATA, b"string I/O")
    a = Asm()
    a.mov_imm32(RSI, DATA).mov_imm32(RCX, 10).mov_imm32(RDX, 0x90).rep_outsb()
    a.mov_imm32(RDI, DATA + 0x100).mov_imm32(RCX, 4).mov_imm32(RDX, 0x91).rep_insb()
    setup_long_mode(vm, bytes(done(a)), cpl=0)
    res = vm.run(timeout=RUN_TIMEOUT)
    vm.close()
    assert res.reason == "stopped", res.report()
    outs = bytes(e[4] for e in bus.accesses if e[1] == 0x90)
    assert outs == b"string I/O"
    assert gm.read(DATA + 0x100, 4) == bytes([0x91] * 4)


@needs_kvm
def test_mmio_each_width_at_cpl3(gm):
    bus = StopOnMmioBus(gm)
    vm = make_vm(gm, bus)
    a = Asm()
    a.mov_imm32(RSI, DATA)
    for i, size in enumerate((1, 2, 4, 8)):
        a.mov_imm64(RAX, 0).mov_imm64(RDI, MMIO_BASE + 0x10 * i).load_rdi(size).store_rsi_rax().add_rsi_8()
        a.mov_imm64(RAX, 0xF1E2D3C4B5A69788).mov_imm64(RDI, MMIO_BASE + 0x100 + 0x10 * i).store_rdi(size)
    setup_long_mode(vm, bytes(mmio_done(a)), cpl=3)
    res = vm.run(timeout=RUN_TIMEOUT)
    regs = vm.get_sregs()
    vm.close()
    assert res.reason == "stopped", res.report()
    assert regs.cs.dpl == 3
    reads = [e for e in bus.accesses if not e[3]]
    writes = [e for e in bus.accesses if e[3]]
    assert [(e[1], e[2]) for e in reads] == [(MMIO_BASE + 0x10 * i, s) for i, s in enumerate((1, 2, 4, 8))]
    assert writes == [("mmio", MMIO_BASE + 0x100 + 0x10 * i, s, True, 0xF1E2D3C4B5A69788 & ((1 << 8 * s) - 1))
                      for i, s in enumerate((1, 2, 4, 8))]
    got = struct.unpack("<4Q", gm.read(DATA, 32))
    want = [(0x0102030405060708 + 0x10 * i) & ((1 << 8 * s) - 1) for i, s in enumerate((1, 2, 4, 8))]
    assert list(got) == want


@needs_kvm
def test_uart_prints_guest_string(gm):
    bus = FakeBus(gm)
    out = []
    Uart8250(output=out.append).register(bus)
    vm = make_vm(gm, bus)
    gm.write(DATA, b"Hello from the guest\n")
    a = Asm()
    a.mov_imm32(RSI, DATA).mov_imm32(RCX, 21).mov_imm32(RDX, COM1).rep_outsb()
    a.mov_imm32(RDX, COM1 + 5).inp(1).mov_imm32(RDI, DATA + 0x40).store_rdi(1)     # LSR
    setup_long_mode(vm, bytes(done(a)), cpl=0)
    res = vm.run(timeout=RUN_TIMEOUT)
    vm.close()
    assert res.reason == "stopped", res.report()
    assert b"".join(out) == b"Hello from the guest\n"
    assert gm.read(DATA + 0x40, 1) == b"\x60"


@needs_kvm
def test_hlt_with_interrupts_off_ends_the_run(gm):
    bus = FakeBus(gm)
    vm = make_vm(gm, bus)
    setup_long_mode(vm, bytes(Asm().cli().hlt()), cpl=0)
    res = vm.run(timeout=RUN_TIMEOUT, halt_poll=0.05)
    vm.close()
    assert res.reason == "halt", res.report()
    assert res.exit_status == 0
    assert res.regs["rip"] == CODE + 2


@needs_kvm
def test_stop_from_another_thread_ends_a_spinning_guest(gm):
    vm = make_vm(gm, FakeBus(gm))
    setup_long_mode(vm, bytes(Asm().label("x").jmp("x")), cpl=3)
    threading.Timer(0.2, vm.stop).start()
    res = vm.run(timeout=RUN_TIMEOUT, halt_poll=None)
    vm.close()
    assert res.reason == "stopped"


def _bp_handler() -> bytes:
    # CPL0 #BP handler: out 0x30 <- 3, return (the pushed RIP is after int3).
    h = Asm(0x11000)
    h.push_rax().push_rdx().mov_imm32(RDX, 0x30).mov_imm32(RAX, 3).out(1).pop_rdx().pop_rax().iretq()
    return bytes(h)


@needs_kvm
def test_int3_and_fwait_are_assisted_at_cpl0(gm):
    bus = FakeBus(gm)
    vm = make_vm(gm, bus)
    gm.write(0x11000, _bp_handler())
    a = Asm()
    a.fwait().mov_imm32(RDX, 0x31).mov_imm32(RAX, 1).out(1)
    a.int3().mov_imm32(RDX, 0x31).mov_imm32(RAX, 2).out(1)
    setup_long_mode(vm, bytes(done(a)), cpl=0, handlers={3: 0x11000})
    res = vm.run(timeout=RUN_TIMEOUT)
    vm.close()
    assert res.reason == "stopped", res.report()
    assert [(e[1], e[4]) for e in bus.accesses] == [(0x31, 1), (0x30, 3), (0x31, 2), (DONE_PORT, 2)]
    assert vm.stats.assists == {"fwait": 1, "int3": 1}


@needs_kvm
def test_int3_at_cpl3_needs_no_assist(gm):
    bus = StopOnMmioBus(gm)
    vm = make_vm(gm, bus)
    gm.write(0x11000, _bp_handler())
    a = Asm().int3()
    setup_long_mode(vm, bytes(mmio_done(a)), cpl=3, handlers={3: 0x11000})
    res = vm.run(timeout=RUN_TIMEOUT)
    vm.close()
    assert res.reason == "stopped", res.report()
    assert ("pio", 0x30, 1, True, 3) in bus.accesses
    assert vm.stats.assists == {}


@needs_kvm
def test_unassisted_emulation_failure_is_fatal_with_bytes(gm):
    vm = make_vm(gm, FakeBus(gm))
    a = Asm().mov_imm32(RDI, DATA).raw(b"\x0f\xae\x17")     # ldmxcsr [rdi]: the emulator refuses it
    setup_long_mode(vm, bytes(done(a)), cpl=0)
    res = vm.run(timeout=RUN_TIMEOUT)
    vm.close()
    if res.reason == "stopped":
        pytest.skip("this host's KVM emulates ldmxcsr")
    assert res.reason == "internal-error", res.report()
    assert res.insn.startswith(b"\x0f\xae\x17")
    assert res.regs["rip"] == CODE + 5
    assert res.exit_status == 1


@needs_kvm
def test_assist_loop_is_refused(gm):
    # The #BP handler returns to the int3 itself: same RIP assisted forever.
    vm = make_vm(gm, FakeBus(gm))
    gm.write(0x11000, bytes(Asm(0x11000).raw(b"\x48\xff\x0c\x24").iretq()))   # dec qword [rsp]; iretq
    setup_long_mode(vm, bytes(Asm().int3()), cpl=0, handlers={3: 0x11000})
    res = vm.run(timeout=RUN_TIMEOUT)
    vm.close()
    assert res.reason == "internal-error", res.report()
    assert "not making progress" in res.message
    # The first return through the handler may leave other RFLAGS than the
    # initial ones, so the identical-state run starts at the first or second.
    assert K.ASSIST_REPEAT_LIMIT - 1 <= vm.stats.assists["int3"] <= K.ASSIST_REPEAT_LIMIT


@needs_kvm
def test_assisted_instruction_in_a_loop_is_not_a_stuck_guest(gm):
    # Linux's fpu__drop runs one fwait per exiting task: the same RIP is
    # assisted many times in a row while the guest makes progress.
    vm = make_vm(gm, FakeBus(gm))
    a = Asm().mov_imm32(RCX, 100).label("again").fwait().dec_ecx().jnz("again")
    setup_long_mode(vm, bytes(done(a)), cpl=0)
    res = vm.run(timeout=RUN_TIMEOUT)
    vm.close()
    assert res.reason == "stopped", res.report()
    assert vm.stats.assists["fwait"] == 100


@needs_kvm
def test_ioeventfd_signals_without_an_exit(gm):
    bus = StopOnMmioBus(gm)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    bus.notify.append((MMIO_BASE + 0x3000, 2, efd))
    vm = make_vm(gm, bus)
    a = Asm()
    a.mov_imm64(RAX, 5).mov_imm64(RDI, MMIO_BASE + 0x3000).store_rdi(2).store_rdi(2)   # notify queue 5, twice
    a.mov_imm64(RDI, MMIO_BASE + 0x3008).store_rdi(2)                               # not a notify address
    setup_long_mode(vm, bytes(mmio_done(a)), cpl=3)
    res = vm.run(timeout=RUN_TIMEOUT)
    vm.close()
    try:
        assert res.reason == "stopped", res.report()
        assert os.eventfd_read(efd) == 2
        assert bus.accesses == [("mmio", MMIO_BASE + 0x3008, 2, True, 5)]
    finally:
        os.close(efd)


def _irq_guest(gm, line: int, count: int) -> bytes:
    """CPL0 guest: program the master PIC (vectors 0x20..), unmask ``line``,
    tell the host it is ready (READY_PORT), then sti;hlt until ``count``
    interrupts were counted at DATA by the handler, and report the count
    on COUNT_PORT."""
    vec = 0x20 + line
    h = Asm(0x11000)
    h.push_rax().push_rdx().push_rdi().mov_imm32(RDI, DATA).raw(b"\xfe\x07")      # inc byte [rdi]
    h.mov_imm32(RDI, DATA + 1).mov_imm32(RAX, vec).store_rdi(1)                   # last vector
    h.mov_imm32(RDX, 0x20).mov_imm32(RAX, 0x20).out(1)                            # EOI to the master PIC
    h.pop_rdi().pop_rdx().pop_rax().iretq()
    gm.write(0x11000, bytes(h))
    a = Asm()
    for port, val in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFF & ~(1 << line))):
        a.mov_imm32(RDX, port).mov_imm32(RAX, val).out(1)                          # ICW1-4, OCW1 mask
    a.mov_imm32(RDI, DATA).mov_imm32(RDX, READY_PORT).out(1)
    a.label("wait").sti().hlt().cli().raw(bytes([0x80, 0x3F, count])).jnz("wait")   # cmp byte [rdi], count
    a.load_rdi(1).mov_imm32(RDX, COUNT_PORT).out(1)
    return bytes(done(a)), vec


@needs_kvm
@pytest.mark.parametrize("mode", ["irqfd", "resample", "line"])
def test_irqfd_delivers_an_interrupt(gm, mode):
    line = 5
    bus = FakeBus(gm)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    bus.irqs.append((line, efd))
    bus.on_port[READY_PORT] = lambda: os.eventfd_write(efd, 1)      # raise once the guest is ready
    try:
        vm = make_vm(gm, bus, irq_mode=mode)
        assert vm.irq_mode == mode
        code, vec = _irq_guest(gm, line, 1)
        setup_long_mode(vm, code, cpl=0, handlers={vec: 0x11000})
        res = vm.run(timeout=RUN_TIMEOUT)
        vm.close()
    finally:
        os.close(efd)
    assert res.reason == "stopped", res.report()
    assert ("pio", COUNT_PORT, 1, True, 1) in bus.accesses
    assert gm.read(DATA, 2) == bytes([1, vec])


@needs_kvm
def test_resample_reraises_a_still_pending_level_interrupt(gm):
    # One raise; the device stays pending through two EOIs: the guest must
    # see three interrupts (level semantics), then the line drops.
    line = 5
    bus = FakeBus(gm)
    bus.pending_answers[line] = [True, True]
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    bus.irqs.append((line, efd))
    bus.on_port[READY_PORT] = lambda: os.eventfd_write(efd, 1)
    try:
        vm = make_vm(gm, bus, irq_mode="resample")
        code, vec = _irq_guest(gm, line, 3)
        setup_long_mode(vm, code, cpl=0, handlers={vec: 0x11000})
        res = vm.run(timeout=RUN_TIMEOUT)
        vm.close()
    finally:
        os.close(efd)
    assert res.reason == "stopped", res.report()
    assert gm.read(DATA, 1) == bytes([3])
    assert bus.pending_calls >= 3


@needs_kvm
def test_close_releases_every_fd(gm):
    before = set(os.listdir("/proc/self/fd"))
    vm = make_vm(gm, FakeBus(gm), irq_mode="resample")
    vm.close()
    vm.close()          # idempotent
    assert set(os.listdir("/proc/self/fd")) <= before


def test_tiny_assembler_matches_capstone():
    capstone = pytest.importorskip("capstone")
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    a = Asm(0)
    a.mov_imm32(RDX, 0xCF8).mov_imm64(RDI, 0xE0000000).out(1).out(2).out(4).inp(1).inp(2).inp(4)
    a.store_rdi(8).load_rdi(2).store_at(4, 0x14).load_at(1, 0x40).rep_outsb().rep_insb().iretq()
    a.label("x").jnz("x")
    got = [f"{i.mnemonic} {i.op_str}".strip() for i in md.disasm(bytes(a), 0)]
    assert got == ["mov edx, 0xcf8", "movabs rdi, 0xe0000000", "out dx, al", "out dx, ax", "out dx, eax",
                   "in al, dx", "in ax, dx", "in eax, dx", "mov qword ptr [rdi], rax", "mov ax, word ptr [rdi]",
                   "mov dword ptr [rdi + 0x14], eax", "mov al, byte ptr [rdi + 0x40]", "rep outsb dx, byte ptr [rsi]",
                   "rep insb byte ptr [rdi], dx", "iretq", "jne 0x2f"]   # a jump to itself at byte 47


# ---------------------------------------------------------------------------
# The real PCI bus and a real device: probe, handshake, one request


@needs_kvm
def test_pci_probe_virtio_handshake_and_request_through_kvm(gm):
    pci = pytest.importorskip("lguest_jit.pci")
    testing = pytest.importorskip("lguest_jit.testing")
    rng_mod = pytest.importorskip("lguest_jit.devices.rng")
    bus = pci.Bus(gm)
    t = bus.add_device(rng_mod.Rng())
    stopper = FakeBus(gm)                    # DONE_PORT: stop the run
    bus.add_ports(DONE_PORT, 1, lambda port, size, w, v: stopper.on_pio(port, size, w, v))
    vm = KvmVm(gm, bus)
    stopper.vm = vm
    assert vm.irq_mode == "resample"
    R = 0x28000                              # results the guest stores
    DESC, AVAIL, USED, BUF = 0x30000, 0x30400, 0x31000, 0x32000
    line, vec = t.irq_line, 0x20 + t.irq_line
    bar = t.bar0

    def cfg_addr(a, off):
        a.mov_imm32(RDX, 0xCF8).mov_imm32(RAX, testing.conf1_address(t.slot, off)).out(4)
        return a.mov_imm32(RDX, 0xCFC)

    def common_write(a, size, off, val):
        return a.mov_imm64(RAX, val).mov_imm64(RDI, bar).store_at(size, off)

    def common_read(a, size, off, result):
        a.mov_imm64(RAX, 0).mov_imm64(RDI, bar).load_at(size, off)
        return a.mov_imm64(RDI, R).store_at(8, result)

    # Interrupt handler: read (and so clear) the ISR, count, EOI.
    h = Asm(0x11000)
    h.push_rax().push_rdx().push_rdi()
    h.mov_imm64(RDI, bar).load_at(1, pci.ISR_OFF).mov_imm64(RDI, R).store_at(1, 0x80)
    h.raw(b"\xfe\x87" + struct.pack("<i", 0x88))                             # inc byte [rdi+0x88]
    h.mov_imm32(RDX, 0x20).mov_imm32(RAX, 0x20).out(1)
    h.pop_rdi().pop_rdx().pop_rax().iretq()
    gm.write(0x11000, bytes(h))

    a = Asm()
    for port, val in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFF & ~(1 << line))):
        a.mov_imm32(RDX, port).mov_imm32(RAX, val).out(1)
    a.mov_imm32(RDI, R)
    cfg_addr(a, 0x00).inp(4).mov_imm32(RDI, R).store_at(4, 0x00)             # vendor/device id
    cfg_addr(a, 0x10).inp(4).mov_imm32(RDI, R).store_at(4, 0x08)             # BAR0
    cfg_addr(a, 0x3C).inp(1).mov_imm32(RDI, R).store_at(1, 0x10)             # interrupt line
    cfg_addr(a, 0x04).mov_imm32(RAX, 0x6).out(2)                             # COMMAND: memory + bus master
    common_write(a, 1, 0x14, 0)                                              # reset
    common_write(a, 1, 0x14, 1)                                              # ACKNOWLEDGE
    common_write(a, 1, 0x14, 3)                                              # DRIVER
    common_write(a, 4, 0x00, 1)                                              # device_feature_select = 1
    common_read(a, 4, 0x04, 0x18)                                            # device_feature[63:32]
    common_write(a, 4, 0x08, 1).store_at(4, 0x0C)                            # driver_feature[63:32] = VERSION_1
    common_write(a, 1, 0x14, 0xB)                                            # FEATURES_OK
    common_read(a, 1, 0x14, 0x20)
    common_write(a, 2, 0x16, 0)                                              # queue_select 0
    common_read(a, 2, 0x18, 0x28)                                            # queue_size
    common_write(a, 8, 0x20, DESC)
    common_write(a, 8, 0x28, AVAIL)
    common_write(a, 8, 0x30, USED)
    common_write(a, 2, 0x1C, 1)                                              # queue_enable
    common_write(a, 1, 0x14, 0xF)                                            # DRIVER_OK
    # Post one 64-byte device-writable buffer: desc 0, avail.ring[0] = 0, avail.idx = 1.
    a.mov_imm64(RDI, DESC).mov_imm64(RAX, BUF).store_at(8, 0).mov_imm64(RAX, 64 | (2 << 32)).store_at(8, 8)
    a.mov_imm64(RDI, AVAIL).mov_imm64(RAX, 0).store_at(2, 4).mov_imm64(RAX, 1).store_at(2, 2)
    common_write(a, 2, pci.NOTIFY_OFF, 0)                                    # notify queue 0 (ioeventfd)
    a.mov_imm32(RDI, R).label("wait").sti().hlt().cli()                      # wait for the interrupt
    a.raw(b"\x80\xbf" + struct.pack("<i", 0x88) + b"\x00").jz("wait")        # cmp byte [rdi+0x88], 0
    a.mov_imm64(RDI, USED).load_at(2, 2).mov_imm64(RDI, R).store_at(2, 0x30)  # used.idx
    setup_long_mode(vm, bytes(done(a)), cpl=0, handlers={vec: 0x11000})
    try:
        res = vm.run(timeout=RUN_TIMEOUT)
    finally:
        vm.close()
        bus.close()
    assert res.reason == "stopped", res.report()
    r = lambda off, n: int.from_bytes(gm.read(R + off, n), "little")   # noqa: E731
    assert r(0, 4) == 0x1AF4 | (0x1040 + 4) << 16          # virtio vendor, modern rng device id
    assert r(8, 4) == bar
    assert r(0x10, 1) == line
    assert r(0x18, 4) & 1                                  # VIRTIO_F_VERSION_1 offered
    assert r(0x20, 1) == 0xB                               # FEATURES_OK accepted
    assert r(0x28, 2) == rng_mod.QUEUE_SIZE
    assert r(0x88, 1) >= 1 and r(0x80, 1) & 1              # interrupt taken, ISR said "used buffer"
    assert r(0x30, 2) == 1                                 # the request completed
    assert int.from_bytes(gm.read(USED + 4, 4), "little") == 0      # used.ring[0].id
    assert int.from_bytes(gm.read(USED + 8, 4), "little") == 64     # used.ring[0].len
    assert gm.read(BUF, 64) != bytes(64)
    # The notify went through the ioeventfd, not through an MMIO exit: the
    # exits are the handshake's and the ISR reads only (the compiled loop
    # counts every exit by register).
    assert bus.mmio_counts[t.slot, pci.M_NOTIFY] == 0
    assert bus.mmio_counts[t.slot, pci.M_ISR] >= 1


@needs_kvm
def test_keyboard_controller_reset_is_a_reboot(gm):
    pci = pytest.importorskip("lguest_jit.pci")
    testing = pytest.importorskip("lguest_jit.testing")
    bus = pci.Bus(gm)
    vm = KvmVm(gm, bus)
    vm.claim_reset_port()
    a = Asm().mov_imm32(RDX, 0x64).inp(1).mov_imm32(RDI, DATA).store_rdi(1)   # status: nothing there
    a.mov_imm32(RAX, 0xFE).out(1).label("spin").jmp("spin")
    setup_long_mode(vm, bytes(a), cpl=0)
    try:
        res = vm.run(timeout=RUN_TIMEOUT)
    finally:
        vm.close()
        bus.close()
    assert res.reason == "reboot", res.report()
    assert res.exit_status is None
    assert gm.read(DATA, 1) == b"\xff"


# ---------------------------------------------------------------------------
# User -> kernel transitions: what this host's KVM does with them.  Under
# kvm_pvm (software KVM: CPL3 native, CPL0 emulated) SYSCALL, INT n and
# SYSENTER from CPL3 do not reach CPL0; exceptions do.  guest/README.md
# ("What this host needs") draws the consequences for Linux.

ON_PVM = os.path.isdir("/sys/module/kvm_pvm")
MARK = DATA + 24            # handlers store their vector (or ENTRY_MARK) here
ENTRY_MARK = 0x5C
STUBS = 0x40000             # one stub per vector, 0x40 bytes apart


def _marker_stub(origin: int, marker: int) -> bytes:
    """Store ``marker`` (and CS, whose low bits are the CPL the code really
    runs at) and stop the run through MMIO, which works at any CPL."""
    a = Asm(origin)
    a.mov_imm32(RDI, DATA).raw(b"\x8c\xc8").store_at(4, 16)                  # mov eax, cs; [DATA+16]
    a.mov_imm32(RAX, marker).store_at(4, 24)
    return bytes(mmio_done(a))


def _user_entry_guest(gm, insn: bytes, vectors=range(0, 20)) -> dict:
    """CPL3 code: rcx/r11 poisoned, then ``insn``; every vector in
    ``vectors`` (and 0x80) has a DPL3 gate to a marker stub.  The syscall /
    sysenter target (0x11000) is a marker stub with ENTRY_MARK."""
    handlers = {}
    for v in list(vectors) + [0x80]:
        handlers[v] = STUBS + v * 0x40
        gm.write(handlers[v], _marker_stub(handlers[v], v))
    gm.write(0x11000, _marker_stub(0x11000, ENTRY_MARK))
    a = Asm().mov_imm64(RCX, 0x1111).raw(b"\x49\xc7\xc3\x22\x22\x00\x00")     # mov r11, 0x2222
    a.raw(insn).label("spin").jmp("spin")
    return bytes(a), handlers


def _frame(gm):
    """The interrupt frame a no-error-code delivery left on the CPL0 stack:
    (rip, cs, rflags, rsp, ss)."""
    return struct.unpack("<5Q", gm.read(K_STACK_TOP - 40, 40))


K_STACK_TOP = 0xC000
INSN_AT = CODE + 17          # after the two register-poisoning moves


def _run_user_entry(gm, insn: bytes, msrs: dict | None = None):
    bus = StopOnMmioBus(gm)
    vm = make_vm(gm, bus)
    code, handlers = _user_entry_guest(gm, insn)
    setup_long_mode(vm, code, cpl=3, handlers=handlers)
    if msrs:
        vm.set_msrs(msrs)
    res = vm.run(timeout=RUN_TIMEOUT)
    regs, sregs = vm.get_regs(), vm.get_sregs()
    vm.close()
    assert res.reason == "stopped", res.report()
    mark = int.from_bytes(gm.read(MARK, 4), "little")
    cs_seen = int.from_bytes(gm.read(DATA + 16, 4), "little")
    return mark, cs_seen, regs, sregs


def test_user_entry_guest_layout():
    # INSN_AT must be where _user_entry_guest puts the instruction under test.
    code, _ = _user_entry_guest(GuestMemory(1 << 20), b"\x0f\x05")
    assert code[INSN_AT - CODE:INSN_AT - CODE + 2] == b"\x0f\x05"


@needs_kvm
def test_msrs_round_trip_and_refusal(gm):
    vm = make_vm(gm, FakeBus(gm))
    try:
        want = {K.MSR_STAR: (0x10 << 48) | (0x08 << 32), K.MSR_LSTAR: 0x11000, K.MSR_SYSCALL_MASK: 0x4700,
                K.MSR_KERNEL_GS_BASE: 0x123000}
        vm.set_msrs(want)
        assert vm.get_msrs(want) == want
        with pytest.raises(K.KvmError, match="0xdeadbeef"):
            vm.get_msrs([K.MSR_LSTAR, 0xDEADBEEF])
        with pytest.raises(K.KvmError, match="MSR 0xc0000082"):
            vm.set_msrs({K.MSR_STAR: 0, K.MSR_LSTAR: 1 << 63 | 1 << 50})   # non-canonical LSTAR
    finally:
        vm.close()


@needs_kvm
def test_syscall_from_cpl3(gm):
    """SYSCALL loads RIP from LSTAR, RCX/R11 with the return address and
    RFLAGS, and applies FMASK; on hardware it also switches to CPL0.  PVM
    does all of that except the switch: the LSTAR code runs natively at CPL3
    (so Linux's entry_SYSCALL_64 faults: guest/patches/0001)."""
    msrs = {K.MSR_EFER: K.EFER_LME | K.EFER_LMA | K.EFER_SCE, K.MSR_STAR: (0x10 << 48) | (0x08 << 32),
            K.MSR_LSTAR: 0x11000, K.MSR_SYSCALL_MASK: 0x200}
    mark, cs_seen, regs, sregs = _run_user_entry(gm, b"\x0f\x05", msrs)
    assert mark == ENTRY_MARK                       # the LSTAR code ran
    assert regs.rcx == INSN_AT + 2                  # return address
    assert regs.r11 & 0x2 and regs.r11 != 0x2222    # RFLAGS image
    if ON_PVM:
        assert cs_seen & 3 == 3 and sregs.cs.dpl == 3, "PVM now switches to CPL0 on SYSCALL: drop the guest patch?"
    else:
        assert cs_seen & 3 == 0 and sregs.cs.dpl == 0


@needs_kvm
@pytest.mark.parametrize("vector", [0x80, 0x20])
def test_int_n_from_cpl3(gm, vector):
    """INT n through a DPL3 gate: on hardware the gate's handler runs at
    CPL0.  PVM raises #UD at the INT instead, for every vector whose host
    gate is not DPL3 (0x80 included): no int $0x80 system calls either."""
    mark, cs_seen, regs, sregs = _run_user_entry(gm, bytes([0xCD, vector]))
    rip, cs, rflags, rsp, ss = _frame(gm)
    assert sregs.cs.dpl == 0 and cs & 3 == 3 and rsp == 0x80000   # an event from CPL3 reached CPL0
    if ON_PVM:
        assert mark == 6 and rip == INSN_AT, "PVM now delivers INT n: int $0x80 would work"
    else:
        assert mark == vector and rip == INSN_AT + 2


@needs_kvm
@pytest.mark.parametrize("vector", [3, 4])
def test_int_3_and_4_from_cpl3_are_delivered(gm, vector):
    """INT 3 and INT 4 (DPL3 gates on the host too) reach the guest's
    handler at CPL0 with the return address after the instruction, as do
    the exceptions: these are the user->kernel paths PVM gets right."""
    mark, cs_seen, regs, sregs = _run_user_entry(gm, bytes([0xCD, vector]))
    rip, cs, rflags, rsp, ss = _frame(gm)
    assert mark == vector and rip == INSN_AT + 2 and cs & 3 == 3
    assert sregs.cs.dpl == 0 and cs_seen & 3 in (0, 3)


@needs_kvm
def test_sysenter_from_cpl3(gm):
    """SYSENTER in 64-bit mode: #UD on AMD; Intel runs it.  PVM raises #UD."""
    msrs = {K.MSR_IA32_SYSENTER_CS: 0x08, K.MSR_IA32_SYSENTER_EIP: 0x11000, K.MSR_IA32_SYSENTER_ESP: K_STACK_TOP}
    mark, cs_seen, regs, sregs = _run_user_entry(gm, b"\x0f\x34", msrs)
    if ON_PVM:
        assert mark == 6 and _frame(gm)[0] == INSN_AT
    else:
        assert mark in (6, ENTRY_MARK)


@needs_kvm
def test_cpl_can_be_changed_between_runs(gm):
    """KVM_SET_SREGS may move a vCPU that has run between CPL3 and CPL0 (what
    a launcher-side SYSCALL/SYSRET assist would need): CPL0 port I/O exits,
    CPL3 MMIO exits."""
    bus = StopOnMmioBus(gm)
    vm = make_vm(gm, bus)
    try:
        gm.write(0x11000, bytes(done(Asm(0x11000))))
        gm.write(0x13000, bytes(mmio_done(Asm(0x13000))))
        setup_long_mode(vm, bytes(Asm().label("spin").jmp("spin")), cpl=3)
        assert vm.run(timeout=0.2, halt_poll=None).reason == "timeout"
        s = vm.get_sregs()
        s.cs = K.flat_segment(0x08, code=True, long_mode=True, dpl=0)
        s.ss = K.flat_segment(0x10, code=False, dpl=0)
        vm.set_sregs(s)
        r = vm.get_regs()
        r.rip, r.rsp = 0x11000, K_STACK_TOP
        vm.set_regs(r)
        assert vm.run(timeout=RUN_TIMEOUT).reason == "stopped"
        assert bus.accesses[-1][:4] == ("pio", DONE_PORT, 1, True)
        s = vm.get_sregs()
        s.cs = K.flat_segment(0x20 | 3, code=True, long_mode=True, dpl=3)
        s.ss = K.flat_segment(0x18 | 3, code=False, dpl=3)
        vm.set_sregs(s)
        r = vm.get_regs()
        r.rip, r.rsp = 0x13000, 0x80000
        vm.set_regs(r)
        assert vm.run(timeout=RUN_TIMEOUT).reason == "stopped"
        assert vm.get_sregs().cs.dpl == 3
    finally:
        vm.close()


# ---------------------------------------------------------------------------
# What Linux's context switch relies on, checked on this host: a null FS
# selector loaded at CPL0 clears the FS base that CPL3 code then uses (Linux
# assumes it unless the AMD vendor code finds X86_BUG_NULL_SEG), and FXSAVE /
# FXRSTOR run by KVM's emulator at CPL0 keep all sixteen XMM registers of the
# interrupted CPL3 code.  Both hold on the AMD host where pipelined process
# start-ups crash (guest/README.md, "Pipelines"), so neither is the cause.

def _user_fs_read(gm, null_selector: bool) -> int:
    """CPL0 sets FS base 0x30000, optionally loads a null FS selector, then
    irets to CPL3 code that reads fs:[0x10] into DATA."""
    ucode = 0x12000
    gm.write(0x10, struct.pack("<Q", 0x1111111111111111))          # what base 0 reads
    gm.write(0x30010, struct.pack("<Q", 0x3333333333333333))       # what the stale base reads
    vm = make_vm(gm, StopOnMmioBus(gm))
    try:
        a = Asm().mov_imm32(RCX, K.MSR_FS_BASE).mov_imm32(RAX, 0x30000).mov_imm32(RDX, 0).raw(b"\x0f\x30")  # wrmsr
        if null_selector:
            a.mov_imm32(RAX, 0).raw(b"\x8e\xe0")                                # mov fs, eax
        a.raw(b"\x6a\x1b").mov_imm64(RAX, USTACK_TOP).push_rax()                # ss, rsp
        a.raw(b"\x68\x02\x30\x00\x00\x6a\x23").mov_imm64(RAX, ucode).push_rax()  # rflags, cs, rip
        a.iretq()
        u = Asm(ucode).raw(b"\x64\x48\x8b\x04\x25\x10\x00\x00\x00")            # mov rax, fs:[0x10]
        gm.write(ucode, bytes(mmio_done(u.mov_imm64(RDI, DATA).store_rdi(8))))
        setup_long_mode(vm, bytes(a), cpl=0)
        res = vm.run(timeout=RUN_TIMEOUT)
        assert res.reason == "stopped", res.report()
        return int.from_bytes(gm.read(DATA, 8), "little")
    finally:
        vm.close()


@needs_kvm
def test_null_fs_selector_clears_the_base_cpl3_uses(gm):
    assert _user_fs_read(gm, null_selector=False) == 0x3333333333333333
    assert _user_fs_read(gm, null_selector=True) == 0x1111111111111111


def _movdqu(opcode: int, n: int, modrm_base: int) -> bytes:
    """movdqu xmmN <-> [base register + 16n] with a disp32 (0x6F load, 0x7F store)."""
    rex = b"\x44" if n >= 8 else b""
    return b"\xf3" + rex + bytes([0x0F, opcode, modrm_base | (n & 7) << 3]) + struct.pack("<I", 16 * n)


XMM_PATTERN = bytes((i * 37 + 11) & 0xFF for i in range(256))


def _user_xmm_round_trip(gm, bus, handler: Asm, trigger: bytes):
    """CPL3 code loads XMM0-15 with XMM_PATTERN, runs ``trigger`` (which
    traps to ``handler`` at CPL0 or exits by itself), then stores XMM0-15
    at 0x31000.  Returns (run result, vm) after the run; the vm is closed."""
    ucode, pat, out = 0x12000, 0x30000, 0x31000
    gm.write(pat, XMM_PATTERN)
    gm.write(out, bytes(256))
    gm.write(handler.origin, bytes(handler.iretq()))
    u = Asm(ucode).mov_imm64(RDI, pat).mov_imm64(RSI, out)
    for n in range(16):
        u.raw(_movdqu(0x6F, n, 0x87))                                        # load from [rdi]
    u.raw(trigger)
    for n in range(16):
        u.raw(_movdqu(0x7F, n, 0x86))                                        # store to [rsi]
    gm.write(ucode, bytes(mmio_done(u)))
    vm = make_vm(gm, bus)
    try:
        setup_long_mode(vm, b"", cpl=3, handlers={3: handler.origin}, entry=ucode)
        s = vm.get_sregs()
        s.cr4 |= 1 << 9 | 1 << 10          # OSFXSR, OSXMMEXCPT: SSE on
        s.cr0 = (s.cr0 & ~(1 << 2 | 1 << 3)) | 1 << 1   # no EM, no TS; MP
        vm.set_sregs(s)
        res = vm.run(timeout=RUN_TIMEOUT)
    finally:
        vm.close()
    assert res.reason == "stopped", res.report()
    return res, vm


@needs_kvm
@pytest.mark.parametrize("clobber", [False, True])
def test_emulated_fxsave_fxrstor_keep_user_xmm_registers(gm, clobber):
    """CPL3 loads XMM0-15, traps (int3) to a CPL0 handler that FXSAVEs them
    (and, with ``clobber``, FXRSTORs a zeroed image and then the saved one),
    and stores them again after the iretq."""
    save, zero = 0x32000, 0x33000
    gm.write(save, bytes(512))
    gm.write(zero, struct.pack("<H", 0x37F) + bytes(22) + struct.pack("<I", 0x1F80) + bytes(484))  # FCW, MXCSR
    ptr = lambda op, addr: bytes([0x48, 0x0F, 0xAE, op, 0x25]) + struct.pack("<I", addr)  # noqa: E731
    h = Asm(0x11000).raw(ptr(0x04, save))                                    # fxsave64 [save]
    if clobber:
        h.raw(ptr(0x0C, zero)).raw(ptr(0x0C, save))                          # fxrstor64 [zero], [save]
    _user_xmm_round_trip(gm, StopOnMmioBus(gm), h, b"\xcc")
    assert gm.read(save + 160, 256) == XMM_PATTERN, "the FXSAVE image's XMM area"
    assert gm.read(0x31000, 256) == XMM_PATTERN, "XMM0-15 after the return to CPL3"


class _FloatWorkBus(StopOnMmioBus):
    """Does floating-point numpy work in every exit, so the launcher's own
    use of the XMM registers would show in a guest that lost its state."""

    def _dirty(self):
        import numpy as np
        a = np.linspace(0.5, 3.5, 4096)
        self.sink = float(np.sqrt(a).sum() + a @ a)

    def on_mmio(self, addr, size, is_write, value):
        self._dirty()
        return super().on_mmio(addr, size, is_write, value)

    def on_pio(self, port, size, is_write, value):
        self._dirty()
        return super().on_pio(port, size, is_write, value)


@needs_kvm
@pytest.mark.parametrize("exit_kind", ["cpl3-mmio-read", "cpl0-fwait-assist", "cpl0-port-write"])
def test_user_xmm_registers_survive_exits_to_the_launcher(gm, exit_kind):
    """User code holds XMM0-15 across an exit to the launcher (which runs
    numpy meanwhile): an MMIO read it makes itself, or a trap to a CPL0
    handler that needs the fwait assist or writes a port."""
    h = Asm(0x11000)
    if exit_kind == "cpl0-fwait-assist":
        h.fwait()
    elif exit_kind == "cpl0-port-write":
        h.mov_imm32(RDX, READY_PORT).out(1)
    if exit_kind == "cpl3-mmio-read":
        trigger = bytes(Asm().mov_imm64(RDX, MMIO_BASE + 0x10).raw(b"\x8b\x02"))   # mov eax, [rdx]
    else:
        trigger = b"\xcc"                                                           # int3
    _, vm = _user_xmm_round_trip(gm, _FloatWorkBus(gm), h, trigger)
    if exit_kind == "cpl0-fwait-assist":
        assert vm.stats.assists == {"fwait": 1}
    assert gm.read(0x31000, 256) == XMM_PATTERN
