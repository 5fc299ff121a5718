"""Boot the default guest under our KVM and show where the time goes.

    python -m guest.profile_boot [--timeout S] [--hz N] [--folded FILE] [--workload W] [--console-log FILE]

Console on ttyS0 (the 8250), a scratch virtio-blk disk and virtio-rng.
Prints a timeline (wall seconds at "Run /init", LGJ-INIT, every LGJ-STEP,
LGJ-DONE), the exit counters and assists, and the launcher's profile of
the guest (``lguest_jit.hw.profile``, what ``lguest-jit --profile`` prints:
RIP samples at --hz, top functions from vmlinux's symbol table).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass


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
    (wall seconds, line), the vCPU exit counters, and the profile report's
    lines (empty without sampling)."""
    result: object
    console: bytes
    events: list
    stats: object
    wall: float
    profile: list


def boot(*, workload: str = "selftest", timeout: float = 900.0, mem_mib: int = 128, extra: str = "",
         disk: str | None = None, hz: int = 0, folded: str | None = None,
         console_log=None, vmlinux=None, initrd=None) -> BootRun:
    """Boot the cached default guest (``guest.build.cached_guest``, or the
    given files) with console=ttyS0, virtio-blk on ``disk`` (default: a
    scratch 8 MiB file) and virtio-rng, profiled at ``hz`` samples/s (0:
    not; ``folded``: where the folded stacks go); return when the run ends."""
    from guest.build import cached_guest, default_cmdline
    from lguest_jit import pci
    from lguest_jit.devices import Block, Rng
    from lguest_jit.hw import loader
    from lguest_jit.hw.memory import GuestMemory
    from lguest_jit.hw.profile import Profiler, report
    from lguest_jit.hw.uart import Uart8250
    from lguest_jit.vcpu import KvmVm

    if vmlinux is None or initrd is None:
        got = cached_guest()
        if got is None:
            raise RuntimeError("no cached guest: run python -m guest.build first")
        vmlinux, initrd = got
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

        prof = Profiler(hz).attach(vm) if hz else None
        if prof is not None:
            prof.start()
        try:
            res = vm.run(timeout=timeout)
        finally:
            if prof is not None:
                prof.stop()
        wall = time.monotonic() - t0
        lines = report(prof, str(vmlinux), folded) if prof is not None else []
        return BootRun(res, bytes(console), timeline.events, vm.stats, wall, lines)
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
    ap.add_argument("--hz", type=int, default=1000, help="RIP samples per second (0: none)")
    ap.add_argument("--folded", default=None, help="write the profile's folded stacks here (flame graphs)")
    ap.add_argument("--workload", default="selftest")
    ap.add_argument("--mem-mib", type=int, default=128)
    ap.add_argument("--console-log", default=None, help="also write the console here")
    ap.add_argument("--extra", default="", help="extra kernel command-line words")
    args = ap.parse_args(argv)
    from lguest_jit.hw.hosts import max_sample_hz
    if not 0 <= args.hz <= max_sample_hz():
        ap.error(f"--hz must be between 0 and {max_sample_hz()}")
    log = open(args.console_log, "wb") if args.console_log else None
    try:
        run = boot(workload=args.workload, timeout=args.timeout, mem_mib=args.mem_mib, extra=args.extra,
                   hz=args.hz, folded=args.folded, console_log=log)
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
    if run.profile:
        print()
        print("\n".join(run.profile))
    return 0 if run.result.exit_status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
