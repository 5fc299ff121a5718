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

Where the time went, per vCPU, over the work only (``per_vcpu``): the host
CPU seconds of each vCPU's thread (``host_user_s`` is guest user code,
native here; ``host_system_s`` is KVM, the emulated guest kernel
included), from the launcher's ``--stats-json`` rewritten by SIGUSR1 at
each marker; and the guest's own per-CPU ``/proc/stat`` (``guest_user_s``,
``guest_system_s`` with irq and softirq; ticks, so time the host took the
thread away is counted in whatever the CPU was doing).  A guest that
parallelises shows host user time on every vCPU.  ``clocksource``: what the
guest keeps time with (``tsc`` unless it could not learn the TSC's
frequency: then the PIT drives every tick, see hw/firmware.py).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import sys
import threading
import time

from .common import live

TIMEOUT = 1200
PROCS = 4
ITERATIONS = 10_000_000
_INIT = re.compile(rb"LGJ-INIT (\S+)\s")
_SHELL = b"exit the shell to power off"
_START, _END = b"LGJ-SPIN-START", b"LGJ-SPIN-END"


_CPU_LINE = re.compile(rb"LGJ-CPU(\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)")
_CLOCK = re.compile(rb"LGJ-CLOCK (\S+)")


def _command(iterations: int) -> bytes:
    # The markers are built by the shell (echo of the typed line must not
    # match); each CPU's /proc/stat line is printed before and after the work.
    work = f"awk 'BEGIN{{s=0;for(i=0;i<{iterations};i++)s+=i*i%7;print s}}' >/dev/null"
    stat = "sed -n 's/^cpu\\([0-9][0-9]*\\)/LGJ-CPU\\1/p' /proc/stat"
    line = (f"X=LGJ; echo $X-CLOCK $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource); "
            f"{stat}; echo $X-SPIN-START; for p in $(seq {PROCS}); do {work} & done; wait; echo $X-SPIN-END; "
            f"{stat}; echo $X-SPIN-DONE; grep -c ^processor /proc/cpuinfo; exit\n")
    return line.encode()


def _guest_cpu_times(text: bytes) -> dict[int, tuple[float, float]]:
    """CPU -> (user, system + irq + softirq) seconds from LGJ-CPU lines
    (/proc/stat fields in USER_HZ, 100 on Linux x86)."""
    out = {}
    for m in _CPU_LINE.finditer(text):
        f = [int(x) for x in m.groups()]
        out[f[0]] = ((f[1] + f[2]) / 100.0, (f[3] + f[6] + f[7]) / 100.0)
    return out


def _vcpu_times(path: str, mtime_before: float, wait: float = 30.0) -> dict[int, tuple[float, float]] | None:
    """vCPU -> (user, system) host CPU seconds from --stats-json once the
    launcher rewrote it (SIGUSR1) after ``mtime_before``; None if it did not."""
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            if os.stat(path).st_mtime_ns > mtime_before:
                with open(path) as f:
                    st = json.load(f)
                return {v["vcpu"]: (v["user_s"], v["system_s"]) for v in st.get("vcpus", [])}
        except (OSError, ValueError):
            pass                            # not there yet, or caught mid-write
        time.sleep(0.2)
    return None


def _snapshot_vcpus(proc, path: str) -> dict[int, tuple[float, float]] | None:
    try:
        before = os.stat(path).st_mtime_ns
    except OSError:
        before = 0
    proc.send_signal(signal.SIGUSR1)
    return _vcpu_times(path, before)


def _one(cpus: int, vmlinux, initrd, cmdline, iterations: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-smp-") as tmp:
        return _one_in(cpus, vmlinux, initrd, cmdline, iterations, os.path.join(tmp, "stats.json"))


def _one_in(cpus: int, vmlinux, initrd, cmdline, iterations: int, stats_path: str) -> dict:
    load = os.getloadavg()[0]
    argv = [sys.executable, "-m", "lguest_jit.main", f"--cpus={cpus}", f"--initrd={initrd}",
            f"--stats-json={stats_path}", "256", str(vmlinux), *cmdline]
    with live(f"bench smp: --cpus={cpus} (boot, then {PROCS} processes)", 3) as step:
        step("booting to /init")
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        timer = threading.Timer(TIMEOUT, proc.kill)
        timer.start()
        seen = b""
        t_init = t_start = t_end = None
        host_start = host_end = None
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
                    host_start = _snapshot_vcpus(proc, stats_path)
                if t_end is None and (_END + b"\r" in seen or _END + b"\n" in seen):
                    t_end = now
                    host_end = _snapshot_vcpus(proc, stats_path)
        finally:
            timer.cancel()
            try:
                proc.stdin.close()
            except OSError:
                pass
            status = proc.wait()
    out = {"seconds_to_init": t_init, "work_s": None if t_start is None or t_end is None else t_end - t_start,
           "exit_status": status, "host_load": load}
    m = re.search(rb"LGJ-SPIN-DONE\s+(\d+)", seen)
    if m:
        out["guest_processors"] = int(m.group(1))
    m = _CLOCK.search(seen)
    if m:
        out["clocksource"] = m.group(1).decode(errors="replace")
    at = seen.find(_START + b"\r") if _START + b"\r" in seen else seen.find(_START + b"\n")
    done = seen.find(b"LGJ-SPIN-DONE", at)
    g0 = _guest_cpu_times(seen[:at]) if at >= 0 else {}
    g1 = _guest_cpu_times(seen[at:done]) if at >= 0 and done >= 0 else {}
    per = []
    for cpu in range(cpus):
        row = {"vcpu": cpu}
        if host_start and host_end and cpu in host_start and cpu in host_end:
            row["host_user_s"] = round(host_end[cpu][0] - host_start[cpu][0], 2)
            row["host_system_s"] = round(host_end[cpu][1] - host_start[cpu][1], 2)
        if cpu in g0 and cpu in g1:
            row["guest_user_s"] = round(g1[cpu][0] - g0[cpu][0], 2)
            row["guest_system_s"] = round(g1[cpu][1] - g0[cpu][1], 2)
        per.append(row)
    out["per_vcpu"] = per
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
