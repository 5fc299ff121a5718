"""Restore versus boot: how soon a guest does useful work.

One run, side by side, of the default guest (``boot`` workload, console,
block and rng devices):

- cold boot: the launcher from exec until the guest prints ``LGJ-INIT``
  (its /init is running), taking a snapshot there (``--snapshot-on``);
- restore: ``lguest-jit restore`` of that snapshot, from exec until the
  restored guest's first console output, best and median of several;
- QEMU (TCG) booting the same kernel to the same line, where installed.

Also: what one snapshot costs on disk (RAM bytes written, the state file)
and the launcher's own start-up (exec to the first KVM_RUN, from
--stats-json) on both paths.

``warm_launcher``: with ``lguest-jit server`` running (Numba and the
kernels loaded once, a fork per run), plain boots' start-up (exec -> first
KVM_RUN) next to the same boots without it, alternating, and restores
through it to their first output.
"""
from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from .bench_boot import cached_default_guest, measure_qemu
from .common import live

TIMEOUT = 1200
STARTUPS = 5                 # plain-boot start-ups timed per launcher kind
STARTUP_WAIT_S = 3.0         # well past any start-up: then SIGINT
_INIT = re.compile(rb"LGJ-INIT (\S+)\s")


def _timed_run(argv, stop_at: bytes | None = None, timeout: float = TIMEOUT, env=None) -> dict:
    """Run ``argv`` and time its console: ``first`` (seconds to the first
    stdout byte), ``init`` (to LGJ-INIT), ``end`` (to ``stop_at``, then the
    process is killed, or to its exit), ``status``, ``out``, ``err``."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    timer = threading.Timer(timeout, proc.kill)          # a hung guest ends the benchmark, not the run
    timer.start()
    r = {"first": None, "init": None, "end": None, "status": None, "out": b"", "err": b""}
    err = []
    drain = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    drain.start()
    try:
        while True:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            now = time.monotonic() - t0
            if r["first"] is None:
                r["first"] = now
            r["out"] += chunk
            if r["init"] is None and _INIT.search(r["out"]):
                r["init"] = now
            if stop_at is not None and stop_at in r["out"]:
                r["end"] = now
                proc.kill()
                break
    finally:
        timer.cancel()
        status = proc.wait()
    if r["end"] is None:
        r["end"], r["status"] = time.monotonic() - t0, status
    drain.join(10)
    r["err"] = b"".join(err)
    return r


def _stats_startup(path: str):
    try:
        with open(path) as f:
            return json.load(f).get("seconds_to_first_run")
    except (OSError, ValueError):
        return None


def measure(quick: bool = False) -> dict:
    from lguest_jit.hw.kvm import kvm_available
    why = kvm_available()
    if why:
        return {"skipped": f"no usable KVM: {why}"}
    if quick:
        # A cold boot is minutes here; bench boot --quick already times it.
        return {"skipped": "--quick: a restore needs a snapshot from a cold boot of minutes; run without --quick"}
    found, why = cached_default_guest()
    if found is None:
        return {"skipped": why}
    (vmlinux, initrd), _, default_cmdline = found
    cmdline = default_cmdline("boot", "hvc0").split()
    launcher = [sys.executable, "-m", "lguest_jit.main"]
    restores = 3
    out: dict = {}
    with tempfile.TemporaryDirectory() as d, live("bench restore: cold boot, then restores",
                                                  1 + restores + 2 * STARTUPS + 3) as step:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(16 << 20)
        snap = os.path.join(d, "snap")
        stats = os.path.join(d, "boot-stats.json")
        step("cold boot to /init, snapshot there")
        argv = [*launcher, "--rng", f"--block={disk}", f"--initrd={initrd}", f"--snapshot={snap}",
                "--snapshot-on=LGJ-INIT", "--snapshot-exit", f"--stats-json={stats}", "256", str(vmlinux), *cmdline]
        cold = _timed_run(argv)
        m = _INIT.search(cold["out"])
        if cold["status"] != 0 or m is None:
            return {"skipped": f"the cold boot did not reach a snapshot (status {cold['status']}): "
                               + (cold["out"][-300:] + cold["err"][-300:]).decode(errors="replace")}
        out["cold_boot"] = {"seconds_to_init": cold["init"], "seconds_to_snapshot_written": cold["end"],
                            "guest_uptime_at_init": float(m.group(1)),
                            "launcher_start_to_first_kvm_run_s": _stats_startup(stats)}
        ram = os.stat(os.path.join(snap, "ram"))
        out["snapshot"] = {"ram_bytes_written": ram.st_blocks * 512, "ram_bytes": ram.st_size,
                           "state_bytes": os.stat(os.path.join(snap, "state.json")).st_size}
        firsts = []
        for i in range(restores):
            step(f"restore {i + 1}/{restores}")
            # --force: the disk is the cold boot's, untouched, but a restore
            # that runs on writes it; every run must start from the snapshot.
            rstats = os.path.join(d, f"restore-stats-{i}.json")
            r = _timed_run([*launcher, "restore", "--force", f"--stats-json={rstats}", snap])
            if r["first"] is None or r["status"] != 0:
                return {"skipped": f"the restored guest failed (status {r['status']}): "
                                   + (r["out"][-300:] + r["err"][-300:]).decode(errors="replace")}
            firsts.append((r["first"], r["end"], _stats_startup(rstats)))
        best = min(firsts)
        out["restore"] = {"seconds_to_first_output_best": best[0],
                          "seconds_to_first_output_median": statistics.median(f[0] for f in firsts),
                          "runs": len(firsts), "seconds_to_exit": best[1],
                          "launcher_start_to_first_kvm_run_s": best[2]}
        out["restore_speedup_vs_cold_boot"] = cold["init"] / best[0]
        out["warm_launcher"] = _warm_launcher(d, launcher, snap, [
            "--rng", f"--block={disk}", f"--initrd={initrd}", "256", str(vmlinux), *cmdline], step)
    return out


def _startup(launcher, args, env, stats: str) -> float | None:
    """Exec -> first KVM_RUN of a plain boot (--stats-json's
    seconds_to_first_run): started, interrupted with SIGINT once well past
    its start (the launcher writes its stats on the way out)."""
    proc = subprocess.Popen([*launcher, f"--stats-json={stats}", *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(STARTUP_WAIT_S)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return _stats_startup(stats)


def _warm_launcher(d, launcher, snap, boot_args, step) -> dict:
    """The same start-ups through ``lguest-jit server`` (a process with
    Numba and the kernels loaded, forked per run) next to plain ones, and
    restores through it: what a session of repeated runs sees."""
    sock = os.path.join(d, "warm.sock")
    cold_env = {**os.environ, "LGUEST_JIT_SERVER": "off"}
    warm_env = {**os.environ, "LGUEST_JIT_SERVER": sock}
    server = subprocess.Popen([*launcher, "server", f"--socket={sock}"], env=warm_env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ready = server.stderr.readline()
        if "ready on" not in ready:
            return {"skipped": f"the server did not start: {ready.strip()}"}
        starts = {"plain": [], "warm": []}
        for i in range(STARTUPS):
            for how, env in (("plain", cold_env), ("warm", warm_env)):
                step(f"plain boot start-up, {how} launcher {i + 1}/{STARTUPS}")
                starts[how].append(_startup(launcher, boot_args, env, os.path.join(d, f"start-{how}-{i}.json")))
        firsts = []
        for i in range(3):
            step(f"restore through the warm launcher {i + 1}/3")
            r = _timed_run([*launcher, "restore", "--force", snap], env=warm_env)
            if r["first"] is None or r["status"] != 0:
                return {"skipped": f"a restore through the server failed (status {r['status']})"}
            firsts.append(r["first"])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    out = {}
    for how, xs in starts.items():
        xs = [x for x in xs if x is not None]
        out[f"{how}_start_to_first_kvm_run_s"] = {"best": min(xs) if xs else None,
                                                  "median": statistics.median(xs) if xs else None, "runs": len(xs)}
    out["restore_seconds_to_first_output"] = {"best": min(firsts), "median": statistics.median(firsts),
                                              "runs": len(firsts)}
    return out


def run(quick: bool = False) -> dict:
    ours = measure(quick)
    if "skipped" in ours:
        return {"benchmark": "restore", "skipped": ours["skipped"]}
    qemu = measure_qemu(quick=True)
    return {"benchmark": "restore", "unit": "wall seconds (lower is better)", "lguest_jit": ours,
            "qemu": {"seconds_to_init": qemu.get("seconds_to_init"), **{k: v for k, v in qemu.items()
                                                                         if k != "seconds_to_init"}},
            "python": {"not_measured": "a restore is set-up and guest time, not kernel work"}}
