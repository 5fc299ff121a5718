"""The default guest end to end: the `lguest-jit` command boots the real
Linux from guest/ with console, block, rng and net, and the guest's own
/init selftest (guest/init) reports what its drivers did.

Slow: minutes on our PVM hosts (guest kernel code is emulated), and on a
fresh machine the guest is built first (~10 minutes, cached afterwards).
"""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # guest/ is a top-level package of the repo
    sys.path.insert(0, str(ROOT))

from guest import build, markers  # noqa: E402

HOST_IP = "10.0.2.2"                 # the tap's address; the guest's default peer
GUEST_MAC = "52:54:00:12:34:56"      # offered to the guest through VIRTIO_NET_F_MAC
DISK_BYTES = 1 << 20
DISK_FILL = b"\xee"
BOOT_TIMEOUT_S = 1200                # a hung guest fails the test instead of hanging CI

DRIVERS = {"0x0001": "virtio_net", "0x0002": "virtio_blk", "0x0003": "virtio_console", "0x0004": "virtio_rng"}


def _read_timed(stream, lines):
    """(wall seconds, line) for every console line, as it arrives."""
    for raw in stream:
        lines.append((time.monotonic(), raw))


def run_console(argv, stderr_path, timeout=BOOT_TIMEOUT_S, env=None):
    """Run a launcher command line; (exit status, [(wall time, console
    line)]).  A guest still running after `timeout` s is killed."""
    lines = []
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env)
        reader = threading.Thread(target=_read_timed, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
        reader.join(10)
    return status, lines


def check_selftest(rep, console: bytes, disk, tail: str, cpus: int = 1) -> None:
    """What the guest's selftest must have shown: every step OK, its drivers
    bound, the block write in the host's disk file, the tap answering, and
    `cpus` CPUs online, each of which ran its share of work."""
    assert rep.done and rep.workload == "selftest", tail
    assert rep.failed == [], tail
    # No guest process crashed on the way (guest/README.md, "Pipelines").
    assert b"segfault at" not in console, tail

    for name in ("mount-proc", "mount-sysfs", "mount-devtmpfs", "cpus", "console", "pci", "virtio", "hwrng", "block",
                 "net", "ping", "queues"):
        assert rep.step(name) is not None and rep.step(name).status == "OK", (name, tail)

    # /proc/cpuinfo lists every vCPU, all online, and a job pinned to each
    # added to that CPU's time in /proc/stat.
    cpu = rep.step("cpus").fields()
    assert cpu["count"] == str(cpus) and cpu["online"] == ("0" if cpus == 1 else f"0-{cpus - 1}"), cpu
    assert all(int(cpu[f"cpu{i}"].lstrip("+")) > 0 for i in range(cpus)), cpu

    # The guest's console is the virtio console.
    assert rep.step("console").fields()["active"] == "hvc0"

    # Four virtio-pci functions (modern IDs 0x1040 + type) and the host bridge,
    # and Linux's own driver bound to every virtio device.
    pci = rep.step("pci").fields()
    virtio_ids = sorted(v.split("/")[0] for v in pci.values() if v.startswith("1af4:"))
    assert virtio_ids == [f"1af4:{0x1040 + t:04x}" for t in (1, 2, 3, 4)], pci
    assert any(v.endswith("/060000") for v in pci.values()), f"no host bridge: {pci}"
    bound = dict(v.split(":", 1) for v in rep.step("virtio").fields().values())
    assert bound == DRIVERS, rep.step("virtio")

    # /dev/hwrng gave 64 bytes, and not a constant.
    rng_hex = rep.step("hwrng").fields()["hex"]
    assert len(rng_hex) == 128 and len(set(rng_hex)) > 4, rng_hex

    # The file the guest wrote to /dev/vda and synced is in the host's image,
    # byte for byte, and nothing else changed.
    blk_bytes = int(rep.step("block").fields()["bytes"])
    data = disk.read_bytes()
    assert data[:blk_bytes] == markers.block_pattern(blk_bytes)
    assert data[blk_bytes:] == DISK_FILL * (DISK_BYTES - blk_bytes)

    # eth0 has the MAC we offered, and the host side of the tap answered.
    assert rep.step("net").fields()["mac"] == GUEST_MAC
    assert rep.step("ping").fields()["peer"] == HOST_IP

    # One block queue and one queue pair per vCPU (the knobs' default), as
    # blk-mq and the network stack see them.
    queues = rep.step("queues").fields()
    assert (queues["blk"], queues["rx"], queues["tx"], queues["cpus"]) == (str(cpus),) * 4, rep.step("queues")
    # 64 direct 4 KiB reads per CPU, one request each, on top of the block step's.
    assert int(queues["reads"]) >= 64 * cpus, rep.step("queues")


def check_queue_stats(stats: dict, cpus: int) -> None:
    """--stats-json: every block queue and every queue of every network
    pair took requests (the selftest's I/O from each CPU), and the network
    device's control queue set all its pairs in use."""
    blk = next(v for k, v in stats["queues"].items() if k.startswith("block:"))
    net = next(v for k, v in stats["queues"].items() if k.startswith("net:"))
    assert sorted(blk) == [f"requests{i}" for i in range(cpus)], blk.keys()
    assert all(q["requests"] > 0 and q["bytes"] > 0 and q["errors"] == 0 for q in blk.values()), blk
    # Each queue timed its own requests (the first always).
    assert all(q["latency"]["count"] >= 1 and q["latency"]["p50_ns"] <= q["latency"]["p99_ns"]
               for q in blk.values()), blk
    for k in range(cpus):
        for d in ("rx", "tx"):
            assert net[f"{d}{k}"]["requests"] > 0 and net[f"{d}{k}"]["errors"] == 0, (d, k, net[f"{d}{k}"])
    ctrl = net["ctrl"]
    assert ctrl["pairs_in_use"] == cpus and ctrl["commands_ok"] >= 1, ctrl
    assert all(ctrl[f"commands_err_{r}"] == 0 for r in ("class", "command", "length", "pairs")), ctrl


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_default_guest_drives_every_device(tmp_path, packed):
    """The whole selftest, with split rings and (--packed=on: Linux
    negotiates VIRTIO_F_RING_PACKED when offered) with packed ones."""
    from lguest_jit.hw.kvm import kvm_available
    why = kvm_available()
    if why is not None:
        pytest.skip(f"no usable KVM: {why}")
    if shutil.which("unshare") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs unshare(1) and /dev/net/tun for the guest's private network")
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()[:200]}")

    # Builds on a machine that has no cached guest (CI's clean clone): a
    # build failure fails the test, it does not skip it.
    vmlinux, initrd = build.ensure_guest(log=lambda m: print(m, flush=True))

    disk = tmp_path / "disk.img"
    disk.write_bytes(DISK_FILL * DISK_BYTES)
    stats_file = tmp_path / "stats.json"
    cmdline = build.default_cmdline("selftest", "hvc0")
    argv = [sys.executable, "-m", "lguest_jit.main", f"--tunnet={HOST_IP}:{GUEST_MAC}", f"--block={disk}", "--rng",
            f"--initrd={initrd}", f"--stats-json={stats_file}", *(["--packed=on"] if packed else []), "256",
            str(vmlinux), *cmdline.split()]
    stderr_file = tmp_path / "stderr.txt"
    t0 = time.monotonic()
    # The launcher, its tap and the host side of the ping live in a
    # network namespace of their own.
    status, lines = run_console(["unshare", "--net", "--", *argv], stderr_file)
    wall = time.monotonic() - t0
    console = b"".join(raw for _, raw in lines)
    tail = console[-4000:].decode(errors="replace") + "\n--- stderr ---\n" + stderr_file.read_text(errors="replace")
    rep = markers.parse_console(console)

    # Boot time and the time each step took, guest and host clocks side by side.
    print(f"\ndefault guest: exit status {status} after {wall:.1f} s wall")
    prev_wall = None
    for when, raw in lines:
        text = raw.decode(errors="replace").strip()
        if "Run /init" in text or "LGJ-" in text:
            at = when - t0
            words = text[text.find("LGJ-"):].split() if "LGJ-" in text else []
            # LGJ-INIT <uptime>, LGJ-DONE <workload> <uptime>, LGJ-STEP <name> <status> <uptime>
            at_word = {"LGJ-INIT": 1, "LGJ-DONE": 2, "LGJ-STEP": 3}.get(words[0] if words else "")
            up = words[at_word] if at_word is not None and len(words) > at_word else None
            delta = f"+{at - prev_wall:6.1f} s" if prev_wall is not None else " " * 9
            print(f"  wall {at:7.1f} s {delta}  guest uptime {up or '-':>8}  {text[:110]}")
            prev_wall = at
    assert status == 0, tail
    check_selftest(rep, console, disk, tail)

    # The launcher's own counters agree: every queue that had work saw it,
    # and no queue reported an error.
    stats = json.loads(stats_file.read_text())
    queues = stats["queues"]
    by_kind = {name.split(":")[0]: qs for name, qs in queues.items()}
    assert set(by_kind) == {"console", "net", "block", "rng"}, queues
    assert sum(c["bytes"] for c in by_kind["rng"].values()) >= 64, by_kind["rng"]
    for dev, qs in queues.items():
        for q, c in qs.items():
            assert c["errors"] == 0, (dev, q, c)
            assert c["layout"] == ("packed" if packed else "split"), (dev, q, c)
    for kind in ("net", "block", "rng"):
        assert sum(c["requests"] for c in by_kind[kind].values()) > 0, (kind, by_kind[kind])
    # Request latency was timed on the disk's queue (one request in 16; the first always).
    lat = next(iter(by_kind["block"].values()))["latency"]
    assert lat["count"] >= 1 and sum(lat["log2_ns"]) == lat["count"] and lat["p50_ns"] <= lat["p99_ns"], lat
    # Every device took its interrupts as MSI-X messages: per-queue PCI-MSI
    # lines in the guest's /proc/interrupts (console: config, input,
    # output; net: config, input.0, output.0; block: config, req.0; rng:
    # config, input), none on INTx, and Linux never read an ISR.
    irqs = rep.step("irqs").fields()
    assert irqs["intx"] == "0" and irqs["msi"] == "10" and irqs["msi_cpus"] == "0", rep.step("irqs")
    names = {k for k in irqs if k.startswith("virtio")}
    assert sum(k.endswith("-config") for k in names) == 4, names
    assert len(names) == 10, names
    assert {name.split(":")[0] for name in stats["interrupts"]} == {"console", "net", "block", "rng"}, \
        stats["interrupts"]
    for dev, c in stats["interrupts"].items():
        assert c["mode"] == "msix" and c["isr_reads"] == 0, (dev, c)
    # Only the instruction assists guest/README.md names were needed.
    assert set(stats["exits"]["assists"]) <= {"int3", "fwait"}, stats["exits"]


@pytest.mark.slow
def test_default_guest_on_two_vcpus_and_its_snapshot(tmp_path):
    """One boot with --cpus=2: Linux starts its AP itself (INIT/SIPI), the
    selftest passes with every device and sees 2 processors each doing
    work, the devices' MSI-X interrupts land on both CPUs, --stats-json
    counts per vCPU; the block device has 2 request queues and the network
    device 2 queue pairs (one per vCPU, the default), Linux uses all of
    them (/sys/block/vda/mq, /sys/class/net/eth0/queues) and --stats-json
    shows requests on each after the selftest's I/O from both CPUs; a
    snapshot taken at /init (the guest carrying on) restores with both
    vCPUs and every queue, and finishes the same selftest, again with
    requests on every queue."""
    from lguest_jit.hw.kvm import kvm_available
    why = kvm_available()
    if why is not None:
        pytest.skip(f"no usable KVM: {why}")
    if shutil.which("unshare") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs unshare(1) and /dev/net/tun for the guest's private network")
    vmlinux, initrd = build.ensure_guest(log=lambda m: print(m, flush=True))
    disk = tmp_path / "disk.img"
    disk.write_bytes(DISK_FILL * DISK_BYTES)
    snap = tmp_path / "snap"
    stats_file = tmp_path / "stats.json"
    cmdline = build.default_cmdline("selftest", "hvc0")
    launcher = [sys.executable, "-m", "lguest_jit.main"]
    argv = [*launcher, "--cpus=2", f"--tunnet={HOST_IP}:{GUEST_MAC}", f"--block={disk}", "--rng",
            f"--initrd={initrd}", f"--stats-json={stats_file}", f"--snapshot={snap}", "--snapshot-on=LGJ-INIT",
            "256", str(vmlinux), *cmdline.split()]
    err = tmp_path / "stderr.txt"
    status, lines = run_console(["unshare", "--net", "--", *argv], err)
    console = b"".join(raw for _, raw in lines)
    tail = console[-4000:].decode(errors="replace") + "\n--- stderr ---\n" + err.read_text(errors="replace")
    assert status == 0, tail
    assert "snapshot written to" in err.read_text(), tail
    rep = markers.parse_console(console)
    check_selftest(rep, console, disk, tail, cpus=2)
    irqs = rep.step("irqs").fields()
    # 10 lines with one queue (pair) each, plus a block queue and a network
    # pair (the control queue takes no interrupt).
    assert irqs["intx"] == "0" and irqs["msi"] == "13", rep.step("irqs")
    assert irqs["msi_cpus"] == "0,1", rep.step("irqs")           # both CPUs took virtio MSI-X messages
    stats = json.loads(stats_file.read_text())
    check_queue_stats(stats, 2)
    vcpus = stats["vcpus"]
    assert [v["vcpu"] for v in vcpus] == [0, 1], vcpus
    assert all(v["exits"]["total"] > 0 and v["user_s"] + v["system_s"] > 0 for v in vcpus), vcpus
    assert sum(v["exits"]["total"] for v in vcpus) == stats["exits"]["total"], (vcpus, stats["exits"])
    from lguest_jit import snapshot
    saved = snapshot.read(str(snap))
    assert saved["machine"].cpus == 2 and len(saved["kvm"]["vcpus"]) == 1, saved["machine"]
    assert (saved["machine"].knobs.blk_queues, saved["machine"].knobs.net_queues) == (2, 2), saved["machine"]

    # The snapshot was taken at /init, before the selftest wrote the disk:
    # the disk as it was then, and --force for its new mtime.
    disk.write_bytes(DISK_FILL * DISK_BYTES)
    err = tmp_path / "restore.err"
    stats_file.unlink()
    status, lines = run_console(["unshare", "--net", "--", *launcher, "restore", "--force",
                                 f"--stats-json={stats_file}", str(snap)], err)
    console = b"".join(raw for _, raw in lines)
    tail = console[-4000:].decode(errors="replace") + "\n--- stderr ---\n" + err.read_text(errors="replace")
    assert status == 0, tail
    rep = markers.parse_console(console)
    assert rep.init_uptime is None, tail                      # restored, not booted again
    check_selftest(rep, console, disk, tail, cpus=2)
    check_queue_stats(json.loads(stats_file.read_text()), 2)
