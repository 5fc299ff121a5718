"""Shared timing helpers for the benchmarks.

Every benchmark reports numbers from one run, side by side: the Numba
kernels, the same kernels as plain Python (``NUMBA_DISABLE_JIT=1`` in a
subprocess, because the flag is read at import time), and where it makes
sense a physical reference such as a plain ``os.preadv`` loop.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


# The first request a device serves may wait for its service kernels to
# compile (a cold Numba cache takes seconds); later ones take microseconds.
WARMUP_TIMEOUT = 300.0


def rate(fn, min_time: float = 0.2, repeat: int = 3) -> float:
    """Operations per second of ``fn(n)``, which must perform ``n`` operations.

    The count is grown until one call lasts ``min_time``; the best of
    ``repeat`` calls is reported (the least disturbed by the other core).
    """
    fn(1)  # warm-up: compilation or cache loading must not be timed
    n = 1
    while True:
        t0 = time.perf_counter()
        fn(n)
        dt = time.perf_counter() - t0
        if dt >= min_time or n >= 1 << 30:
            break
        n = n * 2 if dt <= 0 else max(n * 2, int(n * min_time / dt * 1.2))
    best = dt
    for _ in range(repeat - 1):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t0)
    return n / best


def jit_disabled() -> bool:
    return os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0")


def measure_in_subprocess(module: str, quick: bool, env: dict | None = None) -> dict:
    """Run ``module.measure(quick)`` in a fresh interpreter (default: pure
    Python, ``NUMBA_DISABLE_JIT=1``) and return its result."""
    child_env = dict(os.environ)
    child_env.update(env if env is not None else {"NUMBA_DISABLE_JIT": "1"})
    code = (f"import json, {module} as m; "
            f"print('\\n' + json.dumps(m.measure({bool(quick)!r})))")
    out = subprocess.run([sys.executable, "-c", code], env=child_env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ratios(fast: dict, slow: dict) -> dict:
    """fast/slow for every metric both sides report (rates: higher is better)."""
    return {k: (fast[k] / slow[k] if slow.get(k) else None) for k in fast if k in slow}


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def three_way(bench: str, unit: str, module: str, quick: bool, measure, reference, ref_name: str) -> dict:
    """The report of a device benchmark: the Numba device path, the same path
    as plain Python, and a plain host loop doing the same I/O (``ref_name``),
    measured in that order in one run, with the two ratios."""
    progress(f"bench {bench}: numba device path")
    fast = measure(quick)
    progress(f"bench {bench}: {ref_name.replace('_', ' ')}")
    ref = reference(quick)
    progress(f"bench {bench}: pure Python device path (NUMBA_DISABLE_JIT=1)")
    slow = measure_in_subprocess(module, True)
    return {"benchmark": bench, "unit": unit, "numba": fast, "python": slow, ref_name: ref,
            f"numba_vs_{ref_name}": ratios(fast, ref), "numba_vs_python": ratios(fast, slow)}
