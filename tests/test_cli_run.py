"""The launcher end to end through its command line, on KVM, with a tiny
guest instead of Linux: an ELF the loader enters in long mode, which takes
the rng device through the virtio handshake over MMIO, posts one request,
waits for the used ring and halts.  Checks the exit status and that
--stats-json reports the work that was done."""
import json
import struct
import subprocess
import sys

import pytest

from lguest_jit import pci, testing
from lguest_jit.hw.kvm import kvm_available
from lguest_jit.hw.tinyguest import RAX, RDI, RDX, Asm

pytestmark = pytest.mark.skipif(kvm_available() is not None, reason=f"KVM unusable: {kvm_available()}")

LOAD = 0x100000
DESC, AVAIL, USED, BUF = 0x200000, 0x201000, 0x202000, 0x203000
RNG_SLOT = 2            # the CLI adds the console first (slot 1), then --rng
REQUEST = 48


def _elf64(code: bytes, addr: int) -> bytes:
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,
                       2, 62, 1, addr, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, addr, addr, len(code), len(code), 0x1000)
    return ehdr + phdr + b"\0" * (0x1000 - 64 - 56) + code


def _guest() -> bytes:
    a = Asm(LOAD)

    def store(size, addr, val):        # mov [addr], val
        return a.mov_imm64(RAX, val).mov_imm64(RDI, addr).store_at(size, 0)

    # BAR0 of the rng, through conf1: rdi = BAR0 & ~0xf, kept in rsi too.
    a.mov_imm32(RDX, 0xCF8).mov_imm32(RAX, testing.conf1_address(RNG_SLOT, 0x10)).out(4)
    a.mov_imm32(RDX, 0xCFC).inp(4).raw(b"\x83\xe0\xf0")          # and eax, ~0xf
    a.raw(b"\x48\x89\xc6")                                        # mov rsi, rax
    a.mov_imm32(RDX, 0xCF8).mov_imm32(RAX, testing.conf1_address(RNG_SLOT, 0x04)).out(4)
    a.mov_imm32(RDX, 0xCFC).mov_imm32(RAX, 0x6).out(2)            # COMMAND: memory + bus master

    def common(size, off, val):                                   # mov [rsi+off], val
        a.mov_imm64(RAX, val).raw(b"\x48\x89\xf7")                # mov rdi, rsi
        return a.store_at(size, pci.COMMON_OFF + off)

    common(1, 0x14, 0)
    common(1, 0x14, 1)
    common(1, 0x14, 3)
    common(4, 0x08, 1)
    common(4, 0x0C, 1)                                            # VIRTIO_F_VERSION_1
    common(1, 0x14, 0xB)
    a.raw(b"\x48\x89\xf7").load_at(1, pci.COMMON_OFF + 0x14)          # re-read FEATURES_OK (§3.1.1)
    common(2, 0x16, 0)
    common(8, 0x20, DESC)
    common(8, 0x28, AVAIL)
    common(8, 0x30, USED)
    common(2, 0x1C, 1)
    common(1, 0x14, 0xF)
    # One device-writable buffer, head 0, then publish avail.idx = 1.
    store(8, DESC, BUF)
    store(4, DESC + 8, REQUEST)
    store(2, DESC + 12, 2)
    store(2, AVAIL + 4, 0)
    store(2, AVAIL + 2, 1)
    common(2, pci.NOTIFY_OFF, 0)                                  # queue 0's notify register
    a.mov_imm64(RDI, USED + 2).label("wait").load_at(2, 0).raw(b"\x66\x85\xc0").jz("wait")
    a.cli().hlt()
    return bytes(a)


def test_short_run_stats_json(tmp_path):
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(_elf64(_guest(), LOAD))
    stats = tmp_path / "stats.json"
    r = subprocess.run([sys.executable, "-m", "lguest_jit.main", "--rng", f"--stats-json={stats}", "--stats",
                        "--queue-size=64", "--event-idx=off", "64", str(kernel)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    st = json.loads(stats.read_text())
    rng = st["queues"]["rng"]["requests"]
    assert rng["requests"] == 1 and rng["bytes"] == REQUEST and rng["errors"] == 0
    assert rng["notifications"] >= 1
    assert st["queues"]["console"]["transmitq"]["requests"] == 0
    threads = st["threads"]
    assert "vcpu0" in threads and "rng:requests" in threads
    assert threads["vcpu0"]["user_s"] + threads["vcpu0"]["system_s"] > 0
    # Queue threads start after the launcher does: a thread's CPU time counted
    # twice (or another thread's added to it) would exceed the wall time.
    # (Live threads are read from /proc in clock ticks, so a short one may show 0.)
    queue_threads = [name for name in threads if ":" in name]
    assert queue_threads == ["rng:requests"]           # the tiny guest drives only the rng
    for name in queue_threads:
        assert threads[name]["user_s"] + threads[name]["system_s"] <= st["elapsed_s"], name
    assert st["exits"]["pio"] >= 4 and st["exits"]["mmio"] >= 12
    assert st["rss_bytes"] > 0
    assert "thread vcpu0" in r.stderr and "rng/requests" in r.stderr     # --stats printed too
    # The one request was timed (the first chain of a queue always is).
    lat = rng["latency"]
    assert lat["count"] == 1 and sum(lat["log2_ns"]) == 1 and lat["p50_ns"] == lat["p99_ns"]
    assert 0 < lat["p50_ns"] < 2 * st["elapsed_s"] * 1e9
    assert "latency rng/requests" in r.stderr and f"p50 <= {lat['p50_ns'] / 1000:.1f} us" in r.stderr
    # Under KVM every device offers MSI-X; this guest never enables it.
    assert st["interrupts"]["rng"] == {"mode": "intx", "vectors": 2, "isr_reads": 0}
    assert "irq    rng" in r.stderr and "isr_reads 0" in r.stderr
    # Accesses by register, counted by the compiled dispatch: the guest
    # wrote device_status 5 times and read it once, used conf1 twice.
    regs = st["exit_registers"]
    assert regs["rng common.device_status"] == 6
    assert regs["conf1 address"] == 2 and regs["conf1 data"] == 2
    assert "rng common.queue_notify_off" not in regs                     # only non-zero rows
    assert "access rng common.device_status" in r.stderr


def test_missing_bridge_is_one_line_and_leaves_no_tap(tmp_path):
    import shutil
    if not shutil.which("unshare") or not __import__("os").path.exists("/dev/net/tun"):
        pytest.skip("needs unshare(1) and /dev/net/tun for a private network namespace")
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(_elf64(_guest(), LOAD))
    # if_nameindex asks the namespace itself (/sys would still show the host's view).
    script = (f"{sys.executable} -m lguest_jit.main --tunnet=bridge:nosuchbr0 64 {kernel}; echo status=$?; "
              f"{sys.executable} -c 'import socket; print(*[n for _, n in socket.if_nameindex()])'")
    r = subprocess.run(["unshare", "--net", "sh", "-c", script], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=300)
    if "status=" not in r.stdout:
        pytest.skip(f"cannot create a network namespace here: {r.stderr.strip()[:200]}")
    assert "status=2" in r.stdout
    assert r.stdout.split("status=2", 1)[1].split() == ["lo"], "the tap was removed again"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lguest-jit: ") and "nosuchbr0" in lines[0], r.stderr
