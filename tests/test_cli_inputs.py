"""Every user input the launcher reads is checked before anything is
created (issue 13): a table of bad inputs, each must give exactly one
``lguest-jit: ...`` line, exit status 2, no traceback, and leave no file
behind.  The kernel in the table is garbage on purpose: an input the
argument checks let through would reach the loader and fail with a
different message, so each row also names what its message must say."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUGE = 1 << 40           # a sparse file bigger than any host's memory


def run(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "lguest_jit.main", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


@pytest.fixture
def files(tmp_path):
    def make(name, size=None, data=b"not a kernel at all" * 10):
        p = tmp_path / name
        with open(p, "wb") as f:
            if size is None:
                f.write(data)
            else:
                f.truncate(size)
        return str(p)
    k = make("kernel")
    make("empty", data=b"")
    make("huge", size=HUGE)
    make("initrd-big", size=512 << 20)
    make("disk", data=bytes(4096))
    (tmp_path / "adir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    return tmp_path, k


# (name, args with {d} = the temp dir and {k} = a present kernel file, words the message must contain,
# formatted the same way: a row names the file it refuses and why)
BAD = [
    ("kernel missing", ["64", "{d}/nope"], "does not exist"),
    ("kernel is a directory", ["64", "{d}/adir"], "not a regular file"),
    ("kernel is a fifo", ["64", "{d}/fifo"], "not a regular file"),
    ("kernel empty", ["64", "{d}/empty"], "is empty"),
    ("kernel larger than host memory", ["64", "{d}/huge"], "too large"),
    ("initrd missing", ["--initrd={d}/nope", "64", "{k}"], "initrd '{d}/nope' does not exist"),
    ("initrd is a directory", ["--initrd={d}/adir", "64", "{k}"], "not a regular file"),
    ("initrd empty", ["--initrd={d}/empty", "64", "{k}"], "initrd '{d}/empty' is empty"),
    ("initrd larger than guest RAM", ["--initrd={d}/initrd-big", "64", "{k}"], "guest RAM"),
    ("initrd larger than host memory", ["--initrd={d}/huge", "64", "{k}"], "too large"),
    ("disk missing", ["--block={d}/nope", "64", "{k}"], "does not exist"),
    ("disk is a directory", ["--block={d}/adir", "64", "{k}"], "not a regular file"),
    ("disk is a fifo", ["--block={d}/fifo", "64", "{k}"], "not a regular file"),
    ("disk flag unknown", ["--block={d}/disk,rw", "64", "{k}"], "unknown flag"),
    ("stats-json is a directory", ["--stats-json={d}/adir", "64", "{k}"], "is a directory"),
    ("stats-json ends in a slash", ["--stats-json={d}/new/", "64", "{k}"], "is a directory"),
    ("stats-json in a missing directory", ["--stats-json={d}/nope/s.json", "64", "{k}"], "cannot write into"),
    ("stats-json is a fifo", ["--stats-json={d}/fifo", "64", "{k}"], "not a regular file"),
    ("stats-json empty", ["--stats-json=", "64", "{k}"], "empty file name"),
    ("memory not a number", ["lots", "{k}"], "not a whole number"),
    ("memory zero", ["0", "{k}"], "must be positive"),
    ("memory absurd", ["99999999", "{k}"], "absurd"),
    ("queue size not a power of two", ["--queue-size=100", "64", "{k}"], "power of two"),
    ("queue size too large", ["--queue-size=65536", "64", "{k}"], "power of two"),
    ("block poll window negative", ["--blk-poll-us=-3", "64", "{k}"], "between 0"),
    ("event-idx neither on nor off", ["--event-idx=maybe", "64", "{k}"], "on or off"),
    ("indirect neither on nor off", ["--indirect=yes", "64", "{k}"], "on or off"),
    ("seg-max zero", ["--seg-max=0", "64", "{k}"], "at least 1"),
    ("blk-queues zero", ["--blk-queues=0", "64", "{k}"], "from 1 to 32"),
    ("blk-queues too many", ["--blk-queues=33", "64", "{k}"], "from 1 to 32"),
    ("blk-queues not a number", ["--blk-queues=two", "64", "{k}"], "not a whole number"),
    ("net-queues negative", ["--net-queues=-2", "64", "{k}"], "from 1 to 32"),
    ("net-queues with a plus", ["--net-queues=+2", "64", "{k}"], "not a whole number"),
    ("sweep of a bad queue count", ["bench", "sweep", "--param=blk-queues=1,0", "blk"], "from 1 to 32"),
    ("cpus zero", ["--cpus=0", "64", "{k}"], "at least one vCPU"),
    ("cpus negative", ["--cpus=-1", "64", "{k}"], "at least one vCPU"),
    ("cpus not a number", ["--cpus=two", "64", "{k}"], "not a whole number of vCPUs"),
    ("cpus empty", ["--cpus=", "64", "{k}"], "not a whole number of vCPUs"),
    ("seg-max beyond the queue", ["--queue-size=8", "--seg-max=7", "64", "{k}"], "queue size (8) - 2"),
    ("sweep of an unknown knob", ["bench", "sweep", "--param=speed=1,2", "blk"], "unknown knob"),
    ("sweep with a bad value", ["bench", "sweep", "--param=queue-size=16,17", "rng"], "power of two"),
    ("sweep of a benchmark without knobs", ["bench", "sweep", "--param=indirect=on,off", "vring"], "no device knobs"),
    ("sweep plot into a missing directory", ["bench", "sweep", "--param=indirect=on,off", "rng",
                                             "--plot={d}/nope/s.png"], "cannot write into"),
]


@pytest.mark.parametrize("name,args,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_nothing_created(files, name, args, words):
    d, k = files
    before = sorted(os.listdir(d))
    r = run([a.format(d=d, k=k) for a in args], cwd=d)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("lguest-jit: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert words.format(d=d, k=k) in lines[0], lines[0]
    assert sorted(os.listdir(d)) == before      # nothing created, not even the stats file
    assert r.stdout == ""


def test_cpus_beyond_what_kvm_or_the_mp_table_allows(files):
    """--cpus above KVM_CAP_MAX_VCPUS, or above the 255 APIC ids an MP table
    can name, is one line and exit 2."""
    from lguest_jit.hw.firmware import MAX_CPUS
    from lguest_jit.hw.hosts import kvm_max_vcpus
    top = kvm_max_vcpus()
    if top is None:
        pytest.skip("no /dev/kvm to ask for its vCPU limit")
    d, k = files
    cases = [(top + 1, f"at most {top} vCPUs per guest (KVM_CAP_MAX_VCPUS)")]
    if top > MAX_CPUS:
        cases.append((MAX_CPUS + 1, f"at most {MAX_CPUS} CPUs"))
    for n, words in cases:
        r = run([f"--cpus={n}", "64", k], cwd=d)
        lines = r.stderr.splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
        assert lines[0].startswith(f"lguest-jit: --cpus={n}: ") and words in lines[0], lines[0]


def test_more_vcpus_than_host_cpus_is_said_once(files):
    """Allowed (vCPUs take turns on the host's CPUs) and said once on
    stderr; the run then goes on (here to the kernel file's refusal)."""
    from lguest_jit.hw.firmware import MAX_CPUS
    from lguest_jit.hw.hosts import kvm_max_vcpus, usable_cpus
    top = kvm_max_vcpus()
    if top is None:
        pytest.skip("no /dev/kvm")
    n = usable_cpus() + 1
    if n > min(top, MAX_CPUS):
        pytest.skip(f"this host's limits leave no room above its {n - 1} CPUs")
    d, k = files
    r = run([f"--cpus={n}", "--hypervisor=kvm", "64", k], cwd=d)
    lines = r.stderr.splitlines()
    assert sum("more vCPUs than the" in line for line in lines) == 1, r.stderr
    assert f"the {n - 1} host CPUs" in r.stderr
    assert r.returncode == 2 and lines[-1].endswith("not a kernel: neither an ELF vmlinux nor a bzImage"), r.stderr
    assert "Traceback" not in r.stderr
