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
    shapes = [(1, "direct"), (3, "direct"), (17, "direct"), (3, "indirect"), (17, "indirect")]
    for side in ("numba", "python"):
        assert set(rep[side]) == {f"chains_per_s_{n}desc_{k}{layout}" for n, k in shapes
                                  for layout in ("", "_packed")}        # split and packed rings, same shapes
        assert all(v > 0 for v in rep[side].values())
    assert all(v == rep["numba"][k] / rep["python"][k] for k, v in rep["speedup"].items())
    # Each shape's per-request cost, split beside packed (1e9 / the rate).
    for n, k in shapes:
        cost = rep["ns_per_chain"][f"{n}desc_{k}"]
        assert cost["split"] == round(1e9 / rep["numba"][f"chains_per_s_{n}desc_{k}"], 1)
        assert cost["packed"] == round(1e9 / rep["numba"][f"chains_per_s_{n}desc_{k}_packed"], 1)
    # stderr is not a terminal here: no live progress, one plain line per phase.
    assert r.stderr.splitlines() == ["bench vring: numba", "bench vring: pure Python (NUMBA_DISABLE_JIT=1)"]


# ---------------------------------------------------------------- bad arguments: one line, non-zero, nothing created

import os  # noqa: E402
import threading  # noqa: E402

import pytest  # noqa: E402

from lguest_jit import main as cli  # noqa: E402


@pytest.fixture
def kernel(tmp_path):
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF" + bytes(60))
    return str(k)


def _interfaces():
    return sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []


def check_refused(capsys, argv, needle, tmp_path=None):
    before_threads = threading.active_count()
    before_ifs = _interfaces()
    before_files = sorted(os.listdir(tmp_path)) if tmp_path else None
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert lines[0].startswith("lguest-jit: ")
    assert threading.active_count() == before_threads, "no thread was started"
    assert _interfaces() == before_ifs, "no tap was created"
    if tmp_path:
        assert sorted(os.listdir(tmp_path)) == before_files, "no file was created"


@pytest.mark.parametrize("mem,needle", [
    ("0", "must be positive"), ("-5", "must be positive"), ("abc", "not a whole number"),
    ("8", "too small"), ("99999999999", "absurd"),
])
def test_bad_memory_sizes(capsys, kernel, mem, needle, tmp_path):
    argv = ["--stats-json", str(tmp_path / "s.json"), mem, kernel]
    check_refused(capsys, argv, needle, tmp_path)


def test_memory_above_host_free(capsys, kernel, tmp_path):
    import psutil
    free = psutil.virtual_memory().available >> 20
    if free + 1 >= 1 << 22:
        pytest.skip("this host has more than 4 TiB free")
    check_refused(capsys, [str(free + 1024), kernel], "more than the host has free", tmp_path)


def test_missing_and_unreadable_files(capsys, kernel, tmp_path):
    check_refused(capsys, ["64", str(tmp_path / "nope")], "does not exist", tmp_path)
    check_refused(capsys, ["64", str(tmp_path)], "not a regular file", tmp_path)
    check_refused(capsys, ["--initrd", str(tmp_path / "nope"), "64", kernel], "initrd", tmp_path)
    check_refused(capsys, ["--block", str(tmp_path / "disk"), "64", kernel], "block device file", tmp_path)
    check_refused(capsys, ["--block", kernel + ",rw", "64", kernel], "unknown flag", tmp_path)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.write_bytes(b"x")
        locked.chmod(0)
        check_refused(capsys, ["64", str(locked)], "not readable", tmp_path)


@pytest.mark.parametrize("spec,needle", [
    ("10.0.0.300", "--tunnet=10.0.0.300"), ("10.0.0.1:zz:00:00:00:00:00", "--tunnet="),
    ("bridge:", "--tunnet=bridge:"),
])
def test_bad_tunnet(capsys, kernel, spec, needle, tmp_path):
    check_refused(capsys, ["--tunnet", spec, "64", kernel], needle, tmp_path)


def test_unknown_user_and_chroot(capsys, kernel, tmp_path):
    check_refused(capsys, ["--username", "no-such-user-xyz", "64", kernel], "no user", tmp_path)
    check_refused(capsys, ["--chroot", str(tmp_path / "none"), "64", kernel], "not a directory", tmp_path)


def test_unknown_option_single_line(capsys, kernel):
    check_refused(capsys, ["--frobnicate", "64", kernel], "bad arguments")


def test_no_hypervisor(capsys, kernel, tmp_path, monkeypatch):
    import lguest_jit.hw.kvm as kvm
    monkeypatch.setattr(kvm, "kvm_available", lambda path="/dev/kvm": "/dev/kvm does not exist")
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: False if p == "/dev/lguest" else real_exists(p))
    check_refused(capsys, ["64", kernel], "no usable /dev/kvm and no /dev/lguest", tmp_path)
    check_refused(capsys, ["--hypervisor=kvm", "64", kernel], "--hypervisor=kvm", tmp_path)
    check_refused(capsys, ["--hypervisor=lguest", "64", kernel], "/dev/lguest does not exist", tmp_path)
    check_refused(capsys, ["--hypervisor=xen", "64", kernel], "must be kvm, lguest or auto", tmp_path)


def test_bad_kernel_image_is_one_line(capsys, tmp_path):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("needs a hypervisor to get as far as loading")
    bad = tmp_path / "notakernel"
    bad.write_bytes(b"hello world" * 100)
    check_refused(capsys, ["64", str(bad)], "notakernel", tmp_path)


def test_kvm_benchmarks_skip_with_a_reason_without_kvm(tmp_path):
    """`bench all` on a machine without a usable /dev/kvm: the benchmarks
    that need it report why they were skipped, and the run succeeds.  A
    private mount namespace puts a plain file where /dev/kvm is."""
    import shutil
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1)")
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    script = (f"mount --bind {fake} /dev/kvm 2>/dev/null; "    # no /dev/kvm at all: nothing to hide
              f"for b in exits boot; do {sys.executable} -m lguest_jit.main bench $b --json --quick; done")
    r = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "unshare" in r.stderr:
        pytest.skip(f"cannot make a mount namespace here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr
    decoder = json.JSONDecoder()
    text, reports = r.stdout.strip(), []
    while text:
        rep, end = decoder.raw_decode(text)
        reports.append(rep)
        text = text[end:].strip()
    assert [rep["benchmark"] for rep in reports] == ["exits", "boot"]
    for rep in reports:
        assert "/dev/kvm" in rep["skipped"], rep


# ---------------------------------------------------------------- answers that must not wait for Numba

_WHAT_WAS_IMPORTED = """
import json, runpy, sys
sys.argv = ["lguest-jit", *sys.argv[1:]]
try:
    runpy.run_module("lguest_jit.main", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    status = exc.code
# Of the project, only these light modules may answer; of the rest, no
# Numba or numpy.
light = {"lguest_jit", "lguest_jit.main", "lguest_jit.hw", "lguest_jit.hw.hosts", "lguest_jit.hw.firmware",
         "lguest_jit.devices", "lguest_jit.devices.tunspec", "lguest_jit.devices.knobs",
         "lguest_jit.warm",              # warm: the client side
         "lguest_jit.hw.pathtrust",      # the kernel cache check, at import
         "lguest_jit.machine", "lguest_jit.hw.fields"}
loaded = [m for m in sys.modules if m.split(".")[0] in ("numba", "numpy", "benchmarks")
          or (m.startswith("lguest_jit") and m not in light)]
print(json.dumps({"status": status, "loaded": sorted(loaded)}))
"""


@pytest.mark.parametrize("argv,status", [
    (["--help"], None), (["--version"], None),
    (["0", "/nonexistent"], 2), (["--frobnicate", "64", "vmlinux"], 2), (["64", "/nonexistent"], 2),
    (["--hypervisor=xen", "64", "{kernel}"], 2), (["--tunnet=10.0.2.300", "64", "{kernel}"], 2),
    (["bench", "nope"], 2), (["--queue-size=3", "64", "{kernel}"], 2), (["--cpus=0", "64", "{kernel}"], 2),
    (["--cpus=9999", "64", "{kernel}"], 2),
    (["bench", "sweep", "--param=indirect=maybe", "rng"], 2),
    (["bench", "vring", "--plot=/nonexistent/dir/plot.png"], 2),
])
def test_help_version_and_bad_arguments_do_not_import_numba(kernel, argv, status):
    """`--help`, `--version` and a refused command line answer from the
    standard library and docopt alone (Numba's import alone takes ~0.5 s)."""
    argv = [a.format(kernel=kernel) for a in argv]
    r = subprocess.run([sys.executable, "-c", _WHAT_WAS_IMPORTED, *argv], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"status": status, "loaded": []}, r.stderr
    if status:
        assert r.stderr.startswith("lguest-jit: ") and r.stderr.count("\n") == 1, r.stderr


def test_a_valid_command_line_does_load_the_engine(tmp_path):
    """The check above can fail: the same probe sees Numba once the
    arguments are valid and the launcher gets as far as loading a kernel."""
    if not os.path.exists("/dev/kvm") and not os.path.exists("/dev/lguest"):
        pytest.skip("needs a hypervisor to get past argument checks")
    bad = tmp_path / "notakernel"
    bad.write_bytes(b"hello world" * 100)
    r = subprocess.run([sys.executable, "-c", _WHAT_WAS_IMPORTED, "64", str(bad)], capture_output=True,
                       text=True, timeout=300)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["status"] == 2 and "numba" in out["loaded"], (out, r.stderr)


# ---------------------------------------------------------------- benchmark progress: terminal only, never on stdout

def _bench_with_stderr_on_a_terminal(*args):
    """Run `lguest-jit bench ...` with stdout a pipe and stderr a pseudo-terminal."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    # Wide enough that rich never crops the case name off the end of the line.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    env = {**os.environ, "COLUMNS": "200", "LINES": "50"}     # rich reads these before the terminal's size
    proc = subprocess.Popen([sys.executable, "-m", "lguest_jit.main", "bench", *args], stdout=subprocess.PIPE,
                            stderr=slave, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: _read_pty(master), b"")))
    reader.start()
    out, _ = proc.communicate(timeout=600)
    reader.join(timeout=30)
    os.close(master)
    return proc.returncode, out.decode(), b"".join(seen).decode(errors="replace")


def _read_pty(fd):
    try:
        return os.read(fd, 65536)
    except OSError:         # EIO: every writer has closed the terminal
        return b""


def test_bench_progress_goes_to_a_terminal_and_never_into_json():
    status, out, term = _bench_with_stderr_on_a_terminal("vring", "--quick", "--json")
    assert status == 0, term
    rep = json.loads(out)           # stdout is the JSON and nothing else
    assert rep["benchmark"] == "vring"
    # Both phases showed a live bar: done/total and the case names, the
    # pure-Python one from the subprocess, through the same terminal.
    n = len(rep["numba"])
    assert "bench vring: numba" in term and "bench vring: pure Python" in term
    assert term.count(f"{n}/{n}") >= 2, term
    assert "chains_per_s_17desc_indirect" in term
    assert "\x1b[" in term          # drawn in place, not a log


# ---------------------------------------------------------------- numbers: one rule for every numeric option

# Each numeric option, as a command line with {} where the number goes.
NUMERIC_OPTIONS = {
    "memory": ["{}", "{kernel}"],
    "--queue-size": ["--queue-size={}", "64", "{kernel}"],
    "--seg-max": ["--seg-max={}", "64", "{kernel}"],
    "--blk-poll-us": ["--blk-poll-us={}", "64", "{kernel}"],
    "--profile-hz": ["--profile={out}", "--profile-hz={}", "64", "{kernel}"],
    "bench sweep": ["bench", "sweep", "--param=queue-size={}", "rng"],
}


@pytest.mark.parametrize("text", [" 64", "64 ", "8_192", "\u0666\u0664", "+64", "64\n", "1e2", "0x40"])
@pytest.mark.parametrize("option", sorted(NUMERIC_OPTIONS))
def test_every_numeric_option_takes_ascii_digits_only(capsys, kernel, tmp_path, option, text):
    """int() and float() take spaces, "_", other scripts' digits and "+";
    the options take only what --help shows (README, "Command line")."""
    argv = [a.replace("{}", text).format(kernel=kernel, out=tmp_path / "p.folded") for a in NUMERIC_OPTIONS[option]]
    check_refused(capsys, argv, "not a", tmp_path)


@pytest.mark.parametrize("mem", ["3585", "4000", "4095", "4096"])
def test_memory_overlapping_the_mmio_window_is_one_line(capsys, kernel, tmp_path, mem):
    check_refused(capsys, [mem, kernel], "overlaps the PCI MMIO window at 3584 MB", tmp_path)


def test_the_mmio_window_is_the_bus_default():
    import inspect

    from lguest_jit import pci
    assert inspect.signature(pci.Bus).parameters["mmio_base"].default == cli.MMIO_WINDOW_MB << 20


def test_a_snapshot_on_pattern_that_is_not_utf8_is_matched_as_bytes(tmp_path):
    """An argument's bytes that are not UTF-8 (Python holds them as
    surrogates) are the pattern's bytes, as the console's are."""
    args = {"--snapshot": str(tmp_path / "s"), "--snapshot-on": os.fsdecode(b"boot \xff+ done"),
            "--snapshot-exit": False, "--force": False}
    _where, pattern, _leave = cli._snapshot_options(args)
    assert pattern.search(b"xx boot \xff\xff done") and not pattern.search(b"boot  done")
