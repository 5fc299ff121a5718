"""What the vCPU's CPUID offers beyond the host's: choices made for the
host the guest runs on (the TSC frequency leaves are in firmware.py).

Fast string operations (``--erms``): with ERMS (CPUID 7.0 EBX bit 9) or
FSRM (7.0 EDX bit 4) a Linux guest clears and copies memory with ``rep
stosb``/``rep movsb`` (``clear_page_erms``, ``memcpy_erms``,
``copy_user_enhanced_fast_string``, ``copy_mc_enhanced_fast_string``).
On hardware that is the fast path.  Where KVM's instruction emulator runs
guest kernel code (a software KVM, ``hosts.software_kvm``), a ``rep``
string instruction is emulated one iteration at a time: one emulated step
per *byte*.  Without the two bits the kernel picks its 8-byte forms
(``clear_page_orig``, ``memcpy_orig``, ``copy_user_generic_unrolled``), so
``auto`` hides them on software-KVM hosts only; ``on`` always offers what
the host has, ``off`` always hides them.  Measured with ``lguest-jit bench
guest`` (README, "What a guest gets").
"""
from __future__ import annotations

ERMS_LEAF, ERMS_EBX_BIT = 7, 9        # Enhanced REP MOVSB/STOSB
FSRM_EDX_BIT = 4                      # Fast Short REP MOV
ERMS_CHOICES = ("auto", "on", "off")


def hides_fast_strings(choice: str, software_kvm: str | None) -> bool:
    """Whether ``--erms=choice`` hides ERMS/FSRM on this host."""
    if choice not in ERMS_CHOICES:
        raise ValueError(f"--erms={choice}: must be one of {', '.join(ERMS_CHOICES)}")
    return choice == "off" or (choice == "auto" and software_kvm is not None)


def without_fast_strings(entries: list) -> list:
    """kvm_cpuid_entry2 list with ERMS and FSRM cleared (leaf 7, subleaf 0)."""
    for e in entries:
        if e.function == ERMS_LEAF and e.index == 0:
            e.ebx &= ~(1 << ERMS_EBX_BIT) & 0xFFFFFFFF
            e.edx &= ~(1 << FSRM_EDX_BIT) & 0xFFFFFFFF
    return entries


def fast_strings_offered(entries: list) -> bool:
    """ERMS or FSRM in a CPUID list (KVM_GET_CPUID2: what the guest sees)."""
    return any(e.function == ERMS_LEAF and e.index == 0
               and (e.ebx >> ERMS_EBX_BIT & 1 or e.edx >> FSRM_EDX_BIT & 1) for e in entries)


def cpuid_hook(choice: str, software_kvm: str | None):
    """The ``KvmVm(cpuid_hook=...)`` for ``--erms=choice``: None when the
    host's CPUID is offered as it is."""
    return without_fast_strings if hides_fast_strings(choice, software_kvm) else None


def guest_cmdline(cmdline: str, hide: bool) -> str:
    """The kernel command line the guest gets.  A software KVM such as
    kvm_pvm gives the vCPU the host's leaf 7 whatever KVM_SET_CPUID2 said
    (re-read with KVM_GET_CPUID2), so hiding ERMS/FSRM also takes Linux's
    ``clearcpuid=``: the names are added to the guest's own list (Linux
    reads only the last ``clearcpuid=``), or one is appended."""
    if not hide:
        return cmdline
    words = cmdline.split()
    at = max((i for i, w in enumerate(words) if w.startswith("clearcpuid=")), default=None)
    if at is None:
        return " ".join(words + ["clearcpuid=erms,fsrm"])
    have = [n for n in words[at].partition("=")[2].split(",") if n]
    words[at] = "clearcpuid=" + ",".join(have + [n for n in ("erms", "fsrm") if n not in have])
    return " ".join(words)
