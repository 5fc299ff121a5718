"""KVM state save/restore (hw/vmstate.py) on tiny guests: a vCPU saved from
one VM and restored into a fresh one is the same vCPU, bit for bit, and
carries on as the original does."""
import struct

import pytest

from lguest_jit import pci
from lguest_jit.hw import kvm as K
from lguest_jit.hw import vmstate
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.hw.tinyguest import RAX, RBX, RDI, Asm, setup_long_mode
from lguest_jit.vcpu import KvmVm

KVM_MISSING = K.kvm_available()
needs_kvm = pytest.mark.skipif(KVM_MISSING is not None, reason=f"no usable KVM: {KVM_MISSING}")

REPORT = 0xE0000000      # MMIO above RAM: each store is one exit the bus records
HANDLER = 0x11000
VECTOR = 0x40

# MSRs a guest kernel owns, set to values nobody would pick by chance.
MSRS = {0x174: 0x10, 0x175: 0x7FF000, 0x176: 0xFFFFFFFF81000123, 0xC0000081: 0x0023001000000000,
        0xC0000082: 0xFFFFFFFF81000456, 0xC0000084: 0x47700, 0xC0000102: 0x1234567000}
# Varying on their own between two reads: the TSC ticks, the PIT and the
# kvmclock count host time.
MOVING = {"clock", "pit2"}


class Recorder(pci.Bus):
    """A bus that records MMIO writes and stops the run at each one."""

    def __init__(self, gm):
        super().__init__(gm)
        self.set_fallback(pio=lambda port, size, is_write, value: 0, mmio=self.on_mmio)
        self.vm = None
        self.writes = []

    def on_mmio(self, addr, size, is_write, value):
        if is_write:
            self.writes.append((addr, value))
            self.vm.stop()
        return 0


def _make(gm):
    bus = Recorder(gm)
    vm = KvmVm(gm, bus)
    bus.vm = vm
    return vm, bus


def _guest():
    """CPL3: report 1 (the snapshot point), then rbx + 1 and xmm0's low
    quadword moved back to rax, each as one MMIO store."""
    a = Asm().mov_imm64(RDI, REPORT).mov_imm32(RAX, 1).store_rdi(8)
    a.raw(b"\x48\x8d\x43\x01")                 # lea rax, [rbx + 1]
    a.store_rdi(8)
    a.raw(b"\x66\x48\x0f\x7e\xc0")             # movq rax, xmm0
    a.store_rdi(8)
    a.label("spin").jmp("spin")
    return bytes(a)


def _handler():
    """The pending interrupt's handler (CPL0): report 0xEE, return."""
    h = Asm(HANDLER).push_rax().push_rdi().mov_imm64(RDI, REPORT + 8).mov_imm32(RAX, 0xEE).store_rdi(8)
    return bytes(h.pop_rdi().pop_rax().iretq())


def _run_to_next_report(vm, bus):
    n = len(bus.writes)
    res = vm.run(timeout=20, halt_poll=None)
    assert res.reason == "stopped" and len(bus.writes) == n + 1, res.report()
    return bus.writes[-1]


def _comparable(state):
    classes = {k: v for k, v in state["classes"].items() if k not in MOVING}
    msrs = {k: v for k, v in state["msrs"].items() if int(k) != vmstate.MSR_IA32_TSC}
    return classes, msrs


@needs_kvm
def test_probe_names_every_state_class():
    with _closing(GuestMemory(2 << 20)) as gm:
        vm, _ = _make(gm)
        try:
            found = vmstate.probe(vm)
        finally:
            vm.close()
    assert set(found) == {c.name for c in vmstate.CLASSES} | {"msrs"}
    # What this host's KVM cannot give back would break restore: list it.
    broken = {k: v for k, v in found.items() if k != "msrs" and v != "ok"}
    assert not broken or all("capability missing" in v for v in broken.values()), broken


class _closing:
    def __init__(self, gm):
        self.gm = gm

    def __enter__(self):
        return self.gm

    def __exit__(self, *exc):
        self.gm.close()


@needs_kvm
def test_every_register_class_survives_save_and_restore_bit_for_bit():
    gm_a, gm_b = GuestMemory(2 << 20), GuestMemory(2 << 20)
    vm_a, bus_a = _make(gm_a)
    vm_b, bus_b = _make(gm_b)
    try:
        gm_a.write(HANDLER, _handler())
        setup_long_mode(vm_a, _guest(), cpl=3, handlers={VECTOR: HANDLER},
                        regs={"rbx": 0x1122334455667788, "rcx": 0xC0FFEE, "r15": 0xF15})
        vmstate.set_msrs(vm_a, MSRS)
        # xmm0 through the XSAVE area (legacy region offset 160), with the SSE
        # bit in XSTATE_BV: KVM_SET_FPU alone leaves an "init" SSE state that
        # XRSTOR turns back into zeros on this host.
        xs = bytearray(vmstate.get(vm_a, "xsave"))
        xs[160:176] = struct.pack("<QQ", 0x0DDBA11CAFEF00D, 0x5EED)
        xs[512:520] = struct.pack("<Q", struct.unpack("<Q", xs[512:520])[0] | 0b11)   # x87 | SSE
        vmstate.put(vm_a, "xsave", bytes(xs))
        assert _run_to_next_report(vm_a, bus_a) == (REPORT, 1)

        # An interrupt in the middle of delivery at the snapshot point.
        ev = vm_a.get_events()
        ev.interrupt.injected, ev.interrupt.nr, ev.interrupt.soft = 1, VECTOR, 0
        vm_a.set_events(ev)

        saved = vmstate.save(vm_a)
        assert {(str(k), v) for k, v in MSRS.items()} <= set(saved["msrs"].items())
        gm_b.mem[:] = gm_a.mem
        refused = vmstate.restore(vm_b, saved)
        assert refused == []
        again = vmstate.save(vm_b)
        want_classes, want_msrs = _comparable(saved)
        got_classes, got_msrs = _comparable(again)
        for name in want_classes:
            assert got_classes[name] == want_classes[name], f"{name} differs after restore"
        assert got_msrs == want_msrs

        # Both carry on identically: the interrupt is delivered first, then
        # the guest reports rbx + 1 and xmm0 from the restored registers.
        seen = []
        for vm, bus in ((vm_a, bus_a), (vm_b, bus_b)):
            seen.append([_run_to_next_report(vm, bus) for _ in range(3)])
        assert seen[0] == seen[1] == [(REPORT + 8, 0xEE), (REPORT, 0x1122334455667789),
                                      (REPORT, 0x0DDBA11CAFEF00D)]
    finally:
        vm_a.close()
        vm_b.close()
        gm_a.close()
        gm_b.close()


@needs_kvm
def test_restore_rejects_a_blob_of_the_wrong_size():
    with _closing(GuestMemory(2 << 20)) as gm:
        vm, _ = _make(gm)
        try:
            with pytest.raises(ValueError, match="regs: 10 bytes"):
                vmstate.put(vm, "regs", b"\0" * 10)
        finally:
            vm.close()


def _make2(gm):
    bus = Recorder(gm)
    vm = KvmVm(gm, bus, cpus=2)
    bus.vm = vm
    return vm, bus


@needs_kvm
def test_every_vcpu_of_a_two_vcpu_guest_survives_save_and_restore():
    """Each vCPU's classes and MSRs saved and restored on their own vCPU:
    vCPU 1's registers in the copy are vCPU 1's, not vCPU 0's, bit for
    bit, and both vCPUs carry on there (each reports its own rbx + 1).
    A state for another number of vCPUs is refused."""
    gm_a, gm_b = GuestMemory(2 << 20), GuestMemory(2 << 20)
    vm_a, bus_a = _make2(gm_a)
    vm_b, bus_b = _make2(gm_b)
    try:
        # vCPU 0 reports rbx + 1 once at REPORT; vCPU 1 waits for DATA to be
        # non-zero then reports its rbx + 1 at REPORT + 8 (CPL0 both).
        a0 = Asm().mov_imm64(RDI, REPORT).raw(b"\x48\x8d\x43\x01").store_rdi(8).label("s").jmp("s")
        ap = 0x10800
        a1 = Asm(ap).mov_imm32(RDI, 0x20000).label("w").cmp_byte_rdi_0().jz("w")
        a1.mov_imm64(RDI, REPORT + 8).raw(b"\x48\x8d\x43\x01").store_rdi(8).label("s").jmp("s")
        for vcpu, entry, rbx, stack in ((0, 0x10000, 0x100, 0xC000), (1, ap, 0x200, 0x70000)):
            setup_long_mode(vm_a, bytes(a0), cpl=0, vcpu=vcpu, entry=entry, regs={"rbx": rbx, "rsp": stack})
        gm_a.write(ap, bytes(a1))
        gm_a.write(0x20000, b"\0")
        # Both vCPUs spin at the snapshot point: vCPU 0 after its report, vCPU 1 waiting.
        assert _run_to_next_report(vm_a, bus_a) == (REPORT, 0x101)
        saved = vmstate.save(vm_a)
        assert len(saved["vcpus"]) == 1 and set(saved["vcpus"][0]["classes"]) <= {
            c.name for c in vmstate.CLASSES if c.fd == vmstate.VCPU}
        with pytest.raises(ValueError, match="of 1 vCPUs, this machine has 2"):
            vmstate.restore(vm_b, {k: v for k, v in saved.items() if k != "vcpus"})
        gm_b.mem[:] = gm_a.mem
        assert vmstate.restore(vm_b, saved) == []
        again = vmstate.save(vm_b)
        for want, got in ((saved, again), (saved["vcpus"][0], again["vcpus"][0])):
            assert _comparable(got) == _comparable(want)
        assert vm_b.get_regs(1).rbx == 0x200 and vm_b.get_regs(0).rbx == 0x100
        gm_b.write(0x20000, b"\1")                  # let vCPU 1 go on in the copy
        assert _run_to_next_report(vm_b, bus_b) == (REPORT + 8, 0x201)
    finally:
        for vm, bus, gm in ((vm_a, bus_a, gm_a), (vm_b, bus_b, gm_b)):
            vm.close()
            bus.close()
            gm.close()
