"""The boot information the launcher leaves for the kernel
(lguest_jit/hw/firmware.py): the MP table Linux finds at its first look
and the TSC frequency in CPUID, read back the way Linux 6.1 reads them."""
import struct

import pytest

from lguest_jit.hw import firmware
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


def test_mp_table_is_found_at_the_second_step_and_parses():
    gm = GuestMemory(4 << 20)
    try:
        addr, length = firmware.write_mp_table(gm)
        low = gm.read(0, 0x400)
    finally:
        gm.close()
    assert low[:16] == bytes(16)                   # a null pointer still reads zeros
    at, steps = scan_like_linux(low)
    assert (at, steps) == (firmware.MPF_ADDR, 2)
    physptr, feature1 = struct.unpack_from("<I", low, at + 4)[0], low[at + 11]
    assert feature1 == 0 and physptr == addr       # a table, not a default configuration
    mpc = low[physptr:physptr + length]
    sig, tlen, spec, _, oem, product, _, _, count, lapic, _ = struct.unpack_from("<4sHBB8s12sIHHII", mpc)
    assert (sig, tlen, spec, lapic) == (b"PCMP", length, 4, 0xFEE00000)
    assert _sum8(mpc) == 0
    entries, pos = [], 44
    while pos < tlen:
        kind = mpc[pos]
        size = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}[kind]
        entries.append(mpc[pos:pos + size])
        pos += size
    assert pos == tlen and len(entries) == count
    cpus = [e for e in entries if e[0] == 0]
    buses = sorted((e[1], e[2:8]) for e in entries if e[0] == 1)
    assert len(cpus) == 1 and cpus[0][1] == 0 and cpus[0][3] == 0x03      # APIC id 0, enabled BSP
    assert buses == [(0, b"PCI   "), (1, b"ISA   ")]
    assert not any(e[0] in (2, 3) for e in entries)                       # no I/O APIC, no routing


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
