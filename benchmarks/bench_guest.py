"""What a workload in the default guest gets: ``lguest-jit bench guest``.

The default guest boots with ``lguest_jit.workload=bench`` (guest/bench.sh)
and runs a fixed workload from its initramfs, timed by the guest's own
clock and printed on its console, one ``LGJ-STEP`` line per step:

- block (the scratch disk, vda): sequential direct write and read, 1 MiB
  requests; a buffered read through the page cache; 4 KiB random direct
  reads (a fixed count, fixed seed: guest/randread.c); one buffered MiB
  written and flushed (fsync: a FLUSH request);
- network, where a private network namespace can be made (``unshare
  --net``): ping round trips, then TCP from the host and to the host
  (busybox nc against a peer this benchmark runs inside that namespace:
  traffic only on the tap);
- rng: bytes from /dev/hwrng;
- process start-up: shell pipelines of three processes each.

Around each group the guest prints ``LGJ-BENCH-BEGIN``/``-END``; there the
benchmark sends the launcher SIGUSR1, which rewrites its ``--stats-json``
and ``--profile`` files with the counts so far, so each group gets its own
launcher figures (requests, latency, exits, thread CPU) and the guest's
top functions (the difference of the two snapshots).

In the same run, the same bzImage and initramfs under QEMU (TCG; KVM where
the host's KVM can run this guest), with the same devices, when
``qemu-system-x86_64`` is installed; otherwise ``not_comparable`` says why.
Figures are the guest's (so both sides are measured the same way); a
step that failed is listed under ``failed`` with its reason, never as a
number.  ``--quick`` shrinks every size (under a minute with the boot on a
software-KVM host: 54 s measured from the launcher's start to the
workload's end, QEMU 1.3 s).  ``bench sweep --param=cpus=1,2 guest`` boots
the guest with that many vCPUs (``--cpus``; QEMU, when measured with the
same setting, gets ``-smp``).
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from .common import device_knobs, live

UNIT = "operations per second and MB/s, timed by the guest (higher is better); seconds (lower is better)"
BENCH = "bench guest"

# Workload sizes (guest/bench.sh reads them from the command line).
FULL = {"mib": 64, "buf_mib": 16, "rand": 2000, "net_kib": 16384, "pings": 10, "rng_kib": 64, "procs": 20,
        "flush_kib": 1024}
QUICK = {"mib": 1, "buf_mib": 1, "rand": 25, "net_kib": 32, "pings": 2, "rng_kib": 2, "procs": 1, "flush_kib": 128}
GROUPS = ("blk", "net", "rng", "proc")
MEM_MB = 256
GUEST_IP, PEER_IP = "10.0.2.15/24", "10.0.2.2"
RX_PORT, TX_PORT = 5001, 5002          # guest/bench.sh: NET_RX_PORT, NET_TX_PORT
QEMU_TAP = "lgjq0"
TIMEOUT = {False: 7200, True: 3600}     # only ends a hung guest: a loaded software-KVM host is that slow
TOP = 15
NETNS_ENV = "LGUEST_JIT_BENCH_GUEST_NETNS"

_MARK = re.compile(r"LGJ-BENCH-(BEGIN|END) (\S+) (\S+)")


# ---------------------------------------------------------------------------
# The guest's console -> figures

def _num(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def parse(text: str | bytes) -> dict:
    """Figures from a bench workload's console transcript.

    ``metrics``: per step its seconds and rate (MB/s, reads/s, ...);
    ``failed``/``skipped``: step -> the guest's reason (a failed step has
    no number); ``groups``: group -> (begin, end) guest uptime;
    ``done``: the workload's last line was seen."""
    from guest.markers import parse_console
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    rep = parse_console(text)
    metrics, failed, skipped, groups = {}, {}, {}, {}
    for line in text.splitlines():
        m = _MARK.search(line)
        if m and (t := _num(m.group(3))) is not None:
            begin, end = groups.get(m.group(2), (None, None))
            groups[m.group(2)] = (t, end) if m.group(1) == "BEGIN" else (begin, t)
    if rep.init_uptime is not None:
        metrics["seconds_to_init"] = rep.init_uptime
    for s in rep.steps:
        if not s.name.startswith("bench-") or s.name == "bench-config":
            continue
        name = s.name[len("bench-"):].replace("-", "_")
        if s.status == "FAIL":
            failed[name] = s.detail or "failed"
            continue
        if s.status == "SKIP":
            skipped[name] = s.detail
            continue
        f = s.fields()
        if name == "net_ping":
            parts = f.get("min_avg_max_ms", "").split("/")
            avg = _num(parts[1]) if len(parts) == 3 else None
            if avg is None:
                failed[name] = f"no round-trip figures in {s.detail!r}"
            else:
                metrics["ms_net_ping_avg"] = avg
            continue
        start, end = _num(f.get("start")), _num(f.get("end"))
        if start is None or end is None or end < start:
            failed[name] = f"no start/end times in {s.detail!r}"
            continue
        # /proc/uptime counts in 10 ms steps: a shorter step reads as one step.
        secs = round(max(end - start, 0.01), 2)
        metrics[f"seconds_{name}"] = secs
        if "bytes" in f and name not in ("blk_flush", "blk_read_random"):
            metrics[f"{name}_MB_per_s"] = int(f["bytes"]) / secs / 1e6
        if "reads" in f:
            metrics[f"{name}_reads_per_s"] = int(f["reads"]) / secs
        if "pipelines" in f:
            metrics[f"{name}_per_s"] = int(f["pipelines"]) / secs
    spans = [(b, e) for b, e in groups.values() if b is not None and e is not None]
    if spans and len(spans) == len(groups):
        metrics["seconds_workload"] = round(sum(e - b for b, e in spans), 2)
    return {"metrics": metrics, "failed": failed, "skipped": skipped, "groups": groups,
            "done": rep.done, "kernel": rep.kernel}


# ---------------------------------------------------------------------------
# The launcher's figures per group: the difference of two SIGUSR1 snapshots

def _sub(a, b):
    """a - b for numbers, element-wise for lists, key-wise for dicts."""
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, (int, float)):
        return a - (b if isinstance(b, (int, float)) else 0)
    if isinstance(a, list):
        b = b if isinstance(b, list) else []
        return [_sub(x, b[i] if i < len(b) else 0) for i, x in enumerate(a)]
    if isinstance(a, dict):
        b = b if isinstance(b, dict) else {}
        return {k: _sub(v, b.get(k)) for k, v in a.items()}
    return a


def _percentiles(hist: list) -> dict:
    """count, p50, p99 (ns, upper bucket edges) of a log2 histogram."""
    total = sum(hist)
    out = {"count": total}
    for name, p in (("p50_ns", 0.50), ("p99_ns", 0.99)):
        rank, seen, out[name] = max(1, -(-int(p * 1000) * total // 1000)), 0, None
        for k, c in enumerate(hist if total else ()):
            seen += c
            if seen >= rank:
                out[name] = (1 << k) - 1
                break
    return out


def group_stats(begin: dict, end: dict) -> dict:
    """What the launcher did between two ``--stats-json`` snapshots."""
    d = _sub(end, begin)
    out = {"seconds": d.get("elapsed_s")}
    out["thread_cpu_s"] = {name: round(t["user_s"] + t["system_s"], 3)
                           for name, t in sorted(d.get("threads", {}).items())
                           if t["user_s"] + t["system_s"] >= 0.0005}
    queues = {}
    for dev, qs in d.get("queues", {}).items():
        for q, c in qs.items():
            if not c.get("requests"):
                continue
            row = {k: c[k] for k in ("requests", "bytes", "notifications", "interrupts", "errors") if k in c}
            lat = c.get("latency", {})
            if isinstance(lat.get("log2_ns"), list):
                row["latency"] = _percentiles(lat["log2_ns"])
            queues[f"{dev}/{q}"] = row
    out["queues"] = queues
    # The vCPU loop adds its exit counts when it returns (the run's end):
    # mid-run snapshots may have none.
    if _nonzero(d.get("exits", {})):
        out["exits"] = _nonzero(d["exits"])
    return out


def _nonzero(d: dict) -> dict:
    """d without its zero counts (and without dicts left empty)."""
    out = {}
    for k, v in d.items():
        v = _nonzero(v) if isinstance(v, dict) else v
        if v:
            out[k] = v
    return out


def folded_counts(text: str) -> collections.Counter:
    """leaf function -> samples of a folded-stacks file."""
    out = collections.Counter()
    for line in text.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if stack and n.isdigit():
            out[stack.rsplit(";", 1)[-1]] += int(n)
    return out


def group_profile(begin: str, end: str) -> dict:
    """The guest's top functions between two folded-stacks snapshots."""
    diff = folded_counts(end)
    diff.subtract(folded_counts(begin))
    diff = +diff
    total = sum(diff.values())
    top = [[name, n, round(100.0 * n / total, 1)] for name, n in diff.most_common(TOP)] if total else []
    return {"samples": total, "user_pct": round(100.0 * diff.get("[user]", 0) / total, 1) if total else None,
            "top": top}


# ---------------------------------------------------------------------------
# The host's side of the network steps (inside the private namespace)

class Peer:
    """TCP servers on PEER_IP's ports: one sends ``nbytes`` and closes
    (host -> guest), one reads to EOF (guest -> host).  Bound to any
    address: the tap that will carry PEER_IP does not exist yet."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.seen = {"rx_sent": 0, "tx_received": 0}
        self._socks = []
        for port, serve in ((RX_PORT, self._send), (TX_PORT, self._receive)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(4)
            self._socks.append(s)
            threading.Thread(target=self._accept, args=(s, serve), daemon=True, name=f"peer-{port}").start()

    def _accept(self, s, serve):
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            with conn:
                try:
                    serve(conn)
                except OSError:
                    pass

    def _send(self, conn):
        chunk = bytes(65536)
        left = self.nbytes
        while left > 0:
            n = conn.send(chunk[:min(left, len(chunk))])
            left -= n
            self.seen["rx_sent"] += n
        conn.shutdown(socket.SHUT_WR)

    def _receive(self, conn):
        while data := conn.recv(1 << 16):
            self.seen["tx_received"] += len(data)

    def close(self):
        for s in self._socks:
            s.close()


def _ip(*args) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


# ---------------------------------------------------------------------------
# One boot of one VMM

def _knob_options() -> list:
    """The launcher options for the knobs `bench sweep` set (none by default)."""
    from lguest_jit.devices.knobs import KNOBS, Knobs
    knobs, default = device_knobs(), Knobs()
    opts = []
    for name, (field, *_) in KNOBS.items():
        v = getattr(knobs, field)
        if v != getattr(default, field):
            opts.append(f"--{name}=" + ("on" if v is True else "off" if v is False else f"{v:g}" if isinstance(v, float)
                                        else str(v)))
    return opts


def _cpus() -> int:
    """The vCPUs both sides boot with: 1, or what `bench sweep --param=cpus=...` measures."""
    from lguest_jit.devices.knobs import BENCH_CPUS_ENV
    return int(os.environ.get(BENCH_CPUS_ENV) or 1)


def _wait_replaced(paths: list, before: dict, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_stamp(p) != before[p] for p in paths):
            return
        time.sleep(0.01)


def _stamp(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def boot(kind: str, argv: list, quick: bool, work: str, title: str) -> dict:
    """Run one VMM to the end of the workload; its console, wall time and
    (lguest-jit) the launcher's snapshots at each group boundary."""
    stats_path, prof_path = os.path.join(work, "stats.json"), os.path.join(work, "profile.folded")
    snaps = {}
    errlog = open(os.path.join(work, f"{kind}.stderr"), "w+")
    env = dict(os.environ, LGUEST_JIT_SERVER="off")     # signals go to the launcher itself
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errlog, env=env)
    timer = threading.Timer(TIMEOUT[quick], proc.kill)
    timer.start()
    seen, buf, t_done = [], b"", None
    try:
        with live(title, len(GROUPS) + 1) as step:
            step("booting")
            while True:
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace")
                    seen.append(line)
                    m = _MARK.search(line)
                    if m and kind == "lguest_jit":
                        paths = [stats_path, prof_path]
                        before = {p: _stamp(p) for p in paths}
                        proc.send_signal(signal.SIGUSR1)
                        _wait_replaced(paths, before)
                        snaps[(m.group(2), m.group(1))] = (_read(stats_path), _read(prof_path))
                    if m and m.group(1) == "BEGIN":
                        step(m.group(2))
                    if "LGJ-DONE" in line and t_done is None:
                        t_done = time.monotonic() - t0
                        if kind != "lguest_jit":
                            proc.kill()      # QEMU keeps running after the guest halts
    finally:
        timer.cancel()
        status = proc.wait()
    seen.append(buf.decode("utf-8", "replace"))
    errlog.seek(0)
    err = errlog.read()
    errlog.close()
    return {"console": "\n".join(seen), "wall_s": time.monotonic() - t0, "done_s": t_done, "status": status,
            "stderr_tail": err[-600:], "snaps": snaps}


def _side_report(run: dict, with_launcher: bool) -> dict:
    got = parse(run["console"])
    out = dict(got["metrics"])
    if run["done_s"] is not None:
        out["seconds_host_wall"] = run["done_s"]
    if got["failed"]:
        out["failed"] = got["failed"]
    if got["skipped"]:
        out["skipped"] = got["skipped"]
    if not got["done"]:
        tail = run["console"][-300:].strip() or run["stderr_tail"].strip()
        tail = " / ".join(ln.strip() for ln in tail.splitlines() if ln.strip())      # one line for the table
        out["error"] = f"the workload did not finish (exit status {run['status']}); last output: {tail[-300:]}"
    workloads = []
    if with_launcher:
        for g in got["groups"]:
            b, e = run["snaps"].get((g, "BEGIN")), run["snaps"].get((g, "END"))
            w = {"group": g}
            if b and e and b[0] and e[0]:
                try:
                    w["launcher"] = group_stats(json.loads(b[0]), json.loads(e[0]))
                except ValueError as exc:
                    w["launcher"] = {"error": f"unreadable --stats-json snapshot: {exc}"}
            if b and e and b[1] is not None and e[1] is not None:
                w["profile"] = group_profile(b[1], e[1])
            workloads.append(w)
    return {"metrics": out, "workloads": workloads}


def _cmdline(sizes: dict, groups: tuple, console: str) -> str:
    from guest.build import default_cmdline
    extra = " ".join(f"lguest_jit.bench_{k}={v}" for k, v in sizes.items())
    extra += f" lguest_jit.bench_groups={','.join(groups)} lguest_jit.ip={GUEST_IP} lguest_jit.peer={PEER_IP}"
    return default_cmdline("bench", console, extra=extra)


def _disk(work: str, sizes: dict, name: str) -> str:
    path = os.path.join(work, name)
    with open(path, "wb") as f:
        f.truncate((sizes["mib"] + sizes["buf_mib"] + 8) << 20)
    return path


def run_side(kind: str, quick: bool, net: bool, vmlinux: str, initrd: str, bzimage: str | None,
             accel: str = "tcg", sizes: dict | None = None, groups: tuple = GROUPS) -> dict:
    """One side's boot, here (inside the private namespace when ``net``).
    ``sizes``/``groups``: another workload than --quick's or the full one
    (experiments: one group, smaller sizes)."""
    sizes = dict(sizes or (QUICK if quick else FULL))
    groups = tuple(g for g in groups if net or g != "net")
    cpus = _cpus()
    peer = None
    with tempfile.TemporaryDirectory(prefix="lgj-bench-guest-") as work:
        try:
            if net:
                _ip("link", "set", "lo", "up")
                peer = Peer(sizes["net_kib"] << 10)
            disk = _disk(work, sizes, "disk.img")
            if kind == "lguest_jit":
                argv = [sys.executable, "-m", "lguest_jit.main", "--rng", f"--block={disk}", f"--initrd={initrd}",
                        f"--stats-json={os.path.join(work, 'stats.json')}",
                        f"--profile={os.path.join(work, 'profile.folded')}", *_knob_options(),
                        *([f"--cpus={cpus}"] if cpus > 1 else []),
                        *([f"--tunnet={PEER_IP}"] if net else []), str(MEM_MB), vmlinux,
                        *_cmdline(sizes, groups, "hvc0").split()]
                title = f"{BENCH}: lguest-jit ({'quick' if quick else 'full'} workload)"
            else:
                if net:
                    _ip("tuntap", "add", "dev", QEMU_TAP, "mode", "tap")
                    _ip("addr", "add", f"{PEER_IP}/24", "dev", QEMU_TAP)
                    _ip("link", "set", QEMU_TAP, "up")
                argv = [shutil.which("qemu-system-x86_64"), "-accel", accel, "-m", str(MEM_MB), "-nographic",
                        "-no-reboot", "-nodefaults", "-serial", "stdio", "-kernel", bzimage, "-initrd", initrd,
                        "-smp", str(cpus),
                        "-append", _cmdline(sizes, groups, "ttyS0"),
                        "-drive", f"file={disk},format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0",
                        "-device", "virtio-rng-pci"]
                if net:
                    argv += ["-netdev", f"tap,id=n0,ifname={QEMU_TAP},script=no,downscript=no",
                             "-device", "virtio-net-pci,netdev=n0"]
                title = f"{BENCH}: QEMU ({accel.upper()}, same kernel and initramfs)"
            got = boot(kind, argv, quick, work, title)
        finally:
            if peer is not None:
                peer.close()
    rep = _side_report(got, kind == "lguest_jit")
    if peer is not None:
        rep["metrics"]["net_host_bytes"] = dict(peer.seen)
    return rep


def _in_netns(kind: str, quick: bool, found: dict, accel: str, **how) -> dict:
    """run_side in a fresh network namespace (a child process)."""
    args = json.dumps({"kind": kind, "quick": quick, "net": True, "accel": accel, **found, **how})
    code = f"import json, benchmarks.bench_guest as m; print('\\n' + json.dumps(m.run_side(**json.loads({args!r}))))"
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", code], env=dict(os.environ, **{NETNS_ENV: "1"}),
                         stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        return {"metrics": {"error": f"the run in a network namespace failed (status {out.returncode})"},
                "workloads": []}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _netns_problem() -> str | None:
    from lguest_jit.testing import netns_problem
    return netns_problem()


def _guest() -> tuple[dict | None, str | None]:
    try:
        from guest.build import cached_guest
    except ImportError as exc:
        return None, f"guest package unavailable: {exc}"
    g = cached_guest()
    if g is None:
        return None, "the default guest is not built yet (python -m guest.build builds it)"
    vmlinux, initrd = g
    bz = os.path.join(os.path.dirname(vmlinux), "bzImage")
    return {"vmlinux": str(vmlinux), "initrd": str(initrd), "bzimage": bz if os.path.exists(bz) else None}, None


def _side(kind: str, quick: bool, found: dict, accel: str = "tcg", **how) -> dict:
    why = _netns_problem() if "net" in how.get("groups", GROUPS) else "no network steps asked for"
    if why is None:
        rep = _in_netns(kind, quick, found, accel, **how)
    else:
        rep = run_side(kind, quick, False, accel=accel, **found, **how)
        rep["metrics"].setdefault("skipped", {})["net"] = f"no private network namespace here: {why}"
    return rep


def measure(quick: bool = False, **how) -> dict:
    """lguest-jit's side (what `bench sweep ... guest` measures per value);
    ``how``: run_side's sizes and groups."""
    from lguest_jit.hw.kvm import kvm_available
    why = kvm_available()
    if why:
        return {"skipped": f"no usable KVM: {why}"}
    found, why = _guest()
    if found is None:
        return {"skipped": why}
    rep = _side("lguest_jit", quick, found, **how)
    out = rep["metrics"]
    out["workloads"] = rep["workloads"]
    return out


def measure_qemu(quick: bool = False, **how) -> dict:
    from lguest_jit.hw.hosts import software_kvm
    if not shutil.which("qemu-system-x86_64"):
        return {"not_comparable": "qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)"}
    found, why = _guest()
    if found is None:
        return {"not_comparable": why}
    if found["bzimage"] is None:
        return {"not_comparable": "QEMU cannot load the ELF vmlinux and no bzImage was built "
                                  "(python -m guest.build --bzimage)"}
    # QEMU's KVM stops at the first instruction a software KVM's emulator
    # rejects (int3, fwait: lguest-jit assists them), so TCG there.
    accel = "tcg" if software_kvm() or not os.access("/dev/kvm", os.R_OK | os.W_OK) else "kvm"
    rep = _side("qemu", quick, found, accel, **how)
    out = rep["metrics"]
    out["accel"] = accel
    return out


def _ratios(ours: dict, theirs: dict) -> dict:
    """ours/theirs for rates (above 1: lguest-jit faster), theirs/ours for
    seconds, for each figure both sides have."""
    out = {}
    for k, v in ours.items():
        w = theirs.get(k)
        if not isinstance(v, (int, float)) or not isinstance(w, (int, float)) or isinstance(v, bool) or not v or not w:
            continue
        if "_per_s" in k:
            out[k] = v / w
        elif k.startswith(("seconds_", "ms_")):
            out[k] = w / v
    return out


def run(quick: bool = False) -> dict:
    from lguest_jit.hw.hosts import software_kvm
    ours = measure(quick)
    if "skipped" in ours:
        return {"benchmark": "guest", "skipped": ours["skipped"]}
    workloads = ours.pop("workloads", [])
    qemu = measure_qemu(quick)
    emulated = software_kvm()
    rep = {"benchmark": "guest", "unit": UNIT, "mode": "quick" if quick else "full", "cpus": _cpus(),
           "workload": " ".join(f"{k}={v}" for k, v in (QUICK if quick else FULL).items()),
           "guest_kernel": (f"emulated: {emulated}" if emulated else "hardware virtualization"),
           "lguest_jit": ours, "qemu": qemu}
    if "not_comparable" not in qemu:
        rep["lguest_jit_vs_qemu"] = _ratios(ours, qemu)
    rep["workloads"] = workloads
    rep["note"] = ("times are the guest's /proc/uptime, in 10 ms steps; each step includes starting its "
                   "process (busybox dd, nc, lgj-randread); ratios above 1 mean lguest-jit is faster")
    return rep
