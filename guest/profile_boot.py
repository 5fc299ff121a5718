"""Boot the default guest under our KVM and show where the time goes.

    python -m guest.profile_boot [--timeout S] [--sample S] [--workload W] [--console-log FILE]

Console on ttyS0 (the 8250), a scratch virtio-blk disk and virtio-rng.
Prints a timeline (wall seconds at "Run /init", LGJ-INIT, every LGJ-STEP,
LGJ-DONE), the exit counters and assists, and a histogram of guest RIPs
sampled every --sample seconds, mapped to vmlinux symbols with `nm`.

Sampling kicks the vCPU out of KVM_RUN (the same signal ``KvmVm.stop``
uses; the run loop just re-enters) and reads the registers while it is out,
so a sample is where the guest was when the kick landed.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


class Symbols:
    """Address -> "symbol+off" from `nm -n vmlinux` (text symbols only)."""

    def __init__(self, vmlinux: Path):
        out = subprocess.run(["nm", "-n", str(vmlinux)], capture_output=True, text=True, check=True).stdout
        self.addrs, self.names = [], []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in "tTwW":
                self.addrs.append(int(parts[0], 16))
                self.names.append(parts[2])

    def name(self, addr: int) -> str:
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0 or addr - self.addrs[i] > 0x10000:
            return "user" if addr < 1 << 47 else f"{addr:#x}"
        return self.names[i]


class Timeline:
    """Console bytes -> wall times of the lines that matter."""

    MARKS = ("Run /init", "LGJ-INIT", "LGJ-STEP", "LGJ-DONE", "Kernel panic", "segfault", "System halted")

    def __init__(self, t0: float, log):
        self.t0 = t0
        self.log = log
        self.buf = b""
        self.events: list[tuple[float, str]] = []

    def feed(self, data: bytes) -> None:
        self.log.write(data)
        self.log.flush()
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            text = line.decode(errors="replace").rstrip("\r")
            if any(m in text for m in self.MARKS):
                self.events.append((time.monotonic() - self.t0, text))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guest.profile_boot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--sample", type=float, default=2.0, help="seconds between RIP samples (0: none)")
    ap.add_argument("--workload", default="selftest")
    ap.add_argument("--mem-mib", type=int, default=128)
    ap.add_argument("--console-log", default=None, help="also write the console here")
    ap.add_argument("--extra", default="", help="extra kernel command-line words")
    args = ap.parse_args(argv)

    from guest.build import cached_guest, default_cmdline
    from lguest_jit import pci
    from lguest_jit.devices import Block, Rng
    from lguest_jit.hw import loader
    from lguest_jit.hw.kvm import KvmVm
    from lguest_jit.hw.memory import GuestMemory
    from lguest_jit.hw.uart import Uart8250

    got = cached_guest()
    if got is None:
        print("no cached guest: run python -m guest.build first", file=sys.stderr)
        return 2
    vmlinux, initrd = got
    syms = Symbols(vmlinux)
    cmdline = default_cmdline(args.workload, "ttyS0", args.extra)
    print(f"vmlinux {vmlinux}\ninitrd  {initrd}\ncmdline {cmdline}", flush=True)

    gm = GuestMemory(args.mem_mib << 20)
    info = loader.load_linux(gm, str(vmlinux), cmdline, str(initrd))
    bus = pci.Bus(gm)
    disk = tempfile.NamedTemporaryFile(prefix="lgj-disk-", suffix=".img", delete=False)
    disk.truncate(8 << 20)
    disk.close()
    bus.add_device(Block(disk.name))
    bus.add_device(Rng())
    console = open(args.console_log, "wb") if args.console_log else open(os.devnull, "wb")
    t0 = time.monotonic()
    timeline = Timeline(t0, console)
    # The THRE interrupt on COM1's IRQ 4: the tty layer writes user output
    # only when it arrives (printk polls, so the kernel's lines show anyway).
    box = {}
    Uart8250(output=timeline.feed, set_irq=lambda level: box["vm"].irq_line(4, int(level))).register(bus)
    vm = box["vm"] = KvmVm(gm, bus)
    vm.claim_reset_port()
    vm.setup_boot(info)

    samples: collections.Counter = collections.Counter()
    per_phase: list[tuple[float, str]] = []
    stop = threading.Event()

    def sampler():
        while not stop.wait(args.sample):
            vm._kick()
            try:
                rip = vm.get_regs().rip
            except OSError:
                continue
            name = syms.name(rip)
            samples[name] += 1
            per_phase.append((time.monotonic() - t0, name))

    th = None
    if args.sample > 0:
        th = threading.Thread(target=sampler, daemon=True)
        th.start()
    try:
        res = vm.run(timeout=args.timeout)
    finally:
        stop.set()
        if th is not None:
            th.join()
        wall = time.monotonic() - t0
        stats = vm.stats
        vm.close()
        bus.close()
        console.close()
        os.unlink(disk.name)

    print(f"\nresult: {res.report()}\nwall {wall:.1f} s  exits: total={stats.total} pio={stats.pio} "
          f"mmio={stats.mmio} intr={stats.intr} assists={stats.assists}")
    print("\ntimeline (wall s):")
    for t, text in timeline.events:
        print(f"  {t:7.1f}  {text[:150]}")
    if samples:
        n = sum(samples.values())
        print(f"\nRIP samples ({n}, every {args.sample} s):")
        for name, c in samples.most_common(25):
            print(f"  {c:5d} {100 * c / n:5.1f}%  {name}")
        print("\nsamples in order:")
        print("  " + " ".join(f"{t:.0f}:{name}" for t, name in per_phase))
    return 0 if res.exit_status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
