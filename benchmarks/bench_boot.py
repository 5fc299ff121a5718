"""Boot time of the default guest: to its /init and to power-off.

The guest runs its ``boot`` workload (init prints ``LGJ-INIT``, then powers
off) through the real command line, with console, block and rng devices.
The same boot again under ``--profile`` at the default rate, beside it
(``profiled_vs_plain``: what sampling costs the guest).  Two boots on a
busy host differ by more than 5 % on their own, so the cost is also
measured directly (``profile_cost``): a tiny guest at CPL3 reads the TSC
in a loop and logs every gap between two reads longer than 2 us; the
share of its time lost in short gaps (< 1 ms: exits, not the host
preempting the thread) with and without sampling, runs interleaved.
In the same run, the same kernel and initramfs under any other launcher on
this machine: QEMU (TCG, since QEMU cannot step over the instructions this
host's KVM emulator rejects), booting the bzImage the guest build keeps.
Otherwise the report says why nothing is comparable.
"""
from __future__ import annotations

import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from .common import live

TIMEOUT = 1200
_INIT = re.compile(rb"LGJ-INIT (\S+)\s")       # the whole uptime figure, not a piece of it


def _timed(title: str, argv, env=None, end: bytes | None = None, quick: bool = False) -> dict:
    """Run ``argv``; wall seconds until LGJ-INIT appears and until exit, or
    until ``end`` appears (QEMU does not exit when the guest halts).  With
    ``quick`` the guest is stopped at /init: its power-off is not timed.
    The stages show as live progress: a boot is minutes of silence."""
    with live(title, 1 if quick else 2) as step:
        step("booting to /init")
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env)
        timer = threading.Timer(TIMEOUT, proc.kill)     # a hung guest ends the benchmark, not the run
        timer.start()
        seen = b""
        t_init = guest_uptime = t_end = None
        try:
            while True:
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                seen += chunk
                if t_init is None and (m := _INIT.search(seen)):
                    t_init = time.monotonic() - t0
                    guest_uptime = float(m.group(1))
                    if quick:
                        proc.kill()
                        break
                    step("/init reached, powering off")
                if end is not None and end in seen:
                    t_end = time.monotonic() - t0
                    proc.kill()
                    break
        finally:
            timer.cancel()
            status = proc.wait()
    saw_end = t_end is not None          # QEMU was killed after the guest halted: a clean end
    if not saw_end:
        t_end = time.monotonic() - t0
    out = {"seconds_to_init": t_init, "seconds_to_exit": t_end,
           "exit_status": 0 if saw_end else status, "guest_uptime_at_init": guest_uptime}
    if quick and t_init is not None:
        out.update(seconds_to_exit=None, exit_status=None, note="--quick: stopped at /init; power-off not timed")
    if t_init is None:
        out["error"] = "the guest never reached init; last output: " + seen[-400:].decode(errors="replace")
    return out


def cached_default_guest():
    try:
        from guest.build import cached_guest, cache_dir, default_cmdline
    except ImportError as exc:
        return None, f"guest package unavailable: {exc}"
    g = cached_guest()
    if g is None:
        return None, "the default guest is not built yet (bash scripts/boot-default-guest.sh builds it)"
    return (g, cache_dir, default_cmdline), None


def measure(quick: bool = False, profile: bool = False) -> dict:
    from lguest_jit.hw.kvm import kvm_available
    why = kvm_available()
    if why:
        return {"skipped": f"no usable KVM: {why}"}
    found, why = cached_default_guest()
    if found is None:
        return {"skipped": why}
    (vmlinux, initrd), _, default_cmdline = found
    cmdline = default_cmdline("boot", "hvc0").split()
    with tempfile.TemporaryDirectory() as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(16 << 20)
        folded = os.path.join(d, "boot.folded")
        argv = [sys.executable, "-m", "lguest_jit.main", "--rng", f"--block={disk}", f"--initrd={initrd}", "256",
                *([f"--profile={folded}"] if profile else []), str(vmlinux), *cmdline]
        out = _timed("bench boot: lguest-jit" + (" --profile (default rate)" if profile else "")
                     + " (minutes under software KVM)", argv, quick=quick)
        if profile and os.path.exists(folded):
            with open(folded) as f:
                out["profile_samples"] = sum(int(line.rsplit(" ", 1)[1]) for line in f if line.strip())
        return out


def _profile_cost(plain: dict, profiled: dict) -> dict:
    """Plain over profiled time (a rate ratio: 1.0 is no cost, 0.95 is 5 % slower)."""
    return {k: plain[k] / profiled[k] for k in ("seconds_to_init", "seconds_to_exit")
            if plain.get(k) and profiled.get(k)}


_GAP_LOG = 0x40000            # the gaps, 8 bytes each, a 128 KiB ring (the AND below wraps it)


def _gap_logger(threshold: int) -> bytes:
    """CPL3 code: r8 = TSC; loop { t = TSC; if t - r8 >= threshold: [rdi] = t - r8, rdi += 8 (ring); r8 = t }."""
    from lguest_jit.hw.tinyguest import RDI, Asm
    tsc = bytes.fromhex("0f31" "48c1e220" "4809d0")                      # rdtsc; shl rdx, 32; or rax, rdx
    a = Asm().mov_imm32(RDI, _GAP_LOG).raw(tsc + bytes.fromhex("4989c0"))  # mov r8, rax
    a.label("loop").raw(tsc + bytes.fromhex("4889c1" "4c29c0" "4989c8" "483d") + struct.pack("<I", threshold))
    a.raw(b"\x72").raw(bytes([(a.labels["loop"] - (len(a.buf) + 1)) & 0xFF]))             # jb loop
    a.raw(bytes.fromhex("488907" "4883c708" "4881e7ffff0500")).jmp("loop")                 # log, advance, wrap
    return bytes(a)


def measure_sample_cost(quick: bool = False) -> dict:
    """Share of a guest's time lost in short gaps, plain and profiled at the default rate."""
    from lguest_jit import pci
    from lguest_jit.hw.hosts import default_sample_hz
    from lguest_jit.hw.memory import GuestMemory
    from lguest_jit.hw.profile import Profiler
    from lguest_jit.hw.tinyguest import setup_long_mode
    from lguest_jit.vcpu import KvmVm

    seconds, rounds, hz = 1.0, (2 if quick else 5), default_sample_hz()
    gm = GuestMemory(2 << 20)
    bus = pci.Bus(gm)
    bus.set_fallback(pio=lambda *access: 0, mmio=lambda *access: 0)     # no devices: every access reads 0
    vm = KvmVm(gm, bus)
    lost = {False: [], True: []}
    samples = 0
    try:
        khz = vm.tsc_khz()
        if not khz:
            return {"not_measured": "KVM does not give the TSC frequency"}
        code = _gap_logger(2 * khz // 1000)
        with live("bench boot: what a sample costs a guest (TSC gaps)", 2 * rounds) as step:
            for i in range(rounds):
                for profiled in (False, True):
                    step(f"round {i + 1}: {'profiled' if profiled else 'plain'}")
                    setup_long_mode(vm, code, cpl=3)
                    gm.write(_GAP_LOG, bytes(0x20000))
                    prof = Profiler(hz).attach(vm) if profiled else None
                    if prof is not None:
                        prof.start()
                    try:
                        vm.run(timeout=seconds, halt_poll=None)
                    finally:
                        if prof is not None:
                            prof.stop()
                            samples += len(prof.rips)
                            vm.profiler = None
                    gaps = struct.unpack("<16384Q", gm.read(_GAP_LOG, 0x20000))
                    short = sum(g for g in gaps if 0 < g < khz)           # < 1 ms
                    lost[profiled].append(100.0 * short / (khz * 1000 * seconds))
    finally:
        vm.close()
        gm.close()
    plain, profiled = statistics.median(lost[False]), statistics.median(lost[True])
    return {"hz": hz, "samples_per_s": samples / (rounds * seconds),
            "guest_time_lost_pct_plain": plain, "guest_time_lost_pct_profiled": profiled,
            "guest_time_lost_pct_to_sampling": profiled - plain}


def measure_qemu(quick: bool = False) -> dict:
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        return {"not_comparable": "no other launcher on this machine (qemu-system-x86_64 is not installed)"}
    found, why = cached_default_guest()
    if found is None:
        return {"not_comparable": why}
    (vmlinux, initrd), _, default_cmdline = found
    bzimage = os.path.join(os.path.dirname(vmlinux), "bzImage")
    if not os.path.exists(bzimage):
        return {"not_comparable": "QEMU cannot load the ELF vmlinux and no bzImage was built "
                                  "(python -m guest.build --bzimage)"}
    cmdline = default_cmdline("boot", "ttyS0")
    argv = [qemu, "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", bzimage, "-initrd", str(initrd), "-append", cmdline]
    out = _timed("bench boot: QEMU (TCG)", argv, end=b"System halted", quick=quick)
    out["note"] = ((out["note"] + "; " if "note" in out else "")
                   + "seconds_to_exit is when the guest halted (QEMU keeps running after a halt); "
                   "QEMU with TCG: every guest instruction is translated in software, user code included; "
                   "lguest-jit runs guest user code natively and kernel code in KVM's emulator")
    return out


def run(quick: bool = False) -> dict:
    ours = measure(quick)
    if "skipped" in ours:
        return {"benchmark": "boot", "skipped": ours["skipped"]}
    # --quick (bench all --quick has a 2-minute budget) boots once: the
    # sampling's cost is still measured, by profile_cost.
    profiled = ({"not_measured": "--quick boots once; profile_cost measures what sampling costs the guest"}
                if quick else measure(quick, profile=True))
    return {"benchmark": "boot", "unit": "wall seconds (lower is better)", "lguest_jit": ours,
            "lguest_jit_profiled": profiled, "profiled_vs_plain": _profile_cost(ours, profiled),
            "profile_cost": measure_sample_cost(quick),
            "qemu": measure_qemu(quick),
            "python": {"not_measured": "the boot is dominated by emulated guest kernel code, not by the "
                                       "launcher's kernels; see bench vring/blk/pci for Numba vs Python"}}
