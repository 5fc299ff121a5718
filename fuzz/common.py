"""Shared plumbing of the fuzz targets (fuzz/fuzz_<target>.py).

Each target module defines ``one_input(data: bytes) -> str``: it runs one
input through the launcher's real entry points, checks the result against a
plain reference (tests/naive.py, a shadow disk, capstone...) and raises
AssertionError on any disagreement; the returned digest summarises what the
kernels did, so the same input can be replayed under Numba and compared
with the pure-Python run (``replay``).

Command lines:
    python -m fuzz.run <t> [libFuzzer flags] [CORPUS_DIR...]    fuzz (atheris)
    python -m fuzz.fuzz_<t> --replay FILE_OR_DIR...             digest per input
In fuzz mode, with NUMBA_DISABLE_JIT=1, lguest_jit is imported under atheris
instrumentation, so its kernels (plain Python then) give the coverage.
"""
from __future__ import annotations

import hashlib
import importlib
import numbers
import os
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class Reader:
    """Structured values out of fuzz bytes; zeros once they run out, so any
    input is a valid (if short) program."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b.ljust(n, b"\0")

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def pick(self, seq):
        return seq[self.u8() % len(seq)]


def _plain(v):
    # numpy scalars (pure-Python kernels return them) and Python ints must
    # digest alike, or the pure/Numba comparison reports types, not results.
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x) for x in v)
    return v


def digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, (bytes, bytearray, memoryview)) else repr(_plain(p)).encode())
    return h.hexdigest()[:16]


def _inputs(paths):
    for p in paths:
        if os.path.isdir(p):
            for name in sorted(os.listdir(p)):
                f = os.path.join(p, name)
                if os.path.isfile(f):
                    yield f
        else:
            yield p


def replay(one_input, paths) -> int:
    """Run every input once; print "<name> <digest>" per input and a closing
    "slowest" line on stderr.  Exit 1 if any input failed a check."""
    failed = 0
    times = []
    for f in _inputs(paths):
        with open(f, "rb") as fh:
            data = fh.read()
        t0 = time.perf_counter()
        try:
            d = one_input(data)
        except Exception as exc:       # a finding: report it, keep replaying
            d = f"FAIL:{type(exc).__name__}:{str(exc)[:200]!r}"
            failed += 1
        times.append((time.perf_counter() - t0, f))
        print(f"{os.path.basename(f)} {d}")
    # Time the five slowest again: a first run may have paid for compiling
    # (or loading the cache of) the kernels it was the first to call.
    slowest = (0.0, "")
    for first, f in sorted(times)[-5:]:
        with open(f, "rb") as fh:
            again = fh.read()
        t0 = time.perf_counter()
        try:
            one_input(again)
        except Exception:
            pass
        slowest = max(slowest, (min(first, time.perf_counter() - t0), f))
    print(f"# slowest {os.path.basename(slowest[1])} {slowest[0]:.4f} s", file=sys.stderr)
    return 1 if failed else 0


def fuzz(module: str, argv) -> None:
    """Fuzz ``module``'s one_input with atheris (see fuzz/run.py)."""
    import atheris
    assert "lguest_jit" not in sys.modules, "imported before instrumentation"
    pure = os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0")
    # Pure Python: coverage of the launcher's own code (its kernels run as
    # Python).  Jitted: only the harness and references are visible, the
    # mutation still steers by them.
    with atheris.instrument_imports(include=["lguest_jit", "naive", "fuzz"] if pure else ["naive", "fuzz"]):
        mod = importlib.import_module(module)
    atheris.Setup([sys.argv[0], *argv], mod.one_input)
    atheris.Fuzz()


def main(module: str) -> None:
    """A target's own command line: ``--replay FILE_OR_DIR...``."""
    argv = sys.argv[1:]
    if not argv or argv[0] != "--replay":
        sys.exit(f"usage: python -m {module} --replay FILE_OR_DIR... (to fuzz: python -m fuzz.run TARGET)")
    mod = importlib.import_module(module)
    sys.exit(replay(mod.one_input, argv[1:]))
