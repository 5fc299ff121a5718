"""A tiny guest that waits for the test instead of spinning for a time.

CPL0 code runs at ~2 M instructions/s on our software-KVM hosts and a
thousand times faster on hardware KVM, so a guest that "spins long enough"
for a signal or a profiler only does so on a slow host.  These guests spin
until the test sets a flag byte in their own memory: the test finds the
launcher's guest RAM in /proc/PID/maps (the mapping exactly as large as the
guest's RAM whose bytes before the flag spell MARKER) and writes the byte
through /proc/PID/mem (the suite runs as root).  Nothing in the launcher
knows about it.
"""
from __future__ import annotations

import os
import select
import time

from lguest_jit.hw.tinyguest import RCX, RDI

MARKER = b"LGJ-WAIT"
FLAG_OFFSET = 0x400          # from the load address: the code stays below it


def spin_until_released(a, flag_addr: int, turns: int, label: str = "wait") -> None:
    """Append to Asm ``a``: loop { ``turns`` turns of dec/jnz; until the
    byte at ``flag_addr`` is nonzero }.  The inner count only puts the
    vCPU's registers mid-way through something when it is interrupted."""
    a.mov_imm32(RDI, flag_addr).label(label).mov_imm32(RCX, turns)
    a.label(label + "_turn").dec_ecx().jnz(label + "_turn")
    a.cmp_byte_rdi_0().jz(label)


def with_flag(code: bytes) -> bytes:
    """The guest image: ``code``, then MARKER and the (clear) flag byte at
    FLAG_OFFSET."""
    start = FLAG_OFFSET - len(MARKER)
    if len(code) > start:
        raise ValueError(f"guest code of {len(code)} bytes runs into the flag at {FLAG_OFFSET:#x}")
    return code + bytes(start - len(code)) + MARKER + b"\0"


def _find_flag(pid: int, flag_addr: int, ram_size: int):
    """Host address of the flag in ``pid``'s guest RAM, or None (not mapped or not loaded yet)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in maps:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if hi - lo != ram_size or not perms.startswith("rw"):
                continue
            mem.seek(lo + flag_addr - len(MARKER))
            if mem.read(len(MARKER)) == MARKER:
                return lo + flag_addr
    return None


def release(proc, flag_addr: int, ram_size: int, timeout: float = 300) -> bool:
    """Set the flag in the guest RAM of launcher ``proc`` (a Popen) as soon
    as its guest is loaded.  False when the launcher exited first (it
    refused to start, or finished); AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            host = _find_flag(proc.pid, flag_addr, ram_size)
        except OSError:              # gone, or a mapping changing under us: look again
            host = None
        if host is not None:
            with open(f"/proc/{proc.pid}/mem", "r+b", buffering=0) as mem:
                mem.seek(host)
                mem.write(b"\1")
            return True
        assert time.monotonic() < deadline, f"guest RAM of pid {proc.pid} not found in {timeout} s"
        time.sleep(0.05)
    return False


def _chunk(fd: int, n: int, deadline: float) -> bytes:
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([fd], [], [], left)[0]:
        return b""
    return os.read(fd, n)


def read_within(stream, n: int, timeout: float) -> bytes:
    """Up to ``n`` bytes of a pipe, whatever arrived within ``timeout`` s (a
    wedged guest fails the test instead of hanging it)."""
    out, deadline = b"", time.monotonic() + timeout
    while len(out) < n:
        got = _chunk(stream.fileno(), n - len(out), deadline)
        if not got:
            break
        out += got
    return out


def read_until(stream, needle: bytes, timeout: float) -> bytes:
    """What a pipe said until it said ``needle`` (or all it said within
    ``timeout`` s)."""
    seen, deadline = b"", time.monotonic() + timeout
    while needle not in seen:
        got = _chunk(stream.fileno(), 4096, deadline)
        if not got:
            break
        seen += got
    return seen
