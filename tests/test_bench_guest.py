"""`bench guest`: the guest workload's console parsed into figures, the
launcher's snapshots subtracted per group, and the --erms choice (no guest
boots here: the boots are the benchmark's)."""
import dataclasses
import json
import os
import shutil
import subprocess

import pytest

from benchmarks import bench_guest, sweep
from guest import build
from lguest_jit.devices.knobs import Knobs, parse_knobs
from lguest_jit.hw import cpuid, hosts

# A console as the default guest printed it (lguest-jit, --quick sizes),
# kernel messages and all; blk-flush failed, the network was not there.
TRANSCRIPT = """\
[    0.000000] Linux version 6.1.176 (lgj@build) #1 SMP
LGJ-INIT 21.37 6.1.176
LGJ-STEP mount-proc OK 21.37 /proc
LGJ-STEP cmdline OK 21.60 workload=bench ip=10.0.2.15/24 peer=10.0.2.2 blk_kib=4 root=initramfs scratch=vda
LGJ-STEP bench-config OK 21.70 mib=8 buf_mib=2 rand=200 net_kib=256 pings=3 rng_kib=16 procs=3 groups=blk,net,rng,proc,
LGJ-BENCH-BEGIN blk 21.71
LGJ-STEP bench-blk-write-direct OK 25.71 start=21.71 end=25.71 bytes=8388608 bs=1048576
LGJ-STEP bench-blk-read-direct OK 27.71 start=25.72 end=27.72 bytes=8388608 bs=1048576
LGJ-STEP bench-blk-read-buffered OK 31.00 start=28.00 end=31.00 bytes=2097152 bs=1048576
[   30.100000] random: crng init done
LGJ-STEP bench-blk-read-random OK 33.00 start=31.00 end=33.00 reads=200 bytes=819200 bs=4096
LGJ-STEP bench-blk-flush FAIL 33.50 rc=1 dd: error writing '/dev/vda': Input/output error
LGJ-BENCH-END blk 33.50
LGJ-BENCH-BEGIN net 33.50
LGJ-STEP bench-net SKIP 33.50 no eth0
LGJ-BENCH-END net 33.51
LGJ-BENCH-BEGIN rng 33.51
LGJ-STEP bench-rng OK 34.51 start=33.51 end=34.51 bytes=16384
LGJ-BENCH-END rng 34.51
LGJ-BENCH-BEGIN proc 34.51
LGJ-STEP bench-proc-pipelines OK 44.51 start=34.51 end=44.51 pipelines=3 processes=9
LGJ-BENCH-END proc 44.51
LGJ-DONE bench 44.60 ok=8 fail=1 skip=1
"""


def test_transcript_parsed_into_figures():
    got = bench_guest.parse(TRANSCRIPT)
    m = got["metrics"]
    assert got["done"] and got["kernel"] == "6.1.176"
    assert m["seconds_to_init"] == pytest.approx(21.37)
    assert m["seconds_blk_write_direct"] == pytest.approx(4.0)
    assert m["blk_write_direct_MB_per_s"] == pytest.approx(8388608 / 4.0 / 1e6)
    assert m["blk_read_buffered_MB_per_s"] == pytest.approx(2097152 / 3.0 / 1e6)
    assert m["blk_read_random_reads_per_s"] == pytest.approx(100.0)
    assert m["rng_MB_per_s"] == pytest.approx(16384 / 1.0 / 1e6)
    assert m["proc_pipelines_per_s"] == pytest.approx(0.3)
    assert m["seconds_workload"] == pytest.approx((33.50 - 21.71) + 0.01 + 1.0 + 10.0)
    assert got["groups"]["blk"] == (21.71, 33.50)
    assert got["skipped"] == {"net": "no eth0"}


def test_failed_step_is_reported_failed_not_as_a_number():
    got = bench_guest.parse(TRANSCRIPT)
    assert got["failed"] == {"blk_flush": "rc=1 dd: error writing '/dev/vda': Input/output error"}
    assert not any(k.startswith(("blk_flush", "seconds_blk_flush")) for k in got["metrics"])
    # A step whose times are missing or garbled is a failure too, not 0 or inf.
    bad = bench_guest.parse("LGJ-STEP bench-rng OK 3.0 start=x end=2.0 bytes=10\n"
                            "LGJ-STEP bench-net-ping OK 3.0 count=3 min_avg_max_ms=garbage\n")
    assert set(bad["failed"]) == {"rng", "net_ping"} and bad["metrics"] == {}
    assert not bad["done"]
    # An unfinished group gives no whole-workload figure.
    part = bench_guest.parse("LGJ-BENCH-BEGIN blk 1.0\nLGJ-STEP bench-rng OK 2.0 start=1.0 end=2.0 bytes=1000\n")
    assert "seconds_workload" not in part["metrics"] and part["metrics"]["seconds_rng"] == 1.0


def test_the_first_connection_is_its_own_step():
    """guest/bench.sh times the boot's first TCP connect() (the kernel fills
    a 256 KiB table from its RNG then) apart from the transfers: seconds,
    no rate, and the transfers' rates count their own time only."""
    got = bench_guest.parse("LGJ-STEP bench-net-connect OK 9.0 start=3.0 end=9.0 \n"
                            "LGJ-STEP bench-net-rx OK 10.0 start=9.0 end=10.0 bytes=1000000\n")
    assert got["metrics"] == {"seconds_net_connect": 6.0, "seconds_net_rx": 1.0, "net_rx_MB_per_s": 1.0}
    script = (bench_guest.os.path.dirname(bench_guest.__file__) + "/../guest/bench.sh")
    text = open(script).read()
    assert text.index("timed net-connect") < text.index("timed net-rx") < text.index("timed net-tx")


def test_ping_and_zero_length_steps():
    got = bench_guest.parse("LGJ-STEP bench-net-ping OK 5.0 count=3 min_avg_max_ms=0.412/0.530/0.700\n"
                            "LGJ-STEP bench-net-rx OK 6.0 start=6.00 end=6.00 bytes=1000000\n")
    assert got["metrics"]["ms_net_ping_avg"] == pytest.approx(0.53)
    # Shorter than the clock's 10 ms step: counted as one step, not infinite.
    assert got["metrics"]["net_rx_MB_per_s"] == pytest.approx(100.0)


def test_group_stats_and_profile_are_differences():
    lat0 = {"count": 1, "p50_ns": 1023, "p99_ns": 1023, "log2_ns": [0] * 10 + [1], "sampled_every": 16}
    lat1 = {"count": 4, "p50_ns": 0, "p99_ns": 0, "log2_ns": [0] * 10 + [1, 0, 3], "sampled_every": 16}
    begin = {"elapsed_s": 10.0, "threads": {"vcpu0": {"user_s": 1.0, "system_s": 2.0},
                                            "block:requestq": {"user_s": 0.1, "system_s": 0.1}},
             "queues": {"block": {"requestq": {"requests": 5, "bytes": 100, "notifications": 5, "interrupts": 5,
                                               "errors": 0, "latency": lat0}},
                        "rng": {"requestq": {"requests": 2, "bytes": 8, "notifications": 2, "interrupts": 2,
                                             "errors": 0, "latency": lat0}}},
             "exits": {"pio": 10, "mmio": 20, "total": 30, "assists": {"int3": 1}, "other": 0}}
    end = {"elapsed_s": 14.0, "threads": {"vcpu0": {"user_s": 1.5, "system_s": 3.0},
                                          "block:requestq": {"user_s": 0.1, "system_s": 0.1}},
           "queues": {"block": {"requestq": {"requests": 9, "bytes": 500, "notifications": 6, "interrupts": 7,
                                             "errors": 0, "latency": lat1}},
                      "rng": {"requestq": {"requests": 2, "bytes": 8, "notifications": 2, "interrupts": 2,
                                           "errors": 0, "latency": lat0}}},
           "exits": {"pio": 10, "mmio": 25, "total": 35, "assists": {"int3": 1}, "other": 0}}
    st = bench_guest.group_stats(begin, end)
    assert st["seconds"] == 4.0
    assert st["thread_cpu_s"] == {"vcpu0": 1.5}
    assert st["queues"] == {"block/requestq": {"requests": 4, "bytes": 400, "notifications": 1, "interrupts": 2,
                                               "errors": 0, "latency": {"count": 3, "p50_ns": 4095, "p99_ns": 4095}}}
    assert st["exits"] == {"mmio": 5, "total": 5}
    prof = bench_guest.group_profile("[kernel];a 10\n[user] 5\n",
                                     "[kernel];a 40\n[kernel];b 20\n[user] 15\n[kernel];c 0\n")
    assert prof["samples"] == 60 and prof["user_pct"] == pytest.approx(16.7)
    assert prof["top"][0] == ["a", 30, 50.0] and [t[0] for t in prof["top"]] == ["a", "b", "[user]"]


def test_erms_choice_and_guest_command_line():
    assert cpuid.hides_fast_strings("auto", "kvm_pvm") and not cpuid.hides_fast_strings("auto", None)
    assert cpuid.hides_fast_strings("off", None) and not cpuid.hides_fast_strings("on", "kvm_pvm")
    assert cpuid.guest_cmdline("a clearcpuid=smap,erms b", True) == "a clearcpuid=smap,erms,fsrm b"
    # Linux reads only the last clearcpuid=: the names go into that one.
    assert cpuid.guest_cmdline("clearcpuid=pcid x clearcpuid=cx16", True) == "clearcpuid=pcid x clearcpuid=cx16,erms,fsrm"
    assert cpuid.guest_cmdline("console=hvc0", True) == "console=hvc0 clearcpuid=erms,fsrm"
    assert cpuid.guest_cmdline("console=hvc0", False) == "console=hvc0"

    class Entry:
        def __init__(self, function, index, ebx, edx):
            self.function, self.index, self.ebx, self.edx = function, index, ebx, edx
    entries = [Entry(7, 0, 0xF1BF03AB, 0x10), Entry(7, 1, 0x200, 0x10), Entry(1, 0, 0x200, 0x10)]
    assert cpuid.fast_strings_offered(entries)
    cpuid.without_fast_strings(entries)
    assert not cpuid.fast_strings_offered(entries)
    assert (entries[0].ebx, entries[0].edx) == (0xF1BF01AB, 0)
    assert [(e.ebx, e.edx) for e in entries[1:]] == [(0x200, 0x10), (0x200, 0x10)]     # other leaves untouched
    assert parse_knobs({"erms": "off"}) == Knobs(erms="off")
    with pytest.raises(ValueError, match="--erms=maybe"):
        parse_knobs({"erms": "maybe"})
    assert sweep.unsweepable("erms", "blk") and sweep.unsweepable("erms", "guest") is None
    assert sweep.unsweepable("queue-size", "blk") is None


def test_a_cpus_sweep_boots_both_sides_with_that_many_vcpus(monkeypatch):
    """`bench sweep --param=cpus=1,2 guest`: --cpus is the launcher's, not
    a knob, so the sweep hands it over on its own; each value reaches the
    launcher (--cpus) and QEMU (-smp), and only the guest benchmark takes it."""
    from lguest_jit.devices.knobs import BENCH_CPUS_ENV, parse_sweep
    assert parse_sweep("cpus=1,2") == ("cpus", ["1", "2"])
    for bad, words in (("cpus=0", "from 1 to 255"), ("cpus=two", "not a whole number"), ("cpus=256", "from 1")):
        with pytest.raises(ValueError, match=words):
            parse_sweep(bad)
    assert "only `bench sweep --param=cpus=... guest`" in sweep.unsweepable("cpus", "net")
    assert sweep.unsweepable("cpus", "guest") is None
    seen = []

    def measure(quick):
        seen.append((bench_guest._cpus(), bench_guest._knob_options()))
        return {"seconds_workload": 1.0}
    monkeypatch.setattr(bench_guest, "measure", measure)
    monkeypatch.delenv(BENCH_CPUS_ENV, raising=False)
    rep = sweep.run("cpus", ["1", "2"], "guest", quick=True)
    assert seen == [(1, []), (2, [])] and rep["values"] == ["1", "2"]
    assert BENCH_CPUS_ENV not in os.environ          # put back as it was


@pytest.mark.parametrize("values", [{"erms": "on"}, {"packed": "on", "queue-size": "64", "blk-poll-us": "2.5"},
                                    {"event-idx": "off", "indirect": "off", "blk-queues": "2", "net-queues": "1"}])
def test_swept_knobs_become_launcher_options_it_accepts(monkeypatch, values):
    """`bench sweep --param=KNOB=... guest` hands each value to the
    launcher as its option: every knob the sweep sets reaches the command
    line, and the launcher's own parser reads back the same knobs."""
    from lguest_jit.devices.knobs import BENCH_ENV
    knobs = parse_knobs(values)
    monkeypatch.setenv(BENCH_ENV, json.dumps(dataclasses.asdict(knobs)))
    opts = bench_guest._knob_options()
    assert len(opts) == len(values)
    back = {o[2:].split("=", 1)[0]: o.split("=", 1)[1] for o in opts}
    assert parse_knobs(back) == knobs


def test_software_kvm_detection(tmp_path):
    mods, info = tmp_path / "module", tmp_path / "cpuinfo"
    mods.mkdir()
    info.write_text("processor : 0\nflags : fpu sse2\n")
    assert hosts.software_kvm(str(mods), str(info)) is None          # no KVM at all
    (mods / "kvm").mkdir()
    assert "emulated" in hosts.software_kvm(str(mods), str(info))     # KVM, no VT-x/AMD-V
    info.write_text("flags : fpu svm\n")
    (mods / "kvm_amd").mkdir()
    assert hosts.software_kvm(str(mods), str(info)) is None
    (mods / "kvm_pvm").mkdir()
    assert "kvm_pvm" in hosts.software_kvm(str(mods), str(info))


BUSYBOX = shutil.which("busybox")


@pytest.mark.skipif(BUSYBOX is None, reason="busybox not installed")
def test_workload_script_runs_and_its_lines_parse(tmp_path):
    """guest/bench.sh's process group, run by busybox sh on the host with
    /init's step() and clock, parses into a figure; a scratch disk that is
    not there is a skip."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for applet in ("md5sum", "cut", "tr"):
        (bindir / applet).symlink_to(BUSYBOX)
    harness = tmp_path / "h.sh"
    harness.write_text(
        'uptime_now() { read -r UPTIME _ < /proc/uptime; }\n'
        'step() { _n=$1; _s=$2; shift 2; uptime_now; echo "LGJ-STEP $_n $_s $UPTIME $*"; }\n'
        'CMDLINE="lguest_jit.bench_procs=2 lguest_jit.bench_groups=proc,blk"\nSCRATCH=\n'
        f'. {build.BENCH_SCRIPT}\nbench\n')
    out = subprocess.run([BUSYBOX, "sh", str(harness)], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")).stdout
    got = bench_guest.parse(out)
    assert got["metrics"]["proc_pipelines_per_s"] > 0
    assert got["skipped"] == {"blk": "no scratch disk"} and not got["failed"]
    assert set(got["groups"]) == {"proc", "blk"}


def test_bench_workload_in_the_initramfs():
    entries = {e.name: e for e in build.initramfs_entries(b"BB", b"#!/bin/sh\n", extra=build.workload_entries(
        log=lambda m: None))}
    assert entries["lib/lgj/bench.sh"].data == build.BENCH_SCRIPT.read_bytes()
    tool = entries["bin/lgj-randread"].data
    assert tool[:4] == b"\x7fELF" and len(tool) < 64 << 10
    assert "bench)" in build.INIT_SCRIPT.read_text() and entries["bin/nc"].data == b"busybox"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler")
def test_randread_reads_a_fixed_count_with_o_direct(tmp_path):
    tool = tmp_path / "lgj-randread"
    tool.write_bytes(build.compile_randread(log=lambda m: None))
    tool.chmod(0o755)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(2 << 20))
    ok = subprocess.run([str(tool), str(disk), "50", "2"], capture_output=True, text=True)
    if ok.returncode and "cannot open" in ok.stderr:
        pytest.skip("this file system refuses O_DIRECT")
    assert ok.returncode == 0, ok.stderr
    # Reads past the end of the disk are short: a failure, with a reason.
    past = subprocess.run([str(tool), str(disk), "50", "64"], capture_output=True, text=True)
    assert past.returncode == 1 and "short or failed read" in past.stderr
    bad = subprocess.run([str(tool), str(disk), "x", "2"], capture_output=True, text=True)
    assert bad.returncode == 1 and "bad number" in bad.stderr


@pytest.mark.parametrize("argv, message", [
    (["bench", "sweep", "--param=erms=on,off", "blk"], "--erms is the vCPU's, not a device's"),
    (["bench", "sweep", "--param=erms=on,maybe", "guest"], "--erms=maybe: must be auto, on or off"),
])
def test_erms_sweep_refusals_are_one_line(argv, message):
    import sys
    r = subprocess.run([sys.executable, "-m", "lguest_jit.main", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and message in r.stderr and r.stderr.startswith("lguest-jit: ")
