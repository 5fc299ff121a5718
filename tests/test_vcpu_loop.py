"""The compiled vCPU loop: KvmVm.run over a real pci.Bus, whose dispatch
answers exits in compiled code (``lguest_jit.vcpu``).  Tiny guests provoke
each exit kind; a spy on the bus's Python fallbacks shows which accesses
came back to Python (only those the loop must hand back)."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from lguest_jit import pci, testing
from lguest_jit.hw import kvm as K
from lguest_jit.hw.cmos import CENTURY, STATUS_D, YEAR, CmosRtc
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.hw.tinyguest import CODE, DATA, RAX, RCX, RDI, RDX, RSI, Asm, setup_long_mode
from lguest_jit.hw.uart import COM1, Uart8250
from lguest_jit.vcpu import KvmVm

KVM_MISSING = K.kvm_available()
needs_kvm = pytest.mark.skipif(KVM_MISSING is not None, reason=f"no usable KVM: {KVM_MISSING}")

DONE_PORT = 0xF4          # a Python-only handler: stops the run
RUN_TIMEOUT = 20.0
UNCLAIMED_MMIO = 0xD0000000


class Dev(pci.VirtioDevice):
    device_type = 4
    name = "dev"
    queue_max_sizes = (16,)
    config = np.arange(8, dtype=np.uint8)


class Machine:
    def __init__(self):
        self.gm = GuestMemory(4 << 20)
        self.log = []
        self.bus = pci.Bus(self.gm, log=self.log.append)
        self.t = self.bus.add_device(Dev())
        self.vm = KvmVm(self.gm, self.bus)
        self.bus.add_ports(DONE_PORT, 1, lambda p, s, w, v: self.vm.stop() or 0)
        # What came back to Python: the bus's fallbacks, spied on.
        self.python = []
        for name in ("pio_python", "_mmio_python", "_bar_slow"):
            real = getattr(self.bus, name)
            setattr(self.bus, name, self._spy(name, real))

    def _spy(self, name, real):
        def call(*args):
            self.python.append((name, *args))
            return real(*args)
        return call

    def run(self, code, cpl=0, **kw):
        setup_long_mode(self.vm, code, cpl=cpl, **kw)
        return self.vm.run(timeout=RUN_TIMEOUT)

    def close(self):
        self.vm.close()
        self.bus.close()
        self.gm.close()


@pytest.fixture
def m():
    mach = Machine()
    yield mach
    mach.close()


def done(a: Asm) -> bytes:
    return bytes(a.mov_imm32(RDX, DONE_PORT).out(1).label("spin").jmp("spin"))


def only_done(m):
    """Python saw the guest's DONE write and nothing else (an empty record
    means the recorder missed even that: not "only done")."""
    return bool(m.python) and all(c[:2] == ("pio_python", DONE_PORT) for c in m.python)


@needs_kvm
def test_unclaimed_ports_and_string_io_stay_compiled(m):
    a = Asm().mov_imm32(RDI, DATA)
    for size, port in ((1, 0x80), (2, 0x82), (4, 0x84)):
        a.mov_imm32(RDX, port).inp(size).store_rdi(size).mov_imm32(RAX, 0x11223344).out(size)
        a.raw(b"\x48\x83\xc7\x08")                                     # add rdi, 8
    a.mov_imm32(RDI, DATA + 0x100).mov_imm32(RCX, 4).mov_imm32(RDX, 0x91).rep_insb()
    res = m.run(done(a))
    assert res.reason == "stopped", res.report()
    assert m.gm.read(DATA, 1) == b"\xff" and m.gm.read(DATA + 8, 2) == b"\xff\xff"
    assert m.gm.read(DATA + 16, 4) == b"\xff" * 4
    assert m.gm.read(DATA + 0x100, 4) == b"\xff" * 4                      # rep insb: 4 reads, one exit
    assert only_done(m)
    assert m.bus.port_counts[0x80] == 2 and m.bus.port_counts[0x91] == 4
    assert m.vm.stats.pio == 8                                           # 6 + rep insb + DONE
    assert dict(m.bus.access_counts())["port 0x80 (unclaimed)"] == 2


@needs_kvm
def test_mmio_reads_and_writes_through_bar0(m):
    bar = m.t.bar0
    r = DATA
    a = Asm()
    a.mov_imm64(RDI, bar).mov_imm32(RAX, 1).store_at(4, 0x00)           # device_feature_select = 1
    a.mov_imm64(RAX, 0).load_at(4, 0x04).mov_imm32(RSI, r).raw(b"\x89\x06")                 # mov [rsi], eax
    a.mov_imm64(RAX, 0).load_at(2, 0x12).raw(b"\x89\x46\x08")                               # num_queues
    a.mov_imm64(RAX, 0).load_at(1, pci.DEVCFG_OFF + 3).raw(b"\x89\x46\x10")                 # device config
    a.mov_imm64(RDI, UNCLAIMED_MMIO).mov_imm64(RAX, 0).load_rdi(8).raw(b"\x48\x89\x46\x18")  # unclaimed
    a.mov_imm64(RDI, bar).mov_imm64(RAX, 0x5000).store_at(8, 0x20)       # 64-bit: Python splits it
    a.mov_imm64(RAX, 0).store_at(2, 0x12)                                # num_queues is read-only
    res = m.run(done(a))
    assert res.reason == "stopped", res.report()
    got = np.frombuffer(m.gm.read(r, 32), dtype=np.uint64)
    assert list(got) == [1, 1, 3, (1 << 64) - 1]                       # VERSION_1 is bit 32
    assert m.vm.stats.mmio == 7
    slow = [c[0] for c in m.python if c[1] != DONE_PORT]
    # Back in Python: the feature read before DRIVER (a rule, allowed), the
    # 8-byte write (split into halves there), the write to a read-only field.
    assert slow == ["_bar_slow", "_mmio_python", "_bar_slow"]
    assert any("feature read before the DRIVER" in line for line in m.log)
    assert any("read-only common configuration" in line for line in m.log)
    counts = dict(m.bus.access_counts())
    assert counts["dev common.device_feature_select"] == 1 and counts["dev device_cfg"] == 1
    assert counts["mmio (unclaimed)"] == 1


@needs_kvm
def test_conf1_reads_in_compiled_code_and_hooks_in_python(m):
    a = Asm().mov_imm32(RSI, DATA)
    for i, slot in enumerate((m.t.slot, 9)):                             # the device, an empty slot
        a.mov_imm32(RDX, 0xCF8).mov_imm32(RAX, testing.conf1_address(slot, 0)).out(4)
        a.mov_imm32(RDX, 0xCFC).inp(4).raw(b"\x89\x46" + bytes([8 * i]))
    a.mov_imm32(RDX, 0xCF8).mov_imm32(RAX, testing.conf1_address(m.t.slot, pci.PCI_COMMAND)).out(4)
    a.mov_imm32(RDX, 0xCFC).mov_imm32(RAX, pci.PCI_COMMAND_INTX_DISABLE | 6).out(2)   # COMMAND: a hook
    res = m.run(done(a))
    assert res.reason == "stopped", res.report()
    assert np.frombuffer(m.gm.read(DATA, 16), dtype=np.uint64).tolist() == [0x1AF4 | 0x1044 << 16, 0xFFFFFFFF]
    assert m.t.intx_disabled                                             # the COMMAND hook ran
    assert [c[1] for c in m.python] == [0xCFC, DONE_PORT]
    assert dict(m.bus.access_counts())["conf1 data"] == 3


@needs_kvm
def test_uart_output_from_compiled_code(m):
    r, w = os.pipe()
    try:
        uart = Uart8250(out_fd=w, kvm_irq=(m.vm.vm_fd, K.KVM_IRQ_LINE, 4))
        uart.register(m.bus)
        m.gm.write(DATA, b"compiled hello\n")
        a = Asm().mov_imm32(RSI, DATA).mov_imm32(RCX, 15).mov_imm32(RDX, COM1).rep_outsb()
        a.mov_imm32(RDX, COM1 + 1).mov_imm32(RAX, 2).out(1)              # IER: THRI, raises IRQ 4
        a.mov_imm32(RDX, COM1 + 5).inp(1).mov_imm32(RDI, DATA + 0x40).store_rdi(1)   # LSR
        res = m.run(done(a))
        assert res.reason == "stopped", res.report()
        assert os.read(r, 100) == b"compiled hello\n"
    finally:
        os.close(r)
        os.close(w)
    assert m.gm.read(DATA + 0x40, 1) == b"\x60"
    assert uart.transmitted == 15
    assert only_done(m)
    counts = dict(m.bus.access_counts())
    assert counts["uart THR"] == 15 and counts["uart LSR"] == 1


@needs_kvm
def test_cmos_clock_from_compiled_code(m):
    CmosRtc().register(m.bus)
    a = Asm().mov_imm32(RDI, DATA)
    for i, reg in enumerate((STATUS_D, YEAR, CENTURY)):
        a.mov_imm32(RDX, 0x70).mov_imm32(RAX, reg).out(1).mov_imm32(RDX, 0x71).inp(1).store_at(1, i)
    res = m.run(done(a))
    assert res.reason == "stopped", res.report()
    status_d, year, century = m.gm.read(DATA, 3)
    now = time.gmtime()
    assert status_d == 0x80
    assert (century >> 4) * 1000 + (century & 15) * 100 + (year >> 4) * 10 + (year & 15) in (now.tm_year,
                                                                                               now.tm_year - 1)
    assert only_done(m)


@needs_kvm
def test_int3_and_fwait_assisted_in_compiled_code(m):
    h = Asm(0x11000).push_rax().push_rdx().mov_imm32(RDX, 0x30).mov_imm32(RAX, 3).out(1)
    m.gm.write(0x11000, bytes(h.pop_rdx().pop_rax().iretq()))
    a = Asm().fwait().mov_imm32(RDX, 0x31).mov_imm32(RAX, 1).out(1).int3().mov_imm32(RDX, 0x31).out(1)
    res = m.run(done(a), handlers={3: 0x11000})
    assert res.reason == "stopped", res.report()
    assert m.vm.stats.assists == {"fwait": 1, "int3": 1}
    assist = m.vm.vcpus[0].assist
    assert assist[K.AS_FWAIT] == 1 and assist[K.AS_INT3] == 1   # no Python on the way
    assert m.bus.port_counts[0x30] == 1 and m.bus.port_counts[0x31] == 2


@needs_kvm
def test_assist_loop_refused_through_the_compiled_loop(m):
    m.gm.write(0x11000, bytes(Asm(0x11000).raw(b"\x48\xff\x0c\x24").iretq()))   # back onto the int3
    res = m.run(bytes(Asm().int3()), handlers={3: 0x11000})
    assert res.reason == "internal-error" and "not making progress" in res.message, res.report()


@needs_kvm
def test_unassisted_instruction_is_fatal(m):
    res = m.run(done(Asm().mov_imm32(RDI, DATA).raw(b"\x0f\xae\x17")))  # ldmxcsr [rdi]
    if res.reason == "stopped":
        pytest.skip("this host's KVM emulates ldmxcsr")
    assert res.reason == "internal-error", res.report()
    assert res.insn.startswith(b"\x0f\xae\x17") and res.regs["rip"] == CODE + 5


@needs_kvm
def test_stop_timeout_and_max_exits(m):
    setup_long_mode(m.vm, bytes(Asm().label("x").jmp("x")), cpl=3)
    threading.Timer(0.2, m.vm.stop).start()
    assert m.vm.run(timeout=RUN_TIMEOUT, halt_poll=None).reason == "stopped"
    assert m.vm.run(timeout=0.2, halt_poll=None).reason == "timeout"
    setup_long_mode(m.vm, bytes(Asm().mov_imm32(RDX, 0x510).label("l").out(1).jmp("l")), cpl=0)
    before = m.vm.stats.pio
    res = m.vm.run(max_exits=500, halt_poll=None)
    assert res.reason == "stopped" and res.message.startswith("500 exits"), res.report()
    assert m.vm.stats.pio - before == 500


@needs_kvm
def test_halt_with_interrupts_off(m):
    setup_long_mode(m.vm, bytes(Asm().cli().hlt()), cpl=0)
    res = m.vm.run(timeout=RUN_TIMEOUT, halt_poll=0.05)
    assert res.reason == "halt", res.report()


@needs_kvm
def test_signal_handler_hook_runs_on_eintr(m):
    seen = []
    m.vm._on_signal = lambda vcpu: seen.append(threading.get_ident())
    setup_long_mode(m.vm, bytes(Asm().label("x").jmp("x")), cpl=3)
    res = m.vm.run(timeout=0.3, halt_poll=0.05)
    assert res.reason == "timeout"
    assert seen and set(seen) == {threading.get_ident()}


@needs_kvm
def test_pure_python_dispatch_runs_the_same_guests():
    # NUMBA_DISABLE_JIT=1: the same loop and handlers as plain Python (the
    # benchmarks' baseline) must still run guests.
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "unclaimed_ports or mmio_reads or conf1 or uart_output or cmos or assisted or assist_loop"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "8 passed" in r.stdout
