"""MSI-X through KVM: GSI routing (the default irqchip routes kept, one MSI
route per vector) and an irqfd per vector, checked with tiny guests whose
local APIC takes the messages.  The bus here is a fake with the PCI bus's
MSI interface (``msi_routes``, ``add_msi_listener``)."""
import os

import pytest

from lguest_jit.hw import kvm as K
from lguest_jit.hw.tinyguest import DATA, RAX, RDI, RDX, Asm, setup_long_mode
from test_kvm import COUNT_PORT, READY_PORT, RUN_TIMEOUT, FakeBus, _irq_guest, done, make_vm, needs_kvm

LAPIC = 0xFEE00000
APIC_SVR, APIC_EOI = 0xF0, 0xB0


class MsiBus(FakeBus):
    """FakeBus plus MSI vectors: (eventfd, address or None, data) each."""

    def __init__(self, gm, vectors):
        super().__init__(gm)
        self.vectors = vectors
        self.listeners = []

    def msi_routes(self):
        return list(self.vectors)

    def add_msi_listener(self, fn):
        self.listeners.append(fn)


def _msi_guest(gm, vec: int, count: int) -> bytes:
    """CPL0 guest: software-enable the local APIC, say READY, then sti;hlt
    until ``count`` interrupts on ``vec`` were counted at DATA (the handler
    EOIs the APIC), and report the count on COUNT_PORT."""
    h = Asm(0x11000)
    h.push_rax().push_rdx().push_rdi().mov_imm32(RDI, DATA).raw(b"\xfe\x07")        # inc byte [rdi]
    h.mov_imm32(RDI, DATA + 1).mov_imm32(RAX, vec).store_rdi(1)
    h.mov_imm32(RDI, LAPIC + APIC_EOI).mov_imm32(RAX, 0).store_rdi(4)
    h.pop_rdi().pop_rdx().pop_rax().iretq()
    gm.write(0x11000, bytes(h))
    a = Asm()
    a.mov_imm32(RDI, LAPIC + APIC_SVR).mov_imm32(RAX, 0x1FF).store_rdi(4)          # APIC on, spurious 0xFF
    a.mov_imm32(RDI, DATA).mov_imm32(RDX, READY_PORT).out(1)
    a.label("wait").sti().hlt().cli().raw(bytes([0x80, 0x3F, count])).jnz("wait")
    a.load_rdi(1).mov_imm32(RDX, COUNT_PORT).out(1)
    return bytes(done(a))


def _run(vm, code, vec, timeout):
    """Run a CPL0 tiny guest whose handler for ``vec`` is at 0x11000."""
    try:
        setup_long_mode(vm, code, cpl=0, handlers={vec: 0x11000})
        return vm.run(timeout=timeout)
    finally:
        vm.close()


def test_default_routes_are_kvms():
    routes = K.default_irq_routes()
    assert len(routes) == 16 * 2 + 8
    assert (0, K.KVM_IRQCHIP_PIC_MASTER, 0) in routes and (10, K.KVM_IRQCHIP_PIC_SLAVE, 2) in routes
    assert (23, K.KVM_IRQCHIP_IOAPIC, 23) in routes
    assert K.msi_deliverable(0xFEE01000) and not K.msi_deliverable(0xDEAD0000)
    assert not K.msi_deliverable(1 << 32 | 0xFEE00000) and not K.msi_deliverable(None)


@needs_kvm
@pytest.mark.parametrize("routed", [True, False])
def test_vector_eventfd_delivers_a_message_to_the_local_apic(gm, routed):
    vec = 0x41
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
    # Vector 1 is the one the guest waits for; unrouted, it addresses no APIC.
    bus = MsiBus(gm, [(fds[0], LAPIC, 0x30), (fds[1], LAPIC if routed else 0xDEAD0000, vec)])
    bus.on_port[READY_PORT] = lambda: os.eventfd_write(fds[1], 1)
    try:
        vm = make_vm(gm, bus)
        assert bus.listeners == [vm.sync_msi_routes]
        assert vm._msi_routes == ([(K.MSI_GSI_BASE, LAPIC, 0x30), (K.MSI_GSI_BASE + 1, LAPIC, vec)] if routed
                                  else [(K.MSI_GSI_BASE, LAPIC, 0x30)])
        updates = vm.n_route_updates
        vm.sync_msi_routes()                      # unchanged tables: no ioctl
        assert vm.n_route_updates == updates
        res = _run(vm, _msi_guest(gm, vec, 1), vec, 3.0 if not routed else RUN_TIMEOUT)
    finally:
        for fd in fds:
            os.close(fd)
    if routed:
        assert res.reason == "stopped", res.report()
        assert ("pio", COUNT_PORT, 1, True, 1) in bus.accesses
        assert gm.read(DATA, 2) == bytes([1, vec])
    else:
        # the message went nowhere: the guest still waits when the run times out
        assert res.reason == "timeout", res.report()
        assert gm.read(DATA, 1) == b"\0"


@needs_kvm
def test_routing_keeps_the_pic_lines(gm):
    """KVM_SET_GSI_ROUTING replaces every route: the legacy lines (the PIT,
    the UART, INTx) must still reach the PIC afterwards."""
    line = 5
    efd, vfd = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    bus = MsiBus(gm, [(vfd, LAPIC, 0x40)])
    bus.irqs.append((line, efd))
    bus.on_port[READY_PORT] = lambda: os.eventfd_write(efd, 1)
    try:
        vm = make_vm(gm, bus, irq_mode="irqfd")
        assert vm.n_route_updates == 1
        code, vec = _irq_guest(gm, line, 1)
        res = _run(vm, code, vec, RUN_TIMEOUT)
    finally:
        os.close(efd)
        os.close(vfd)
    assert res.reason == "stopped", res.report()
    assert gm.read(DATA, 2) == bytes([1, vec])


@needs_kvm
def test_signal_msi_delivers_the_message_to_the_local_apic(gm):
    """KVM_SIGNAL_MSI, injected once the guest's APIC is on: the handler of
    exactly the message's vector runs once (its data byte names the vector)."""
    vec = 0x52
    bus = FakeBus(gm)
    vm = make_vm(gm, bus)
    bus.on_port[READY_PORT] = lambda: vm.signal_msi(LAPIC, vec)
    res = _run(vm, _msi_guest(gm, vec, 1), vec, RUN_TIMEOUT)
    assert res.reason == "stopped", res.report()
    assert ("pio", COUNT_PORT, 1, True, 1) in bus.accesses
    assert gm.read(DATA, 2) == bytes([1, vec])


@needs_kvm
def test_each_message_reaches_the_vcpu_its_address_names(gm):
    """Two vCPUs, one vector addressed to each local APIC (destination ID
    in address bits 19:12, as Linux spreads queue vectors): the routes keep
    the address, so each message interrupts that vCPU and no other.  The
    handler counts per APIC id (read from the LAPIC) at DATA + 0x10 + id."""
    import threading
    import time
    vec, ready, ap_stack = 0x42, DATA + 0x20, 0x70000
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
    bus = MsiBus(gm, [(fds[0], LAPIC | 0 << 12, vec), (fds[1], LAPIC | 1 << 12, vec)])
    h = Asm(0x11000)
    h.push_rax().push_rdi().mov_imm32(RDI, LAPIC + 0x20).load_rdi(4)              # APIC ID register
    h.raw(b"\xc1\xe8\x18").raw(b"\x05" + (DATA + 0x10).to_bytes(4, "little"))       # shr eax, 24; add eax, ..
    h.raw(b"\x89\xc7").raw(b"\xf0\xfe\x07")                                         # mov edi, eax; lock inc [rdi]
    h.mov_imm32(RDI, LAPIC + APIC_EOI).mov_imm32(RAX, 0).store_rdi(4)
    h.pop_rdi().pop_rax().iretq()
    a = Asm().mov_imm32(RDI, LAPIC + APIC_SVR).mov_imm32(RAX, 0x1FF).store_rdi(4)   # APIC on
    a.mov_imm32(RDI, ready).raw(b"\xf0\xfe\x07")                                    # lock inc byte [ready]
    a.label("wait").sti().hlt().cli().jmp("wait")
    seen = []

    def drive():
        def wait_for(at, value):
            deadline = time.monotonic() + RUN_TIMEOUT
            while gm.read(at, 1)[0] != value and time.monotonic() < deadline:
                time.sleep(0.01)
        wait_for(ready, 2)
        os.eventfd_write(fds[1], 1)                   # to APIC 1
        wait_for(DATA + 0x11, 1)
        seen.append(gm.read(DATA + 0x10, 2))
        os.eventfd_write(fds[0], 1)                   # to APIC 0
        wait_for(DATA + 0x10, 1)
        seen.append(gm.read(DATA + 0x10, 2))
        vm.stop()
    try:
        vm = make_vm(gm, bus, cpus=2)
        assert [r[1] for r in vm._msi_routes] == [LAPIC, LAPIC | 1 << 12]   # destination kept
        gm.write(0x11000, bytes(h))
        setup_long_mode(vm, bytes(a), cpl=0, handlers={vec: 0x11000})
        setup_long_mode(vm, bytes(a), cpl=0, handlers={vec: 0x11000}, vcpu=1, regs={"rsp": ap_stack})
        gm.write(0x11000, bytes(h))
        t = threading.Thread(target=drive)
        t.start()
        try:
            res = vm.run(timeout=RUN_TIMEOUT * 2)
        finally:
            vm.stop()
            t.join()
            vm.close()
    finally:
        for fd in fds:
            os.close(fd)
    assert res.reason == "stopped", res.report()
    assert seen == [bytes([0, 1]), bytes([1, 1])]     # vCPU 1's message on vCPU 1 only, then vCPU 0's
