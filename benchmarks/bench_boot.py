"""Boot time of the default guest: to its /init and to power-off.

The guest runs its ``boot`` workload (init prints ``LGJ-INIT``, then powers
off) through the real command line, with console, block and rng devices.
The same boot again under ``--profile`` at the default rate, beside it
(``profiled_vs_plain``: what sampling costs the guest).
In the same run, the same kernel and initramfs under any other launcher on
this machine: QEMU (TCG, since QEMU cannot step over the instructions this
host's KVM emulator rejects), booting the bzImage the guest build keeps.
Otherwise the report says why nothing is comparable.
"""
from __future__ import annotations

import os
import re
import shutil
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


def _guest():
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
    found, why = _guest()
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


def measure_qemu(quick: bool = False) -> dict:
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        return {"not_comparable": "no other launcher on this machine (qemu-system-x86_64 is not installed)"}
    found, why = _guest()
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
    profiled = measure(quick, profile=True)
    return {"benchmark": "boot", "unit": "wall seconds (lower is better)", "lguest_jit": ours,
            "lguest_jit_profiled": profiled, "profiled_vs_plain": _profile_cost(ours, profiled),
            "qemu": measure_qemu(quick),
            "python": {"not_measured": "the boot is dominated by emulated guest kernel code, not by the "
                                       "launcher's kernels; see bench vring/blk/pci for Numba vs Python"}}
