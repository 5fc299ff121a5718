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
    mq = getattr(mod, "MQ_CASES", ())
    assert len(fast) == 2 * len(mod.CASES) * (len(mod.DRIVERS) if hasattr(mod, "DRIVERS") else 1) + 2 * len(mq) \
        + len({b for b, _ in mq})
    if mq:
        # N queues on N driver threads, next to N reference threads; the
        # 1 -> 2 scaling of both.
        assert {k for k in fast if k.startswith("mq_scaling_")} == {"mq_scaling_4KiB", "mq_scaling_1MiB"}


def test_net_benchmark_measures_every_case():
    """Both directions, every size, on the device alone (what `bench sweep`
    measures) and on the device and the plain tap loop case by case (what
    `bench net` reports), each in its own private network namespace."""
    from benchmarks import bench_net
    problem = bench_net.netns_problem()
    if problem:
        pytest.skip(problem)
    fast = bench_net.measure(quick=True)
    pair = bench_net.measure_pair(quick=True)
    ref = pair["reference"]
    mq = bench_net._mq_cases()
    scaling = {f"mq_scaling_{d}_{n}" for d in ("tx", "rx") for n in ("1500B", "64KiB")}
    assert fast.keys() == ref.keys() == pair["device"].keys()
    assert len(fast) == 2 * len(bench_net.CASES) + 2 * len(mq) + len(scaling)
    assert all(v > 0 for side in pair.values() for v in side.values())
    assert {k for k in fast if k.endswith("_frames_per_s") and not k.startswith("mq")} == {
        f"{d}_{n}_frames_per_s" for d in ("tx", "rx") for n in ("64B", "1500B", "64KiB")}
    assert {k for k in fast if k.startswith("mq_scaling")} == scaling
    assert {k for k in fast if k.startswith("mq2_")} == {f"mq2_{d}_{n}_{u}" for d in ("tx", "rx")
                                                         for n in ("1500B", "64KiB") for u in ("frames_per_s",
                                                                                              "MB_per_s")}
    for key, v in fast.items():
        assert v > 0, key


def test_vsock_benchmark_measures_every_case():
    """Both directions, both message sizes, through the compiled guest on
    the device alone and case by case next to the socket pair (what `bench
    vsock` reports); each run counts every byte through."""
    from benchmarks import bench_vsock
    fast = bench_vsock.measure(quick=True)
    pair = bench_vsock.measure_pair(quick=True)
    assert fast.keys() == pair["device"].keys() == pair["reference"].keys()
    assert sorted(fast) == sorted(f"{d}_{m}KiB_MB_per_s" for d in ("guest_to_host", "host_to_guest") for m in (4, 64))
    for side in (fast, pair["device"], pair["reference"]):
        assert all(v > 0 for v in side.values()), side


def test_every_listed_benchmark_has_measure_and_run():
    for name in BENCHMARKS:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        assert callable(mod.measure) and callable(mod.run), name


def test_quick_pure_python_blk_measures_fewer_cases_and_ratios_stay_honest():
    """--quick's pure-Python side of bench blk runs the interrupt-driven
    cases only (in a subprocess, as `bench blk` does); a ratio exists only
    for a metric both sides measured."""
    from benchmarks import bench_blk
    from benchmarks.common import measure_in_subprocess, ratios
    slow = measure_in_subprocess("benchmarks.bench_blk", True)
    irq = {f"{name}_{unit}" for name, _, (_, _, mode) in bench_blk._cases() if mode == "irq"
           for unit in ("requests_per_s", "MB_per_s")}
    assert set(slow) == irq and all(v > 0 for v in slow.values())
    fast = {k: 1.0 for name, _, _ in bench_blk._cases() for k in (f"{name}_requests_per_s", f"{name}_MB_per_s")}
    assert set(ratios(fast, slow)) == irq


def test_plot_labels_every_axis_with_its_unit(tmp_path):
    """Each benchmark and unit gets its own panel (bench blk: requests/s
    and MB/s), with the unit on the value axis and the case names as
    horizontal tick labels; the PNG is written."""
    pytest.importorskip("matplotlib")
    from benchmarks.plot import _panels, plot
    reps = [{"benchmark": "blk", "unit": "read requests per second and MB/s; depth = requests in flight",
             "numba": {"4KiB_depth1_irq_requests_per_s": 3e5, "4KiB_depth1_irq_MB_per_s": 1.2e3},
             "python": {"4KiB_depth1_irq_requests_per_s": 4e3, "4KiB_depth1_irq_MB_per_s": 16.0},
             "numba_vs_python": {"4KiB_depth1_irq_requests_per_s": 75.0}},
            {"benchmark": "exits", "unit": "guest exits per second, one vCPU",
             "metrics": {"pio_exits_per_s": 2e4}, "overhead_us": {"pio": 12.5}},
            {"benchmark": "boot", "unit": "wall seconds (lower is better)",
             "lguest_jit": {"seconds_to_init": 30.0, "exit_status": 0}, "python": {"not_measured": "why"}},
            {"benchmark": "rng", "skipped": "no reason"}]
    panels = {(b, u): m for b, u, m in _panels(reps)}
    assert set(panels) == {("blk", "read requests per second (log scale)"), ("blk", "MB/s (log scale)"),
                           ("exits", "guest exits per second (log scale)"),
                           ("exits", "microseconds per exit (lower is better)"),
                           ("boot", "wall seconds (lower is better)")}
    assert panels[("blk", "MB/s (log scale)")] == {"4KiB_depth1_irq_MB_per_s": {"numba": 1.2e3, "python": 16.0}}
    assert panels[("boot", "wall seconds (lower is better)")] == {"seconds_to_init": {"lguest_jit": 30.0}}
    out = tmp_path / "bench.png"
    assert plot(reps, str(out)) == 5
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_plot_has_the_knob_on_its_x_axis(tmp_path):
    """`bench sweep --param=KNOB=... rng --json --plot`: one column per value
    in the JSON, and the figure drawn from that JSON has the knob's values
    along x (labelled with the knob) and the benchmark's units on y."""
    pytest.importorskip("matplotlib")
    import json
    import os
    import subprocess
    import sys

    from benchmarks.plot import sweep_figure
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    png = tmp_path / "sweep.png"
    r = subprocess.run([sys.executable, "-m", "lguest_jit.main", "bench", "sweep", "--param", "queue-size=4,64",
                        "rng", "--quick", "--json", f"--plot={png}"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=root))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["param"] == "queue-size" and rep["values"] == ["4", "64"]
    assert rep["queue-size=4"].keys() == rep["queue-size=64"].keys() and rep["queue-size=4"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = sweep_figure(rep)
    units = set()
    for ax in fig.axes:
        assert ax.get_xlabel().startswith("queue-size")
        assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "64"]
        units.add(ax.get_ylabel())
        for line in ax.get_lines():
            metric = line.get_label()
            assert list(line.get_xdata()) == [0, 1]
            assert list(line.get_ydata()) == [rep["queue-size=4"][metric], rep["queue-size=64"][metric]]
    assert units == {"requests per second (log scale)", "MB/s (log scale)"}


def test_a_packed_sweep_drives_the_multiqueue_block_cases_on_packed_rings():
    """`bench sweep --param=packed=on blk`: the N-queue cases drive the
    packed rings the device offers with the packed driver (the split driver
    wrote a split ring into them and the sweep never ended)."""
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "lguest_jit.main", "bench", "sweep", "--param=packed=on", "blk",
                        "--quick", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    on = json.loads(r.stdout)["packed=on"]
    mq = {k: v for k, v in on.items() if k.startswith("mq")}
    assert {"mq1_4KiB_depth16_requests_per_s", "mq2_4KiB_depth16_requests_per_s"} <= mq.keys(), on.keys()
    assert all(v > 0 for v in mq.values()), mq
