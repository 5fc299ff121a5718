"""Every benchmark's measuring path runs (Numba side, shortest timing):
a benchmark that only breaks inside `bench all` is found here, not after a
long run.  No timing is asserted, only that each metric was measured."""
import importlib

import pytest

from lguest_jit.main import BENCHMARKS


@pytest.mark.parametrize("name", ["blk", "rng"])
def test_device_benchmark_measures_every_case(name):
    mod = importlib.import_module(f"benchmarks.bench_{name}")
    fast = mod.measure(quick=True)
    ref = mod.measure_reference(quick=True)
    assert fast.keys() == ref.keys() and fast
    # Each case (and each driver, for blk) reports requests/s and MB/s.
    for key, rps in fast.items():
        assert rps > 0, key
    assert len(fast) == 2 * len(mod.CASES) * (len(mod.DRIVERS) if hasattr(mod, "DRIVERS") else 1)


def test_every_listed_benchmark_has_measure_and_run():
    for name in BENCHMARKS:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        assert callable(mod.measure) and callable(mod.run), name
