"""``lguest-jit bench smp``: what a second vCPU buys a CPU-bound guest.

The default guest boots its ``shell`` workload with ``--cpus=1`` and then
``--cpus=2``, in one run; once its shell is up the benchmark types one
command line into the console: PROCS busy awk processes at once (guest
user mode, which runs natively on our software-KVM hosts), each the same
fixed number of loop iterations, between two markers.  Reported per vCPU
count: wall seconds from the first marker to the second on the host's
clock (``work_s``), the boot time to /init (``seconds_to_init``), and
``throughput_ratio``: work_s with 1 vCPU over work_s with 2 (the same
work, so the speed-up; 2.0 is perfect on a 2-core host).  The host's
other load is in ``host_load`` (1-minute load average before each run):
two vCPU threads only go twice as fast when two host cores are free.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

from .common import live

TIMEOUT = 1200
PROCS = 4
ITERATIONS = 4_000_000
_INIT = re.compile(rb"LGJ-INIT (\S+)\s")
_SHELL = b"exit the shell to power off"
_START, _END = b"LGJ-SPIN-START", b"LGJ-SPIN-END"


def _command(iterations: int) -> bytes:
    # The markers are built by the shell (echo of the typed line must not match).
    work = f"awk 'BEGIN{{s=0;for(i=0;i<{iterations};i++)s+=i*i%7;print s}}' >/dev/null"
    line = (f"X=LGJ-SPIN; echo $X-START; for p in $(seq {PROCS}); do {work} & done; wait; echo $X-END; "
            "grep -c ^processor /proc/cpuinfo; exit\n")
    return line.encode()


def _one(cpus: int, vmlinux, initrd, cmdline, iterations: int) -> dict:
    load = os.getloadavg()[0]
    argv = [sys.executable, "-m", "lguest_jit.main", f"--cpus={cpus}", f"--initrd={initrd}", "256", str(vmlinux),
            *cmdline]
    with live(f"bench smp: --cpus={cpus} (boot, then {PROCS} processes)", 3) as step:
        step("booting to /init")
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        timer = threading.Timer(TIMEOUT, proc.kill)
        timer.start()
        seen = b""
        t_init = t_start = t_end = None
        sent = False
        try:
            while True:
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                seen += chunk
                now = time.monotonic()
                if t_init is None and _INIT.search(seen):
                    t_init = now - t0
                    step("/init reached, waiting for the shell")
                if not sent and _SHELL in seen:
                    time.sleep(1.0)                 # the shell reads the console once it is up
                    proc.stdin.write(_command(iterations))
                    proc.stdin.flush()
                    sent = True
                    step("running the processes")
                if t_start is None and (_START + b"\r" in seen or _START + b"\n" in seen):
                    t_start = now
                if t_end is None and (_END + b"\r" in seen or _END + b"\n" in seen):
                    t_end = now
        finally:
            timer.cancel()
            try:
                proc.stdin.close()
            except OSError:
                pass
            status = proc.wait()
    out = {"seconds_to_init": t_init, "work_s": None if t_start is None or t_end is None else t_end - t_start,
           "exit_status": status, "host_load": load}
    m = re.search(rb"LGJ-SPIN-END\s+(\d+)", seen)
    if m:
        out["guest_processors"] = int(m.group(1))
    if out["work_s"] is None:
        out["error"] = "no timing; last output: " + seen[-400:].decode(errors="replace")
    return out


def measure(quick: bool = False) -> dict:
    """Both runs and their ratio, or {"skipped": why}."""
    from lguest_jit.hw.kvm import kvm_available
    why = kvm_available()
    if why:
        return {"skipped": f"no usable KVM: {why}"}
    if quick:
        # Two boots of minutes each: bench boot --quick already times one.
        return {"skipped": "--quick: two boots of the default guest; run without --quick"}
    from .bench_boot import cached_default_guest
    found, why = cached_default_guest()
    if found is None:
        return {"skipped": why}
    (vmlinux, initrd), _, default_cmdline = found
    cmdline = default_cmdline("shell", "hvc0").split()
    one = _one(1, vmlinux, initrd, cmdline, ITERATIONS)
    two = _one(2, vmlinux, initrd, cmdline, ITERATIONS)
    ratio = one["work_s"] / two["work_s"] if one.get("work_s") and two.get("work_s") else None
    return {"cpus_1": one, "cpus_2": two,
            "throughput": {"ratio_2_vs_1": ratio, "target": 1.8, "host_cores": os.cpu_count()}}


def run(quick: bool = False) -> dict:
    out = measure(quick)
    if "skipped" in out:
        return {"benchmark": "smp", "skipped": out["skipped"]}
    return {"benchmark": "smp", "unit": "wall seconds (lower is better)",
            "workload": f"{PROCS} awk processes x {ITERATIONS} iterations, guest user mode", **out,
            "note": "the host runs other agents' work: the ratio is bounded by the host cores actually free "
                    "(host_load)"}
