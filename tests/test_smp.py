"""Two vCPUs, each its own compiled loop on its own thread: exits of both
handled at the same time with every counter exact, and whatever ends one
vCPU's run ends the machine, every vCPU thread joined.  vCPU 1 is set
straight into long mode through the KVM API (no INIT/SIPI: Linux's AP
start-up is the slow e2e's business).  The code runs at CPL0 (see
boot_both)."""
import threading

import numpy as np
import pytest

from lguest_jit import pci
from lguest_jit.hw import kvm as K
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.hw.tinyguest import CODE, DATA, RAX, RCX, RDI, RDX, Asm, setup_long_mode
from lguest_jit.vcpu import KvmVm

KVM_MISSING = K.kvm_available()
needs_kvm = pytest.mark.skipif(KVM_MISSING is not None, reason=f"no usable KVM: {KVM_MISSING}")

DONE_PORT = 0xF4          # a Python-only handler: stops the machine
RUN_TIMEOUT = 60.0
AP_ENTRY = CODE + 0x800   # vCPU 1's code
AP_STACK = 0x70000
FLAG = DATA + 0x800       # vCPU 1 writes 1 here when its exits are done
LOOPS = 1500


class Dev(pci.VirtioDevice):
    device_type = 4
    name = "dev"
    queue_max_sizes = (16,)
    config = np.arange(8, dtype=np.uint8)


@pytest.fixture
def m2():
    gm = GuestMemory(4 << 20)
    bus = pci.Bus(gm)
    t = bus.add_device(Dev())
    vm = KvmVm(gm, bus, cpus=2)
    bus.add_ports(DONE_PORT, 1, lambda p, s, w, v: vm.stop() or 0)
    yield vm, bus, t
    vm.close()
    bus.close()
    gm.close()


def exits(port: int, bar: int) -> Asm:
    """LOOPS times: one port write (compiled: unclaimed port) and one BAR0
    read (compiled: common config)."""
    a = Asm(origin=CODE).mov_imm32(RCX, LOOPS).mov_imm32(RDX, port).mov_imm64(RDI, bar)
    return a.label("l").out(1).load_at(4, 0x00).dec_ecx().jnz("l")


def boot_both(vm, code0: bytes, code1: bytes, cpl: int = 0) -> None:
    # CPL0: on our software-KVM hosts a guest with more than one vCPU gets
    # #GP for port I/O at CPL3 even with IOPL=3 (one vCPU: allowed).
    assert len(code0) <= AP_ENTRY - CODE
    setup_long_mode(vm, code0, cpl=cpl)
    vm.gm.write(AP_ENTRY, code1)
    setup_long_mode(vm, code0, cpl=cpl, vcpu=1, entry=AP_ENTRY, regs={"rsp": AP_STACK})
    vm.gm.write(AP_ENTRY, code1)        # setup_long_mode rewrote the code page


def vcpu_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("vcpu")]


@needs_kvm
def test_two_vcpus_exit_at_once_and_every_counter_is_exact(m2):
    vm, bus, t = m2
    bar = t.bar0
    a0 = exits(0x80, bar)
    a0.mov_imm64(RDI, FLAG).label("w").cmp_byte_rdi_0().jz("w")            # wait for vCPU 1
    a0.mov_imm32(RDX, DONE_PORT).out(1).label("spin").jmp("spin")
    a1 = Asm(origin=AP_ENTRY).mov_imm32(RCX, LOOPS).mov_imm32(RDX, 0x81).mov_imm64(RDI, bar)
    a1.label("l").out(1).load_at(4, 0x00).dec_ecx().jnz("l")
    a1.mov_imm64(RDI, FLAG).mov_imm32(RAX, 1).store_at(1, 0).label("spin").jmp("spin")
    boot_both(vm, bytes(a0), bytes(a1))
    res = vm.run(timeout=RUN_TIMEOUT)
    assert res.reason == "stopped", res.report()
    assert vcpu_threads() == []                                          # vCPU 1's thread joined
    s0, s1 = vm.loops[0].stats, vm.loops[1].stats
    assert (s0.pio, s0.mmio) == (LOOPS + 1, LOOPS)                       # + the DONE write
    assert (s1.pio, s1.mmio) == (LOOPS, LOOPS)
    assert (vm.stats.pio, vm.stats.mmio) == (2 * LOOPS + 1, 2 * LOOPS)   # the machine's: summed
    counts = dict(bus.access_counts())
    assert counts["port 0x80 (unclaimed)"] == LOOPS
    assert counts["port 0x81 (unclaimed)"] == LOOPS
    bar_reads = {k: n for k, n in counts.items() if k.startswith("dev ")}
    assert list(bar_reads.values()) == [2 * LOOPS], bar_reads           # one register, both vCPUs' reads


@needs_kvm
def test_counts_so_far_include_the_runs_in_progress():
    """What SIGUSR1's --stats reads mid-run (VcpuLoop.so_far,
    KvmVm.stats_so_far): each vCPU's exits while its loop still runs,
    exact, where ``stats`` only takes them when the run returns."""
    gm = GuestMemory(4 << 20)
    bus = pci.Bus(gm)
    t = bus.add_device(Dev())
    vm = KvmVm(gm, bus, cpus=2)
    seen = {}

    def done(p, s, w, v):
        # vCPU 0's thread, mid-run: vCPU 1 finished its exits and spins in its loop.
        seen["ap"] = vm.loops[1].so_far()
        seen["ap_stats"] = (vm.loops[1].stats.pio, vm.loops[1].stats.mmio)
        seen["machine"] = vm.stats_so_far()
        vm.stop()
        return 0
    bus.add_ports(DONE_PORT, 1, done)
    try:
        a0 = exits(0x80, t.bar0)
        a0.mov_imm64(RDI, FLAG).label("w").cmp_byte_rdi_0().jz("w")
        a0.mov_imm32(RDX, DONE_PORT).out(1).label("spin").jmp("spin")
        a1 = Asm(origin=AP_ENTRY).mov_imm32(RCX, LOOPS).mov_imm32(RDX, 0x81).mov_imm64(RDI, t.bar0)
        a1.label("l").out(1).load_at(4, 0x00).dec_ecx().jnz("l")
        a1.mov_imm64(RDI, FLAG).mov_imm32(RAX, 1).store_at(1, 0).label("spin").jmp("spin")
        boot_both(vm, bytes(a0), bytes(a1))
        assert vm.run(timeout=RUN_TIMEOUT).reason == "stopped"
        ap, user, system = seen["ap"]
        assert seen["ap_stats"] == (0, 0)                        # not folded in yet
        assert (ap.pio, ap.mmio) == (LOOPS, LOOPS)
        assert user >= 0.0 and system >= 0.0
        assert (seen["machine"].pio, seen["machine"].mmio) == (2 * LOOPS + 1, 2 * LOOPS)
        # Once the runs returned, so_far and stats agree.
        after = vm.loops[1].so_far()
        assert (after[0].pio, after[0].mmio) == (vm.loops[1].stats.pio, vm.loops[1].stats.mmio) == (LOOPS, LOOPS)
        assert after[1:] == tuple(vm.loops[1].cpu_s)
    finally:
        vm.close()
        bus.close()
        gm.close()


def triple_fault() -> Asm:
    # ud2 with an empty IDT: #UD, #GP, #DF all find no gate: KVM_EXIT_SHUTDOWN.
    return Asm(origin=AP_ENTRY).raw(b"\x0f\x0b")


@needs_kvm
@pytest.mark.parametrize("faulting", [0, 1])
def test_one_vcpus_shutdown_stops_both(m2, faulting):
    vm, _, _ = m2
    spin = bytes(Asm().label("x").jmp("x"))
    fault = bytes(triple_fault())
    boot_both(vm, fault if faulting == 0 else spin, fault if faulting == 1 else spin, cpl=0)
    res = vm.run(timeout=RUN_TIMEOUT, halt_poll=None)
    assert res.reason == "shutdown", res.report()
    assert res.message.startswith(f"vCPU {faulting}: triple fault"), res.message
    assert res.exit_status == 1
    assert vcpu_threads() == []
    # The machine runs again afterwards (a stop is not sticky): vCPU 0 stops it.
    boot_both(vm, bytes(Asm().mov_imm32(RDX, DONE_PORT).out(1).label("s").jmp("s")), spin, cpl=0)
    assert vm.run(timeout=RUN_TIMEOUT, halt_poll=None).reason == "stopped"
    assert vcpu_threads() == []


@needs_kvm
def test_halt_needs_every_vcpu_parked(m2):
    vm, _, _ = m2
    # vCPU 0 halts with interrupts off at once; vCPU 1 first does LOOPS
    # exits, then halts too: the run ends only then, as "halt".
    a1 = Asm(origin=AP_ENTRY).mov_imm32(RCX, LOOPS).mov_imm32(RDX, 0x81)
    a1.label("l").out(1).dec_ecx().jnz("l").cli().hlt()
    boot_both(vm, bytes(Asm().cli().hlt()), bytes(a1), cpl=0)
    res = vm.run(timeout=RUN_TIMEOUT, halt_poll=0.05)
    assert res.reason == "halt", res.report()
    assert vm.loops[1].stats.pio == LOOPS
    assert vcpu_threads() == []


@needs_kvm
def test_an_ap_waiting_for_init_counts_as_parked():
    # A second vCPU nobody started (as before Linux brings up its APs):
    # vCPU 0's halt with interrupts off ends the machine.
    gm = GuestMemory(4 << 20)
    bus = pci.Bus(gm)
    vm = KvmVm(gm, bus, cpus=2)
    try:
        setup_long_mode(vm, bytes(Asm().cli().hlt()), cpl=0)
        res = vm.run(timeout=RUN_TIMEOUT, halt_poll=0.05)
        assert res.reason == "halt", res.report()
        assert vm.loops[1].stats.pio == vm.loops[1].stats.mmio == 0
    finally:
        vm.close()
        bus.close()
        gm.close()


class Ended(Exception):
    pass


@needs_kvm
def test_a_signal_handler_that_ends_the_run_joins_every_vcpu(m2):
    # ^C or SIGTERM: the main thread's handler raises; vCPU 1 (which blocks
    # the process's signals) is stopped and joined all the same.
    import os
    import signal
    vm, _, _ = m2
    spin = bytes(Asm().label("x").jmp("x"))
    boot_both(vm, spin, spin)

    def raise_ended(*_):
        raise Ended()
    old = signal.signal(signal.SIGUSR1, raise_ended)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        with pytest.raises(Ended):
            vm.run(timeout=RUN_TIMEOUT, halt_poll=0.05)
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, old)
    assert vcpu_threads() == []
