"""Issue 13, fault 2: under KVM the queue-notify ioeventfds follow every BAR0
move, with overlaps resolved by the bus's rule (lowest slot decodes).  A tiny
CPL0 guest moves BARs through conf1 and notifies; the eventfd counts and the
MMIO exits that reached the bus tell where each notify went."""
import os
import select

import pytest

from lguest_jit import pci, testing
from lguest_jit.hw import kvm as K
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.hw.tinyguest import RAX, RDI, RDX, Asm, setup_long_mode
from lguest_jit.vcpu import KvmVm

KVM_MISSING = K.kvm_available()
needs_kvm = pytest.mark.skipif(KVM_MISSING is not None, reason=f"no usable KVM: {KVM_MISSING}")
DONE_PORT = 0xF4
NEW_BAR = 0xE0100000


class Dev(pci.VirtioDevice):
    device_type = 4
    queue_max_sizes = (16,)

    def __init__(self, name):
        self.name = name


def count(fd):
    n = 0
    while select.select([fd], [], [], 0)[0]:
        n += os.eventfd_read(fd)
    return n


@pytest.fixture
def machine():
    gm = GuestMemory(4 << 20)
    bus = pci.Bus(gm)
    a, b = bus.add_device(Dev("a")), bus.add_device(Dev("b"))
    vm = KvmVm(gm, bus)
    bus.add_ports(DONE_PORT, 1, lambda *_: vm.stop() or 0)
    yield gm, bus, vm, a, b
    vm.close()
    bus.close()
    gm.close()


@needs_kvm
def test_notify_ioeventfds_follow_bar_moves_in_a_guest(machine):
    gm, bus, vm, a, b = machine
    a_old, b_old = a.bar0, b.bar0
    g = Asm()

    def move(t, bar):
        g.mov_imm32(RDX, 0xCF8).mov_imm32(RAX, testing.conf1_address(t.slot, pci.PCI_BASE_ADDRESS_0)).out(4)
        g.mov_imm32(RDX, 0xCFC).mov_imm32(RAX, bar).out(4)

    def notify(bar):
        g.mov_imm64(RAX, 0).mov_imm64(RDI, bar).store_at(2, pci.NOTIFY_OFF)

    move(b, NEW_BAR)
    notify(NEW_BAR)          # B at its new place: B's eventfd, no exit
    notify(b_old)            # where B was: nothing decodes, an exit, no eventfd
    move(b, a_old)           # B onto A's page: A (lower slot) decodes it
    notify(a_old)            # A's eventfd only
    move(b, NEW_BAR)         # and away again: B's notify comes back
    notify(NEW_BAR)
    g.mov_imm32(RDX, DONE_PORT).out(1).label("spin").jmp("spin")
    setup_long_mode(vm, bytes(g), cpl=0)
    res = vm.run(timeout=10.0)
    assert res.reason == "stopped", res.report()
    assert count(b.notify_fds[0]) == 2          # before the fix: 1 (the stale registration at b_old)
    assert count(a.notify_fds[0]) == 1
    # The loop counts exits by register: the one at b_old decoded nowhere,
    # and no notify exited to a device (before the fix: NEW_BAR's did).
    assert bus.mmio_counts[pci.MAX_SLOTS, pci.M_OTHER] == 1
    assert bus.mmio_counts[a.slot, pci.M_NOTIFY] == bus.mmio_counts[b.slot, pci.M_NOTIFY] == 0


@needs_kvm
def test_sync_registers_exactly_what_decodes(machine):
    gm, bus, vm, a, b = machine
    testing.conf1_write(bus, b.slot, pci.PCI_BASE_ADDRESS_0, 4, a.bar0)     # B hidden under A
    assert vm._bus_ioeventfds == set(bus.ioeventfds()) == {(a.bar0 + pci.NOTIFY_OFF, 2, a.notify_fds[0])}
    testing.conf1_write(bus, b.slot, pci.PCI_BASE_ADDRESS_0, 4, 0xFFFFFFFF)  # sizing probe: decodes nothing
    testing.conf1_write(bus, b.slot, pci.PCI_BASE_ADDRESS_0, 4, NEW_BAR)
    assert vm._bus_ioeventfds == {(a.bar0 + pci.NOTIFY_OFF, 2, a.notify_fds[0]),
                                  (NEW_BAR + pci.NOTIFY_OFF, 2, b.notify_fds[0])}
    # KVM holds exactly these: registering either again is refused as a duplicate.
    with pytest.raises(K.KvmError):
        vm.add_ioeventfd(NEW_BAR + pci.NOTIFY_OFF, 2, b.notify_fds[0])
    vm.add_ioeventfd(0xE0200000 + pci.NOTIFY_OFF, 2, b.notify_fds[0])   # a free address is fine


@needs_kvm
def test_an_address_kvm_refuses_falls_back_to_the_exit_path(machine):
    gm, bus, vm, a, b = machine
    other = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        vm.add_ioeventfd(NEW_BAR + pci.NOTIFY_OFF, 2, other)        # someone else holds the address
        testing.conf1_write(bus, b.slot, pci.PCI_BASE_ADDRESS_0, 4, NEW_BAR)   # must not raise
        assert (NEW_BAR + pci.NOTIFY_OFF, 2, b.notify_fds[0]) not in vm._bus_ioeventfds
        assert b.bar0 == NEW_BAR
    finally:
        vm.close()
        os.close(other)
