"""Shared helpers for the benchmarks: timing, live progress, the pure-Python
side in a subprocess, and the report every benchmark returns.

Every benchmark reports numbers from one run, side by side: the Numba
kernels, the same kernels as plain Python (``NUMBA_DISABLE_JIT=1`` in a
subprocess, because the flag is read at import time), and where it makes
sense a physical reference such as a plain ``os.preadv`` loop.
"""
from __future__ import annotations

import contextlib
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
    A slow side (pure Python) simply does fewer operations in the same time.
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


def min_time_for(quick: bool, full: float = 0.5) -> float:
    """Seconds one timed call should last: short with --quick, and for
    pure Python (it is measured for the ratio, not for its own sake)."""
    return 0.05 if quick else 0.1 if jit_disabled() else full


def side() -> str:
    """The side this process measures, for progress lines."""
    return "pure Python (NUMBA_DISABLE_JIT=1)" if jit_disabled() else "numba"


def device_knobs():
    """The device knobs a benchmark's devices take: the defaults, or the
    value `bench sweep` is measuring (handed down in the environment, so
    the pure-Python subprocess gets it too)."""
    from lguest_jit.devices.knobs import Knobs
    return Knobs.from_env()


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def live(title: str, total: int):
    """Progress of one phase of ``total`` cases: yields ``step(case)``, to
    call as each case starts.  On a terminal a rich bar on stderr shows the
    phase, the case, done/total and the elapsed time (it ticks while a case
    runs, so a slow case does not look hung); elsewhere (a pipe, a log, CI)
    one plain line per phase.  Never on stdout: ``--json`` stays clean."""
    if not sys.stderr.isatty():
        progress(title)
        yield lambda case: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # Two refreshes a second: the display thread takes the GIL that the
    # pure-Python side is being timed on.
    with Progress(TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[case]}"),
                  console=Console(stderr=True), refresh_per_second=2) as bar:
        task = bar.add_task(title, total=total, case="")
        started = False

        def step(case: str) -> None:
            nonlocal started
            if started:
                bar.advance(task)
            started = True
            # Drawn now, not at the next tick: a case shorter than the
            # refresh period would otherwise never show its name.
            bar.update(task, case=case, refresh=True)

        yield step
        bar.update(task, completed=total, case="")


def rates(title: str, cases: dict, min_time: float) -> dict:
    """``rate()`` of each ``name: fn(n)`` in ``cases``, under live progress."""
    out = {}
    with live(title, len(cases)) as step:
        for name, fn in cases.items():
            step(name)
            out[name] = rate(fn, min_time=min_time)
    return out


def throughput(title: str, cases: list, requests_per_s) -> dict:
    """The device benchmarks' metrics: for each ``(name, req_bytes, params)``
    case, ``{name}_requests_per_s = requests_per_s(params)`` and the MB/s it
    makes, under live progress."""
    out = {}
    with live(title, len(cases)) as step:
        for name, req_bytes, params in cases:
            step(name)
            rps = requests_per_s(params)
            out[f"{name}_requests_per_s"] = rps
            out[f"{name}_MB_per_s"] = rps * req_bytes / 1e6
    return out


def measure_in_subprocess(module: str, quick: bool, env: dict | None = None) -> dict:
    """Run ``module.measure(quick)`` in a fresh interpreter (default: pure
    Python, ``NUMBA_DISABLE_JIT=1``) and return its result.  The child's
    stderr is this process's: its live progress reaches the terminal."""
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


def report(bench: str, unit: str, module: str, quick: bool, measure, reference=None, ref_name: str = "",
           python_note: str = "", **extra) -> dict:
    """The report of a Numba-vs-Python benchmark, measured in one run: the
    Numba side, then (device benchmarks) a plain host loop doing the same
    I/O, ``ref_name``, then the same module as plain Python.  Ratios only
    for metrics measured on both sides of them; when pure Python measured
    fewer cases, ``python_note`` says which and why."""
    rep = {"benchmark": bench, "unit": unit, **extra}
    rep["numba"] = fast = measure(quick)
    if reference is not None:
        rep[ref_name] = ref = reference(quick)
        rep[f"numba_vs_{ref_name}"] = ratios(fast, ref)
    rep["python"] = slow = measure_in_subprocess(module, quick)
    rep["numba_vs_python" if reference is not None else "speedup"] = ratios(fast, slow)
    if slow.keys() != fast.keys():
        rep["python_cases"] = sorted(slow)
        rep["python_note"] = python_note or "pure Python measured fewer cases; ratios only where both sides did"
    return rep
