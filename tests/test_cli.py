"""The command line: benchmarks dispatch and bad arguments."""
import json
import subprocess
import sys


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "lguest_jit.main", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def test_unknown_benchmark_is_one_line_and_nonzero():
    r = run("bench", "nope")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown benchmark" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_option_is_rejected_without_traceback():
    r = run("--no-such-option", "64", "vmlinux")
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_bench_vring_json():
    r = run("bench", "vring", "--json", "--quick")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["benchmark"] == "vring"
    for side in ("numba", "python"):
        assert set(rep[side]) == {f"chains_per_s_{n}desc_{k}" for n, k in
                                  [(1, "direct"), (3, "direct"), (17, "direct"), (3, "indirect"), (17, "indirect")]}
        assert all(v > 0 for v in rep[side].values())
    assert all(v == rep["numba"][k] / rep["python"][k] for k, v in rep["speedup"].items())
