"""``lguest-jit bench exits``: exits handled per second by the KVM vCPU loop.

Two tiny guests loop forever: one does ``out dx, al`` to an unclaimed port
(at CPL0: PVM does not allow port I/O at CPL3, so each iteration also pays
for KVM's instruction emulator), the other a 4-byte MMIO write at CPL3
(native until the exit) to a device's ``device_feature_select`` in BAR0,
so it goes through the BAR0 kernel.  Three loops run each guest for n
exits, side by side in one run:

* ``compiled``: ``KvmVm.run`` over a real ``pci.Bus``, i.e. the nogil
  vCPU kernel with the flat dispatch tables (the launcher's loop);
* ``python_handler``: the same loop over a ``pci.Bus`` whose Python
  fallback answers every access with 0 and no work: each exit leaves the
  compiled loop, is finished in Python and re-enters (what a Python-only
  port device costs per exit; there is no separate Python loop any more);
* ``bare``: a compiled loop of KVM_RUN ioctls that ignores every exit --
  the round trip into the kernel and back with no decoding and no device.

``overhead_us`` is the launcher's work per exit, compiled minus bare, and
``vs_bare`` bare time over compiled time: each the median over paired
rounds (the same number of exits on every loop, back to back, the order
reversed each round), because MMIO exits on a software KVM vary by tens of
percent from moment to moment.  ``metrics`` holds each loop's best round
(``best_round_overhead_us`` their difference: the old, noisier figure).
The pure-Python run of the same loop is NUMBA_DISABLE_JIT=1.
"""
from __future__ import annotations

import resource
import statistics
import time

from numba import njit

PAIRED_ROUNDS = 15
PAIRED_ROUNDS_QUICK = 5

from benchmarks.common import live, min_time_for, rate
from lguest_jit.hw.kvm import KVM_RUN
from lguest_jit.hw.libc import sys_ioctl


@njit(nogil=True, cache=True)
def _bare(fd, n):
    """n KVM_RUN round trips, every exit ignored (EINTR retried)."""
    done = 0
    while done < n:
        if sys_ioctl(fd, KVM_RUN, 0) >= 0:
            done += 1
    return done


def _guests(bar0):
    from lguest_jit.hw.tinyguest import RAX, RDI, RDX, Asm
    pio = Asm().mov_imm32(RDX, 0x510).mov_imm32(RAX, 1).label("l").out(1).jmp("l")
    mmio = Asm().mov_imm64(RDI, bar0).mov_imm32(RAX, 1).label("l").store_rdi(4).jmp("l")
    return {"pio": (bytes(pio), 0), "mmio": (bytes(mmio), 3)}


def measure(quick: bool = False) -> dict:
    import numpy as np

    from lguest_jit import pci
    from lguest_jit.hw.memory import GuestMemory
    from lguest_jit.hw.tinyguest import setup_long_mode
    from lguest_jit.vcpu import KvmVm

    class _Dev(pci.VirtioDevice):
        device_type = 4
        name = "bench"
        queue_max_sizes = (16,)
        config = np.zeros(0, dtype=np.uint8)

    t = min_time_for(quick)
    gm = GuestMemory(2 << 20)
    bus = pci.Bus(gm)
    dev = bus.add_device(_Dev())
    null_bus = pci.Bus(gm)                     # every access answered by Python, with no work
    null_bus.set_fallback(pio=lambda *access: 0, mmio=lambda *access: 0)
    vms = {"compiled": KvmVm(gm, bus), "python_handler": KvmVm(gm, null_bus)}
    out = {}
    guests = _guests(dev.bar0)
    rounds = PAIRED_ROUNDS_QUICK if quick else PAIRED_ROUNDS
    try:
        with live("bench exits: compiled vCPU loop vs Python-handled exits vs bare KVM_RUN (compiled)",
                  len(guests) * (rounds + 1)) as step:
            for kind, (code, cpl) in guests.items():
                for loop, vm in vms.items():
                    setup_long_mode(vm, code, cpl=cpl)

                def ours(n, vm=vms["compiled"]):
                    res = vm.run(max_exits=n, halt_poll=None)
                    if res.reason != "stopped":
                        raise RuntimeError(f"exit benchmark guest ended: {res.report()}")

                def old(n, vm=vms["python_handler"]):
                    vm.run(max_exits=n, halt_poll=None)

                loops = {f"{kind}_compiled": ours, f"{kind}_python_handler": old,
                         f"bare_{kind}": lambda n, fd=vms["compiled"].vcpu_fd: _bare(fd, n)}
                step(f"{kind}: calibrating")
                for fn in loops.values():
                    fn(1000)                                  # loads, first exits
                n = max(1000, int(rate(loops[f"bare_{kind}"], min_time=0.05, repeat=1) * t / 4))
                # Paired rounds: the same n exits on each loop, back to back,
                # order reversed every round.  The hypervisor's noise (tens of
                # percent on MMIO exits here) hits a round's pair alike, so
                # the median of the per-round differences is the launcher's
                # own cost; a best-of per loop would compare unlike moments.
                secs = {name: [] for name in loops}
                for r in range(rounds):
                    step(f"{kind}: paired round {r + 1}/{rounds}")
                    order = list(loops) if r % 2 == 0 else list(loops)[::-1]
                    for name in order:
                        t0 = time.perf_counter()
                        loops[name](n)
                        secs[name].append(time.perf_counter() - t0)
                for name, xs in secs.items():
                    out[f"{name}_per_s"] = n / min(xs)
                bare = secs[f"bare_{kind}"]
                for loop in ("compiled", "python_handler"):
                    xs = secs[f"{kind}_{loop}"]
                    diffs = [(x - b) * 1e6 / n for x, b in zip(xs, bare)]
                    out[f"{kind}_{loop}_overhead_us"] = statistics.median(diffs)
                    q = statistics.quantiles(diffs, n=4)
                    out[f"{kind}_{loop}_overhead_us_iqr"] = [q[0], q[2]]
                    out[f"{kind}_{loop}_vs_bare"] = statistics.median(b / x for x, b in zip(xs, bare))
                out[f"{kind}_exits_per_round"] = n
                # User-mode CPU per exit: the launcher's own work, which
                # other processes' load does not inflate (KVM_RUN is system time).
                for name, fn in loops.items():
                    u0 = resource.getrusage(resource.RUSAGE_THREAD).ru_utime
                    fn(n)
                    out[f"{name}_user_us_per_exit"] = (resource.getrusage(resource.RUSAGE_THREAD).ru_utime - u0) \
                        * 1e6 / n
    finally:
        for vm in vms.values():
            vm.close()
        bus.close()
        null_bus.close()
        gm.close()
    return out


def run(quick: bool = False) -> dict:
    from lguest_jit.hw.kvm import kvm_available
    why = kvm_available()
    if why is not None:
        return {"benchmark": "exits", "skipped": why}
    m = measure(quick)
    us = lambda rate: 1e6 / rate   # noqa: E731
    kinds = ("pio", "mmio")
    return {"benchmark": "exits", "unit": "guest exits per second, one vCPU",
            "metrics": {k: v for k, v in m.items() if k.endswith("_per_s")},
            "overhead_us": {k: m[f"{k}_compiled_overhead_us"] for k in kinds},
            "python_handler_overhead_us": {k: m[f"{k}_python_handler_overhead_us"] for k in kinds},
            "overhead_us_iqr": {k: m[f"{k}_compiled_overhead_us_iqr"] for k in kinds},   # the rounds' spread
            "vs_bare": {k: m[f"{k}_compiled_vs_bare"] for k in kinds},
            "exits_per_round": {k: m[f"{k}_exits_per_round"] for k in kinds},
            "best_round_overhead_us": {k: us(m[f"{k}_compiled_per_s"]) - us(m[f"bare_{k}_per_s"]) for k in kinds},
            "user_us_per_exit": {k: v for k, v in m.items() if k.endswith("_user_us_per_exit")}}
