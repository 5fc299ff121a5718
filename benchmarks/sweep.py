"""``lguest-jit bench sweep --param=KNOB=V1,V2,... <bench>``: one device
benchmark measured once per value of a device knob, side by side (for
``guest``: the guest workload, a fresh boot per value, the knob on the
launcher's command line).

Each value runs the benchmark's Numba side (``measure()``) with the knob
handed down through the environment (``benchmarks.common.device_knobs``);
the pure-Python side and the physical reference do not depend on the
device's knobs, so `bench <bench>` alone measures those.  The report is
shaped like every other one (one column per value), plus ``param`` and
``values`` for the plot, which draws the knob on the x axis.
"""
from __future__ import annotations

import importlib
import os

from lguest_jit.devices.knobs import BENCH_CPUS_ENV, BENCH_ENV, CPUS_SWEEP, GUEST_ONLY_KNOBS, Knobs, parse_knobs

# Benchmarks whose devices take the knobs; `guest` boots a guest per value.
SWEEPABLE = ("blk", "rng", "net", "guest")


def unsweepable(param: str, what: str) -> str | None:
    """Why ``param`` cannot change what ``what`` measures, or None."""
    if param in GUEST_ONLY_KNOBS and what != "guest":
        why = {CPUS_SWEEP: "is the machine's, not a device's",
               "net-mtu": "changes the frames a guest's TCP sends, not a device benchmark's fixed ones"}.get(
                   param, "is the vCPU's, not a device's")
        return f"--{param} {why}: only `bench sweep --param={param}=... guest` measures it"
    return None


def column(param: str, value: str) -> str:
    return f"{param}={value}"


def run(param: str, values: list, what: str, quick: bool) -> dict:
    mod = importlib.import_module(f"benchmarks.bench_{what}")
    rep = {"benchmark": f"sweep {what}", "bench": what, "param": param, "values": list(values),
           "unit": getattr(mod, "UNIT", ""), "side": "numba"}
    saved = {k: os.environ.get(k) for k in (BENCH_ENV, BENCH_CPUS_ENV)}
    try:
        for v in values:
            if param == CPUS_SWEEP:
                os.environ[BENCH_ENV] = Knobs().to_env()
                os.environ[BENCH_CPUS_ENV] = v
            else:
                os.environ[BENCH_ENV] = parse_knobs({param: v}).to_env()
            got = mod.measure(quick)
            if "skipped" in got:
                return {"benchmark": rep["benchmark"], "skipped": got["skipped"]}
            if isinstance(got.get("workloads"), list):       # bench guest: per-workload details, not figures
                rep.setdefault("workloads", []).append({"column": column(param, v), "groups": got.pop("workloads")})
            rep[column(param, v)] = got
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
    return rep
