"""The boot information the launcher leaves for the kernel
(lguest_jit/hw/firmware.py): the MP table Linux finds at its first look
and the TSC frequency in CPUID, read back the way Linux 6.1 reads them."""
import os
import struct

import pytest

from lguest_jit.hw import firmware
import naive
from lguest_jit.hw.memory import GuestMemory


def _sum8(b: bytes) -> int:
    return sum(b) & 0xFF


def scan_like_linux(mem: bytes, base: int = 0, length: int = 0x400):
    """mpparse.c smp_scan_config(): 16-byte steps until a valid "_MP_"."""
    for off in range(base, base + length, 16):
        mpf = mem[off:off + 16]
        if mpf[:4] == b"_MP_" and mpf[8] == 1 and _sum8(mpf) == 0 and mpf[9] in (1, 4):
            return off, (off - base) // 16 + 1
    return None, length // 16


def parse_mp_table(mpc: bytes):
    """mpparse.c smp_read_mpc(): the header and every entry, checked as Linux
    checks them; (header fields, [entry bytes])."""
    sig, tlen, spec, _, oem, product, _, _, count, lapic, _ = struct.unpack_from("<4sHBB8s12sIHHII", mpc)
    assert (sig, spec, lapic) == (b"PCMP", 4, 0xFEE00000)
    assert _sum8(mpc[:tlen]) == 0
    entries, pos = [], 44
    while pos < tlen:
        size = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}[mpc[pos]]
        entries.append(mpc[pos:pos + size])
        pos += size
    assert pos == tlen and len(entries) == count
    return tlen, entries


@pytest.mark.parametrize("cpus", [1, 2, 3, 64, firmware.MAX_CPUS])
def test_mp_table_is_found_at_the_second_step_and_lists_every_cpu(cpus):
    gm = GuestMemory(4 << 20)
    try:
        addr, length = firmware.write_mp_table(gm, cpus)
        low = gm.read(0, 0x400)
        mpc = gm.read(addr, length)
        below_table = gm.read(0x20, addr - 0x20)
    finally:
        gm.close()
    assert low[:16] == bytes(16)                   # a null pointer still reads zeros
    assert below_table == bytes(len(below_table))  # nothing in the BIOS data area, GDT or low RAM
    at, steps = scan_like_linux(low)
    assert (at, steps) == (firmware.MPF_ADDR, 2)
    physptr, feature1 = struct.unpack_from("<I", low, at + 4)[0], low[at + 11]
    assert feature1 == 0 and physptr == addr       # a table, not a default configuration
    assert 0xF0000 <= addr and addr + length <= 0x100000     # in the e820-reserved BIOS area
    tlen, entries = parse_mp_table(mpc)
    assert tlen == length == 44 + 20 * cpus + 2 * 8
    cpu_entries = [e for e in entries if e[0] == 0]
    assert [e[1] for e in cpu_entries] == list(range(cpus))                 # APIC ids 0..N-1
    assert [e[3] for e in cpu_entries] == [0x03] + [0x01] * (cpus - 1)      # all enabled, the first the BSP
    assert {e[2] for e in cpu_entries} == {0x14}                            # integrated local APICs
    buses = sorted((e[1], e[2:8]) for e in entries if e[0] == 1)
    assert buses == [(0, b"PCI   "), (1, b"ISA   ")]
    assert not any(e[0] in (2, 3) for e in entries)                       # no I/O APIC, no routing


@pytest.mark.parametrize("cpus", [1, 2, 7, 255])
def test_mp_tables_match_the_plain_reference_byte_for_byte(cpus):
    pointer, table = naive.mp_tables(cpus, firmware.MPC_ADDR)
    assert firmware.mp_floating_pointer(firmware.MPC_ADDR) == pointer
    assert firmware.mp_config_table(cpus) == table
    assert _sum8(pointer) == 0 and _sum8(table) == 0


@pytest.mark.parametrize("cpus", [0, -1, firmware.MAX_CPUS + 1, 1024])
def test_mp_table_refuses_cpu_counts_it_cannot_describe(cpus):
    with pytest.raises(ValueError, match="processors"):
        firmware.mp_config_table(cpus)


def linux_tsc_khz(leaf15, leaf16, crystal_known=True):
    """native_calibrate_tsc() and cpu_khz_from_cpuid(), with its 32-bit
    unsigned arithmetic."""
    eax, ebx, ecx, _ = leaf15
    if not eax or not ebx:
        return 0, 0, 0
    crystal_khz = ecx // 1000
    tsc = ((crystal_khz * ebx) & 0xFFFFFFFF) // eax
    lapic_period = ((crystal_khz * 1000) & 0xFFFFFFFF) // 100      # HZ=100
    return tsc, leaf16[0] * 1000, lapic_period


@pytest.mark.parametrize("khz", [2_100_000, 2_445_406, 3_000_000, 1_000_000, 3_999_999, 4_300_000, 25_000])
def test_tsc_leaves_give_linux_the_exact_frequency(khz):
    leaves = firmware.tsc_leaves(khz)
    tsc, cpu_khz, lapic_period = linux_tsc_khz(leaves[0x15], leaves[0x16])
    assert tsc == khz
    assert abs(cpu_khz - khz) < 1000
    if leaves[0x15][2] == firmware.CRYSTAL_HZ:
        assert lapic_period == 10_000_000          # 1 GHz APIC timer (KVM's), per 10 ms tick


def test_tsc_leaves_refuse_what_linux_cannot_compute():
    assert firmware.tsc_leaves(0) is None
    assert firmware.tsc_leaves(5_000_001) is None    # neither form fits 32 bits exactly


def test_kvm_vcpu_reports_the_tsc_frequency():
    from lguest_jit.hw.kvm import kvm_available
    from lguest_jit.vcpu import KvmVm
    why = kvm_available()
    if why:
        pytest.skip(f"no usable KVM: {why}")
    gm = GuestMemory(16 << 20)
    vm = KvmVm(gm)
    try:
        khz = vm.tsc_khz()
        leaves = {e.function: (e.eax, e.ebx, e.ecx, e.edx) for e in vm.vcpu_cpuid() if e.index == 0}
    finally:
        vm.close()
        gm.close()
    assert khz > 0
    want = firmware.tsc_leaves(khz)
    if want is None or leaves[0][0] < 0x16:
        pytest.skip(f"TSC {khz} kHz or max leaf {leaves[0][0]:#x}: no CPUID frequency to give")
    assert leaves[0x15] == want[0x15] and leaves[0x16] == want[0x16]
    assert linux_tsc_khz(leaves[0x15], leaves[0x16])[0] == khz


def test_tsc_early_khz_is_added_only_where_linux_ignores_the_leaves():
    add = firmware.with_tsc_khz_param
    assert add("console=hvc0 tsc=reliable", "AuthenticAMD", 2596130) == "console=hvc0 tsc=reliable tsc_early_khz=2596130"
    assert add("console=hvc0", "HygonGenuine", 2000000) == "console=hvc0 tsc_early_khz=2000000"
    assert add("console=hvc0", "GenuineIntel", 2100000) == "console=hvc0"      # CPUID 0x15/0x16 say it
    assert add("a tsc_early_khz=1000 b", "AuthenticAMD", 2596130) == "a tsc_early_khz=1000 b"   # the user's wins
    assert add("console=hvc0", "AuthenticAMD", 0) == "console=hvc0"            # unknown: Linux calibrates


def test_guest_tsc_names_the_vendor_and_frequency_a_vcpu_gets():
    """guest_tsc's throwaway vCPU gets what the machine's vCPUs get: the
    vendor of their CPUID leaf 0 and their KVM_GET_TSC_KHZ."""
    from lguest_jit.hw.kvm import guest_tsc, kvm_available
    from lguest_jit.vcpu import KvmVm
    why = kvm_available()
    if why:
        pytest.skip(f"no usable KVM: {why}")
    vendor, khz = guest_tsc()
    gm = GuestMemory(16 << 20)
    vm = KvmVm(gm)
    try:
        leaf0 = next(e for e in vm.vcpu_cpuid() if e.function == 0)
        assert vendor == struct.pack("<III", leaf0.ebx, leaf0.edx, leaf0.ecx).decode()
        assert khz == vm.tsc_khz() > 0
    finally:
        vm.close()
        gm.close()
    assert guest_tsc("/nonexistent/kvm") == ("", 0)


def test_with_apic_id_sets_only_the_id_fields():
    from lguest_jit.hw.kvm import kvm_cpuid_entry2

    def entry(fn, idx, regs):
        e = kvm_cpuid_entry2(function=fn, index=idx)
        e.eax, e.ebx, e.ecx, e.edx = regs
        return e
    entries = [entry(1, 0, (0xA10F11, 0x01020800, 0xF7F83203, 0x178BFBFF)),
               entry(0xB, 0, (1, 2, 0x100, 1)), entry(0xB, 1, (4, 2, 0x201, 1)),
               entry(0x1F, 0, (1, 2, 0x100, 1)), entry(4, 0, (5, 6, 7, 8))]
    firmware.with_apic_id(entries, 7)
    got = [(e.function, e.index, e.eax, e.ebx, e.ecx, e.edx) for e in entries]
    assert got == [(1, 0, 0xA10F11, 0x07020800, 0xF7F83203, 0x178BFBFF),
                   (0xB, 0, 1, 2, 0x100, 7), (0xB, 1, 4, 2, 0x201, 7),
                   (0x1F, 0, 1, 2, 0x100, 7), (4, 0, 5, 6, 7, 8)]
    with pytest.raises(ValueError):
        firmware.with_apic_id(entries, 256)


def test_vcpu0_cpuid_names_its_own_apic_id_not_the_host_cpus():
    """KVM_GET_SUPPORTED_CPUID carries the id of the host CPU the ioctl ran
    on; the guest's `cpuid` on vCPU 0 must say 0, its local APIC's id."""
    from lguest_jit import pci
    from lguest_jit.hw.kvm import kvm_available
    from lguest_jit.hw.tinyguest import DATA, RAX, RBX, RCX, RDI, RDX, Asm, setup_long_mode
    from lguest_jit.vcpu import KvmVm
    why = kvm_available()
    if why:
        pytest.skip(f"no usable KVM: {why}")

    def stop_on_port(port, size, is_write, value):     # the guest ends with a port write
        vm.stop()
        return 0
    # Made on the highest-numbered host CPU we may use (not 0 on a
    # multi-core host), so a host id leaking through would show.
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(allowed)})
    gm = GuestMemory(4 << 20)
    bus = pci.Bus(gm)
    bus.set_fallback(pio=stop_on_port, mmio=lambda addr, size, is_write, value: 0)
    try:
        vm = KvmVm(gm, bus)
    finally:
        os.sched_setaffinity(0, allowed)
    try:
        a = Asm().mov_imm32(RDI, DATA)
        for leaf, out in ((1, RBX), (0xB, RDX)):
            a.mov_imm32(RAX, leaf).mov_imm32(RCX, 0).raw(b"\x0f\xa2")          # cpuid
            if out == RBX:
                a.raw(b"\x89\xd8")                                              # mov eax, ebx
            else:
                a.raw(b"\x89\xd0")                                              # mov eax, edx
            a.store_rdi(4).raw(b"\x48\x83\xc7\x08")                             # [rdi] = eax; rdi += 8
        a.mov_imm32(RDX, 0x80).out(1).label("spin").jmp("spin")
        setup_long_mode(vm, bytes(a), cpl=0)
        res = vm.run(timeout=10.0)
        ebx1, edx_b = struct.unpack("<I4xI", gm.read(DATA, 12))
    finally:
        vm.close()
        gm.close()
    assert res.reason == "stopped", res.report()
    assert ebx1 >> 24 == 0
    assert edx_b == 0
