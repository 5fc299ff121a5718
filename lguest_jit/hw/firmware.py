"""What a PC's firmware would leave for the kernel, where Linux looks first.

* An Intel MultiProcessor (MP 1.4) floating pointer at physical address
  0x10, pointing at its configuration table in the BIOS area (0xF0000).
  Without one, Linux scans the first KiB, the last KiB of base memory and
  the 64 KiB BIOS area for the "_MP_" signature, remapping every 16-byte
  step through the fixmap: seconds of emulated kernel code on a
  software-KVM host (guest/README.md, "Boot timeline").  Found at its
  second step, the scan ends there.  (Address 0 itself stays zero: a null
  pointer read there finds nothing.)  The table itself sits where PC
  firmware keeps its tables, in the e820-reserved BIOS area, so that
  it grows with the CPU count without running into the BIOS data area
  (0x400: Linux reads the EBDA pointer at 0x40E and writes the warm-reset
  vector at 0x467 when it starts an AP) or the GDT at 0x500.

  The table describes this machine: ``cpus`` processors with local APIC
  ids 0..cpus-1 (KVM gives vCPU i APIC id i; the first is the boot
  processor, the one Linux checks against its own APIC id), the local APIC
  at 0xfee00000, a PCI bus and an ISA bus, and no I/O APIC, so every
  interrupt from the 8259 PIC (KVM's in-kernel one) reaches the boot CPU
  through its local APIC's LINT0 in ExtINT mode; MSI messages go to any
  CPU's local APIC directly.  Linux starts the other processors itself
  (INIT/SIPI through its local APIC), so the launcher starts none.  Linux
  enables LINT0 as ExtINT only when I/O APIC set-up is off, hence `noapic`
  on the guest command line (with no table it turns I/O APIC support off
  by itself).  With no interrupt source entries Linux prints "BIOS bug, no
  explicit IRQ entries" and builds ISA defaults it never uses (there is no
  I/O APIC to program).

* Each vCPU's own APIC id in CPUID (leaf 1 EBX[31:24], the initial APIC
  id; leaves 0xB/0x1F EDX, the x2APIC id), equal to its local APIC's id.
  KVM passes what KVM_SET_CPUID2 gives verbatim, and what
  KVM_GET_SUPPORTED_CPUID returns there is the id of the *host* CPU the
  ioctl ran on (measured on our hosts: 1 on the second core), so without
  this a vCPU 0 could tell Linux it is APIC 1 ("APIC id mismatch") and two
  vCPUs could claim the same id.

* The TSC frequency in CPUID leaves 0x15 (TSC/crystal ratio and crystal
  clock) and 0x16 (base MHz), so Linux neither calibrates the TSC against
  the PIT nor calibrates its delay loop, and marks the frequency known.
  Linux 6.1 reads them only on GenuineIntel CPUs (native_calibrate_tsc,
  cpu_khz_from_cpuid); elsewhere `tsc_early_khz=` on the command line does
  the same, so the launcher adds it there (``with_tsc_khz_param``).  The
  crystal is given as 1 GHz, the rate of KVM's local APIC timer, which
  Linux derives from it (lapic_timer_period).

  Without a known frequency (an AMD host before the parameter was added)
  Linux on our software-KVM hosts fails to calibrate the TSC against the
  emulated PIT, marks it unstable, keeps time with refined-jiffies, and
  fails to verify its local APIC timer: the PIT through the 8259 then
  drives every tick, and with more than one CPU vCPU 0 forwards each to
  the others by IPI.  Measured (AMD, 2 vCPUs, 4 CPU-bound processes):
  vCPU 0's thread spent all its time in that emulated tick path (22 s
  system, 0.6 s running guest user code, over 115 s) and two vCPUs were
  slower than one.
"""
from __future__ import annotations

import struct
from fractions import Fraction

MPF_ADDR = 0x10             # second 16-byte step of Linux's smp_scan_config()
MPC_ADDR = 0xF0000          # configuration table: BIOS area, e820-reserved (loader.py)
MPC_AREA_END = 0x100000     # the table must end below the kernel's first MiB
LAPIC_ADDR = 0xFEE00000
LAPIC_VERSION = 0x14        # integrated local APIC
MP_SPEC_REV = 4             # MP 1.4

# Entry types (MP 1.4 table 4-3); the header is 44 bytes (§4.2).
MP_PROCESSOR, MP_BUS = 0, 1
MP_HEADER_SIZE = 44
CPU_ENABLED, CPU_BOOTPROCESSOR = 0x01, 0x02
# A processor entry's local APIC id is one byte (MP 1.4 §4.3.1) and xAPIC
# id 0xFF is the broadcast address: ids 0..254 at most.
MAX_CPUS = 255

CRYSTAL_HZ = 1_000_000_000
_U32 = 1 << 32


def _checksummed(raw: bytearray, at: int) -> bytes:
    """Set byte `at` so that all bytes of raw sum to 0 mod 256."""
    raw[at] = (-sum(raw)) & 0xFF
    return bytes(raw)


def mp_config_table(cpus: int = 1, cpuid_signature: int = 0, cpuid_features: int = 0) -> bytes:
    """The MP configuration table ("PCMP"): header, one processor entry per
    CPU (APIC ids 0..cpus-1, the first the boot processor), buses PCI 0
    and ISA 1."""
    if not 1 <= cpus <= MAX_CPUS:
        raise ValueError(f"an MP table lists 1 to {MAX_CPUS} processors, not {cpus}")
    entries = b"".join(
        struct.pack("<BBBBII8x", MP_PROCESSOR, apic_id, LAPIC_VERSION,
                    CPU_ENABLED | (CPU_BOOTPROCESSOR if apic_id == 0 else 0), cpuid_signature, cpuid_features)
        for apic_id in range(cpus))
    entries += struct.pack("<BB6s", MP_BUS, 0, b"PCI   ") + struct.pack("<BB6s", MP_BUS, 1, b"ISA   ")
    header = bytearray(struct.pack("<4sHBB8s12sIHHII", b"PCMP", MP_HEADER_SIZE + len(entries), MP_SPEC_REV, 0,
                                   b"LGUESTJT", b"lguest-jit  ", 0, 0, cpus + 2, LAPIC_ADDR, 0))
    return _checksummed(header + entries, 7)


def mp_floating_pointer(table_addr: int = MPC_ADDR) -> bytes:
    """The 16-byte "_MP_" structure pointing at the configuration table."""
    # Feature bytes stay 0 (virtual-wire mode).  Setting IMCRP (PIC mode)
    # was tried: a kernel without `noapic` still got no device interrupts.
    raw = bytearray(struct.pack("<4sIBBBB4x", b"_MP_", table_addr, 1, MP_SPEC_REV, 0, 0))
    return _checksummed(raw, 10)


def write_mp_table(gm, cpus: int = 1, cpuid_signature: int = 0, cpuid_features: int = 0) -> tuple[int, int]:
    """Write the floating pointer at MPF_ADDR and the table for ``cpus``
    processors at MPC_ADDR into guest memory; returns (table address,
    table length)."""
    table = mp_config_table(cpus, cpuid_signature, cpuid_features)
    if MPC_ADDR + len(table) > min(MPC_AREA_END, gm.size):
        raise ValueError(f"an MP table of {len(table)} bytes does not fit at {MPC_ADDR:#x}")
    gm.write(MPF_ADDR, mp_floating_pointer(MPC_ADDR))
    gm.write(MPC_ADDR, table)
    return MPC_ADDR, len(table)


def tsc_leaves(tsc_khz: int) -> dict[int, tuple[int, int, int, int]] | None:
    """CPUID 0x15 and 0x16 (eax, ebx, ecx, edx) announcing tsc_khz, or None
    when it cannot be said exactly within Linux's 32-bit arithmetic
    (crystal_khz * numerator must fit in 32 bits)."""
    if tsc_khz <= 0:
        return None
    ratio = Fraction(tsc_khz * 1000, CRYSTAL_HZ)
    if (CRYSTAL_HZ // 1000) * ratio.numerator < _U32:
        leaf15 = (ratio.denominator, ratio.numerator, CRYSTAL_HZ, 0)
    elif tsc_khz * 1000 < _U32:
        # Crystal = TSC: exact, but the APIC timer period Linux derives is
        # then wrong (harmless with the TSC-deadline timer it prefers).
        leaf15 = (1, 1, tsc_khz * 1000, 0)
    else:
        return None
    mhz = tsc_khz // 1000
    return {0x15: leaf15, 0x16: (mhz, mhz, CRYSTAL_HZ // 1_000_000, 0)}


def with_tsc_frequency(entries: list, tsc_khz: int) -> list:
    """kvm_cpuid_entry2 list with leaves 0x15/0x16 set to tsc_khz (added
    when absent), if the maximum basic leaf reaches them."""
    leaves = tsc_leaves(tsc_khz)
    if not leaves:
        return entries
    top = next((e.eax for e in entries if e.function == 0 and e.index == 0), 0)
    by_leaf = {e.function: e for e in entries if e.function in leaves and e.index == 0}
    for leaf, regs in leaves.items():
        if leaf > top:
            continue
        e = by_leaf.get(leaf)
        if e is None:
            e = type(entries[0])() if entries else None
            if e is None:
                continue
            e.function, e.index = leaf, 0
            entries.append(e)
        e.eax, e.ebx, e.ecx, e.edx = regs
    return entries


def with_tsc_khz_param(cmdline: str, vendor: str, tsc_khz: int) -> str:
    """The guest's command line with ``tsc_early_khz=tsc_khz`` appended
    where Linux ignores the CPUID frequency leaves (a CPU ``vendor`` other
    than GenuineIntel), unless the line already sets it or the frequency
    is unknown (0).  Linux reads the parameter on every vendor."""
    words = cmdline.split()
    if vendor == "GenuineIntel" or tsc_khz <= 0 or any(w.startswith("tsc_early_khz=") for w in words):
        return cmdline
    return " ".join(words + [f"tsc_early_khz={tsc_khz}"])


def with_apic_id(entries: list, apic_id: int) -> list:
    """kvm_cpuid_entry2 list with the initial APIC id (leaf 1 EBX[31:24])
    and the x2APIC id (EDX of every leaf 0xB/0x1F sub-leaf) set to
    ``apic_id``; other fields untouched."""
    if not 0 <= apic_id <= 0xFF:
        raise ValueError(f"an initial APIC id is one byte, not {apic_id}")
    for e in entries:
        if e.function == 1 and e.index == 0:
            e.ebx = (e.ebx & 0x00FFFFFF) | (apic_id << 24)
        elif e.function in (0xB, 0x1F):
            e.edx = apic_id
    return entries
