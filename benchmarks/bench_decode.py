"""x86 device-access decode rate: instructions decoded per second.

Two paths, each for MMIO movs and for port I/O:
  ``*_decodes_per_s``       one instruction per call through the public
                            wrapper (``decode_mmio(buf)`` on a 15-byte uint8
                            fetch window), as a backend does on each exit;
  ``*_bulk_decodes_per_s``  an (N, 15) array decoded in one kernel call, the
                            per-instruction cost of the decoder itself.
The instructions are a fixed mix of the forms Linux's readl/writel/inb/outb
compile to (base+disp8, SIB, disp32, 0x66, byte and high-byte registers;
REX forms in 64-bit mode), rotated so no branch settles on one form.
"""
from __future__ import annotations

import numpy as np

from lguest_jit.hw import decode

from .common import rates, report, side, min_time_for

MMIO32 = ["8b4214", "890c24", "6689500c", "884313", "8a6104", "8b0500e0ffff", "894c2408",
          "8b148d00100000", "66648b4310", "8a8180000000"]
MMIO64 = ["488b4308", "44896010", "8b4214", "66418944240c", "4088770c", "8b0500100000"]
PIO = ["ec", "ee", "66ed", "66ef", "ed", "ef", "e460", "e680", "e571", "66e770", "fa"]


def _windows(hexes: list[str]) -> np.ndarray:
    """Each instruction padded to a 15-byte fetch window (trailing bytes are
    whatever follows in the guest: here a run of nops)."""
    return np.array([list(bytes.fromhex(h).ljust(decode.MAX_INSN_LEN, b"\x90")) for h in hexes], dtype=np.uint8)


def _single(fn, windows: np.ndarray, **kw):
    bufs = [windows[j].copy() for j in range(windows.shape[0])]
    k = len(bufs)

    def run(n):
        for i in range(n):
            if fn(bufs[i % k], **kw).length <= 0:
                raise RuntimeError("benchmark instruction refused")
    return run


def _bulk(fn, windows: np.ndarray, **kw):
    rows = np.tile(windows, (max(1, 4096 // windows.shape[0]), 1))

    def run(n):
        done = 0
        while done < n:
            take = min(n - done, rows.shape[0])
            out = fn(rows[:take], **kw)
            if out[0, decode.D_LENGTH] <= 0:
                raise RuntimeError("benchmark instruction refused")
            done += take
    return run


def measure(quick: bool = False) -> dict:
    m32, m64, pio = _windows(MMIO32), _windows(MMIO64), _windows(PIO)
    return rates(f"bench decode: {side()}", {
        "mmio_decodes_per_s": _single(decode.decode_mmio, m32),
        "mmio64_decodes_per_s": _single(decode.decode_mmio, m64, mode64=True),
        "pio_decodes_per_s": _single(decode.decode_pio, pio),
        "mmio_bulk_decodes_per_s": _bulk(decode.decode_mmio_bulk, m32),
        "mmio64_bulk_decodes_per_s": _bulk(decode.decode_mmio_bulk, m64, mode64=True),
        "pio_bulk_decodes_per_s": _bulk(decode.decode_pio_bulk, pio),
    }, min_time_for(quick, 0.25))


def run(quick: bool = False) -> dict:
    return report("decode", "instructions decoded per second, one core", "benchmarks.bench_decode", quick, measure)
