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
from dataclasses import dataclass
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

    def is_text(self, addr: int) -> bool:
        return bool(self.addrs) and self.addrs[0] <= addr <= self.addrs[-1]

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
        if self.log is not None:
            self.log.write(data)
            self.log.flush()
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            text = line.decode(errors="replace").rstrip("\r")
            if any(m in text for m in self.MARKS):
                self.events.append((time.monotonic() - self.t0, text))


@dataclass
class BootRun:
    """What ``boot`` saw: the run result, every console byte, the timeline
    (wall seconds, line), the vCPU exit counters, RIP samples (symbol ->
    count, and (wall s, symbol) in order) and stack-scan callers."""
    result: object
    console: bytes
    events: list
    stats: object
    wall: float
    samples: collections.Counter
    ordered: list
    callers: dict


def boot(*, workload: str = "selftest", timeout: float = 900.0, mem_mib: int = 128, extra: str = "",
         disk: str | None = None, sample: float = 0.0, callers: bool = False,
         console_log=None, vmlinux=None, initrd=None) -> BootRun:
    """Boot the cached default guest (``guest.build.cached_guest``, or the
    given files) with console=ttyS0, virtio-blk on ``disk`` (default: a
    scratch 8 MiB file) and virtio-rng; return when the run ends."""
    from guest.build import cached_guest, default_cmdline
    from lguest_jit import pci
    from lguest_jit.devices import Block, Rng
    from lguest_jit.hw import loader
    from lguest_jit.hw.kvm import KvmVm, translate
    from lguest_jit.hw.memory import GuestMemory
    from lguest_jit.hw.uart import Uart8250

    if vmlinux is None or initrd is None:
        got = cached_guest()
        if got is None:
            raise RuntimeError("no cached guest: run python -m guest.build first")
        vmlinux, initrd = got
    syms = Symbols(Path(vmlinux)) if sample > 0 else None
    cmdline = default_cmdline(workload, "ttyS0", extra)

    gm = GuestMemory(mem_mib << 20)
    scratch = None
    bus = vm = None
    try:
        info = loader.load_linux(gm, str(vmlinux), cmdline, str(initrd))
        if disk is None:
            fd, scratch = tempfile.mkstemp(prefix="lgj-disk-", suffix=".img")
            os.ftruncate(fd, 8 << 20)
            os.close(fd)
            disk = scratch
        bus = pci.Bus(gm)
        bus.add_device(Block(disk))
        bus.add_device(Rng())
        console = bytearray()
        t0 = time.monotonic()
        timeline = Timeline(t0, console_log)

        def out(data: bytes):
            console.extend(data)
            timeline.feed(data)

        # The THRE interrupt on COM1's IRQ 4: the tty layer sends user
        # output only when it arrives (printk polls, so kernel lines show
        # without it).
        box = {}
        Uart8250(output=out, set_irq=lambda level: box["vm"].irq_line(4, int(level))).register(bus)
        vm = box["vm"] = KvmVm(gm, bus)
        vm.claim_reset_port()
        vm.setup_boot(info)

        def stack_text(regs, sregs, depth=96):
            """Kernel-text addresses among the first ``depth`` stack slots."""
            found = []
            for i in range(depth):
                gpa = translate(vm._read_u64, vm._read_u32, sregs, regs.rsp + 8 * i)
                if gpa is None or not gm.check(gpa, 8):
                    break
                v = int.from_bytes(gm.read(gpa, 8), "little")
                if syms.is_text(v):
                    found.append(syms.name(v))
            return found

        samples: collections.Counter = collections.Counter()
        ordered: list = []
        seen_callers: dict = collections.defaultdict(collections.Counter)
        stop = threading.Event()

        def sampler():
            while not stop.wait(sample):
                vm._kick()
                try:
                    regs = vm.get_regs()
                    sregs = vm.get_sregs() if callers else None
                except OSError:
                    continue
                name = syms.name(regs.rip)
                samples[name] += 1
                ordered.append((time.monotonic() - t0, name))
                if callers and regs.rip >= 1 << 63:
                    for c in dict.fromkeys(stack_text(regs, sregs)):
                        seen_callers[name][c] += 1

        th = None
        if sample > 0:
            th = threading.Thread(target=sampler, name="rip-sampler", daemon=True)
            th.start()
        try:
            res = vm.run(timeout=timeout)
        finally:
            stop.set()
            if th is not None:
                th.join()
        return BootRun(res, bytes(console), timeline.events, vm.stats, time.monotonic() - t0,
                       samples, ordered, dict(seen_callers))
    finally:
        if vm is not None:
            vm.close()
        if bus is not None:
            bus.close()
        gm.close()
        if scratch is not None:
            os.unlink(scratch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guest.profile_boot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--sample", type=float, default=2.0, help="seconds between RIP samples (0: none)")
    ap.add_argument("--workload", default="selftest")
    ap.add_argument("--mem-mib", type=int, default=128)
    ap.add_argument("--console-log", default=None, help="also write the console here")
    ap.add_argument("--extra", default="", help="extra kernel command-line words")
    ap.add_argument("--callers", type=int, default=0, metavar="N",
                    help="also list, for the N hottest symbols, the kernel-text addresses found "
                         "on the stack at each sample (a stack scan: likely callers, not a true backtrace)")
    args = ap.parse_args(argv)
    log = open(args.console_log, "wb") if args.console_log else None
    try:
        run = boot(workload=args.workload, timeout=args.timeout, mem_mib=args.mem_mib, extra=args.extra,
                   sample=args.sample, callers=args.callers > 0, console_log=log)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 2
    finally:
        if log is not None:
            log.close()
    st = run.stats
    print(f"result: {run.result.report()}\nwall {run.wall:.1f} s  exits: total={st.total} pio={st.pio} "
          f"mmio={st.mmio} intr={st.intr} assists={st.assists}")
    print("\ntimeline (wall s):")
    for t, text in run.events:
        print(f"  {t:7.1f}  {text[:150]}")
    if run.samples:
        n = sum(run.samples.values())
        print(f"\nRIP samples ({n}, every {args.sample} s):")
        for name, c in run.samples.most_common(25):
            print(f"  {c:5d} {100 * c / n:5.1f}%  {name}")
        for name, c in run.samples.most_common(args.callers):
            top = ", ".join(f"{k} {v}" for k, v in run.callers.get(name, {}).most_common(12))
            print(f"\n{name} ({c} samples), on its stack: {top}")
        print("\nsamples in order:")
        print("  " + " ".join(f"{t:.1f}:{name}" for t, name in run.ordered))
    return 0 if run.result.exit_status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
