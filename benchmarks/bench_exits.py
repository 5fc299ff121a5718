"""``lguest-jit bench exits``: exits handled per second by the KVM vCPU loop.

Two tiny guests loop forever: one does ``out dx, al`` (at CPL0: PVM does not
allow port I/O at CPL3, so each iteration also pays for KVM's instruction
emulator), the other a 4-byte MMIO write above RAM at CPL3 (native until
the exit).  Our loop (``KvmVm.run``, with a bus that does nothing) handles
n exits; the reference is a bare ``ioctl(KVM_RUN)`` loop on the same guest
that ignores every exit — the cost of the round trip into the kernel and
back with no decoding and no bus call.  The gap between them is the
launcher's per-exit overhead.

There is no pure-Python comparison: this loop is Python either way.
"""
from __future__ import annotations

import fcntl

from benchmarks.common import live, rate, min_time_for


class _NullBus:
    """Answers every access; what is measured is the loop around it."""

    def __init__(self):
        self.vm = None

    def pio(self, port, size, is_write, value):
        return 0

    def mmio(self, addr, size, is_write, value):
        return 0


def _guests():
    from lguest_jit.hw.tinyguest import RAX, RDI, RDX, Asm
    pio = Asm().mov_imm32(RDX, 0x510).mov_imm32(RAX, 1).label("l").out(1).jmp("l")
    mmio = Asm().mov_imm64(RDI, 0xE0000000).mov_imm32(RAX, 1).label("l").store_rdi(4).jmp("l")
    return {"pio": (bytes(pio), 0), "mmio": (bytes(mmio), 3)}


def measure(quick: bool = False) -> dict:
    from lguest_jit.hw.kvm import KVM_RUN, KvmVm
    from lguest_jit.hw.memory import GuestMemory
    from lguest_jit.hw.tinyguest import setup_long_mode

    t = min_time_for(quick)
    gm = GuestMemory(2 << 20)
    bus = _NullBus()
    vm = KvmVm(gm, bus)
    out = {}
    guests = _guests()
    try:
        with live("bench exits: KVM vCPU loop vs bare KVM_RUN", 2 * len(guests)) as step:
            for kind, (code, cpl) in guests.items():
                setup_long_mode(vm, code, cpl=cpl)

                def ours(n):
                    res = vm.run(max_exits=n, halt_poll=None)
                    if res.reason != "stopped":
                        raise RuntimeError(f"exit benchmark guest ended: {res.report()}")

                def bare(n, fd=vm.vcpu_fd, ioctl=fcntl.ioctl):
                    for _ in range(n):
                        ioctl(fd, KVM_RUN, 0)

                step(f"{kind}: KvmVm.run")
                out[f"{kind}_exits_per_s"] = rate(ours, min_time=t)
                step(f"{kind}: bare KVM_RUN")
                out[f"bare_kvm_run_{kind}_per_s"] = rate(bare, min_time=t)
    finally:
        vm.close()
        gm.close()
    out["bare_kvm_run_per_s"] = out["bare_kvm_run_pio_per_s"]
    return out


def run(quick: bool = False) -> dict:
    from lguest_jit.hw.kvm import kvm_available
    why = kvm_available()
    if why is not None:
        return {"benchmark": "exits", "skipped": why}
    m = measure(quick)
    return {"benchmark": "exits", "unit": "guest exits per second, one vCPU",
            "metrics": m,
            "overhead_us": {k: 1e6 / m[f"{k}_exits_per_s"] - 1e6 / m[f"bare_kvm_run_{k}_per_s"]
                            for k in ("pio", "mmio")}}
