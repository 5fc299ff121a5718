"""Snapshot and restore through the command line, with a tiny guest: a
snapshot taken in the middle of a loop restores into a guest that finishes
the same loop; every damaged or mismatched snapshot is refused with one
line and exit status 2, before any device is created."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from guestflag import read_until, read_within, release, spin_until_released, with_flag
from lguest_jit.hw.kvm import kvm_available
from lguest_jit.hw.tinyguest import RAX, RDX, Asm
from test_cli_run import _elf64

pytestmark = pytest.mark.skipif(kvm_available() is not None, reason=f"KVM unusable: {kvm_available()}")

LOAD = 0x100000
FLAG = LOAD + 0x400
MEM_MB = 64
# Turns of the counting loop between two looks at the flag: the guest waits
# for the test's flag, not for time, so this only needs to be long enough
# for a snapshot to catch the registers mid-count.
LOOPS = 4000
TIMEOUT = 300


def _guest() -> bytes:
    """'R' on the UART, a counting loop until the test sets FLAG, 'D', halt."""
    a = Asm(LOAD).mov_imm32(RDX, 0x3F8).mov_imm32(RAX, ord("R")).out(1)
    spin_until_released(a, FLAG, LOOPS)
    a.mov_imm32(RAX, ord("D")).out(1).cli().hlt()
    return with_flag(bytes(a))


def _launcher(*args, **kw):
    return [sys.executable, "-m", "lguest_jit.main", *args]


def _start(*args):
    return subprocess.Popen(_launcher(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _released(*args, text=False):
    """Run the launcher with ``args``, setting the guest's flag as soon as
    its RAM is there (a launcher that refuses never gets that far):
    (status, stdout, stderr)."""
    proc = _start(*args)
    try:
        release(proc, FLAG, MEM_MB << 20, TIMEOUT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    return proc.returncode, (out.decode() if text else out), (err.decode() if text else err)


def _restore(*args, text=False):
    return _released("restore", *args, text=text)


def _first_byte(proc) -> bytes:
    """The guest's 'R', or fail (with the launcher's stderr) if it never comes."""
    first = read_within(proc.stdout, 1, TIMEOUT)
    if first != b"R":
        proc.kill()
        pytest.fail(f"the guest said {first!r} instead of 'R': {proc.stderr.read().decode()[-2000:]}")
    return first


def _take(tmp_path, name="snap", extra=()):
    """Boot the tiny guest with --snapshot, snapshot it on SIGUSR2 as soon
    as it printed 'R' (it then waits for a flag it never gets), and return
    (snapshot dir, stdout, stderr)."""
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(_elf64(_guest(), LOAD))
    where = tmp_path / name
    proc = _start(f"--snapshot={where}", "--snapshot-exit", *extra, str(MEM_MB), str(kernel))
    try:
        first = _first_byte(proc)
        proc.send_signal(signal.SIGUSR2)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    return where, first + out, err.decode()


@pytest.fixture(scope="module")
def taken(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("snapshot")
    disk = tmp / "disk.img"
    disk.write_bytes(b"\xab" * 65536)
    where, out, err = _take(tmp, extra=(f"--block={disk}",))
    return where, disk, out, err


def test_a_snapshot_mid_loop_restores_into_a_guest_that_finishes_it(taken, tmp_path):
    where, disk, out, err = taken
    # The snapshot was taken inside the loop: the first guest never said 'D'.
    assert out == b"R", (out, err)
    assert "snapshot written to" in err
    body = json.loads(json.loads((where / "state.json").read_text())["body"])
    assert body["machine"]["cpus"] == 1          # --cpus, recorded for restore
    ram = os.stat(where / "ram")
    assert ram.st_size == 64 << 20 and ram.st_blocks * 512 < ram.st_size // 4     # sparse
    copy = tmp_path / "copy"
    shutil.copytree(where, copy)
    for _ in range(2):      # twice from one snapshot: a restore changes nothing in it
        status, out, err = _restore(str(copy))
        assert status == 0, err
        assert out == b"D", out                    # carried on mid-loop: no second 'R'


SECRET = bytes(range(32))      # a key for snapshots this test writes and never restores


# damage case -> (CPUID function, index, signature field: 3..6 = eax..edx, bit flipped)
CPUID_FLIPS = {
    "cpuid": (0, 0, 3, 1),
    "cpuid leaf 1 ecx": (1, 0, 5, 1 << 0),        # SSE3
    "cpuid leaf 1 edx": (1, 0, 6, 1 << 25),       # SSE
    "cpuid leaf 7 ebx": (7, 0, 4, 1 << 3),        # BMI1
}


def reseal(where, doc, body):
    """Write ``body`` into the snapshot at ``where`` as this user's launcher
    would: checksum and HMAC (this user's key, over the RAM file's digest)."""
    from lguest_jit import snapshot
    doc["body"] = json.dumps(body, sort_keys=True)
    doc["sha256"] = hashlib.sha256(doc["body"].encode()).hexdigest()
    fd = os.open(where / "ram", os.O_RDONLY)
    try:
        digest = snapshot.file_digest(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    doc["hmac"] = snapshot.sign(snapshot.key(), doc["body"].encode(), digest)
    (where / "state.json").write_text(json.dumps(doc))


def _damage(src, dst, how):
    shutil.copytree(src, dst)
    state = dst / "state.json"
    doc = json.loads(state.read_text())
    body = json.loads(doc["body"])
    if how == "truncated":
        data = state.read_bytes()
        state.write_bytes(data[:len(data) // 2])
    elif how == "not ours":
        state.write_text(json.dumps({"hello": "world"}))
    elif how == "version":
        doc["version"] = 99
        state.write_text(json.dumps(doc))
    elif how == "checksum":
        doc["body"] = doc["body"].replace('"strict": false', '"strict": true')
        state.write_text(json.dumps(doc))
    elif how == "not authentic":       # a consistent file, not sealed with this user's key
        body["machine"]["strict"] = True
        doc["body"] = json.dumps(body, sort_keys=True)
        doc["sha256"] = hashlib.sha256(doc["body"].encode()).hexdigest()
        state.write_text(json.dumps(doc))
    elif how == "ram changed":
        with open(dst / "ram", "r+b") as f:
            f.seek(1 << 20)
            f.write(b"\x90" * 16)
    elif how in CPUID_FLIPS:           # sealed again by this user: the host check itself
        function, index, field, bit = CPUID_FLIPS[how]
        leaf = next(e for e in body["cpuid"] if e[:2] == [function, index])
        leaf[field] ^= bit
        reseal(dst, doc, body)
    elif how in ("cpus zero", "cpus text"):
        body["machine"]["cpus"] = 0 if how == "cpus zero" else "2"
        reseal(dst, doc, body)
    elif how == "ram size":            # sealed again by this user: the size check itself
        os.truncate(dst / "ram", 4096)
        reseal(dst, doc, body)
    elif how == "ram truncated":
        os.truncate(dst / "ram", 4096)
    elif how == "no ram":
        os.unlink(dst / "ram")
    elif how == "no state":
        os.unlink(state)
    return dst


BAD = [
    ("truncated", "state.json is damaged"),
    ("not ours", "not an lguest-jit snapshot"),
    ("version", "format version 99"),
    ("checksum", "checksum mismatch"),
    ("not authentic", "authentication failed"),
    ("ram changed", "authentication failed"),
    ("cpuid", "another kind of host"),
    ("cpus zero", "state.machine.cpus: 0 is outside 1..255"),
    ("cpus text", "state.machine.cpus: expected a whole number, got str '2'"),
    ("cpuid leaf 1 ecx", "another kind of host: CPUID leaf 0x1.0 differs from the snapshot's host (ecx"),
    ("cpuid leaf 1 edx", "another kind of host: CPUID leaf 0x1.0 differs from the snapshot's host (edx"),
    ("cpuid leaf 7 ebx", "another kind of host: CPUID leaf 0x7.0 differs from the snapshot's host (ebx"),
    ("ram size", "RAM file holds 4096 bytes"),
    ("ram truncated", "authentication failed"),
    ("no ram", "ram is missing"),
    ("no state", "state.json is missing"),
]


@pytest.mark.parametrize("how,message", BAD, ids=[b[0] for b in BAD])
def test_a_damaged_snapshot_is_refused_with_one_line(taken, tmp_path, how, message):
    where = _damage(taken[0], tmp_path / "bad", how)
    status, out, err = _restore(str(where), text=True)
    assert status == 2, err
    assert err.startswith("lguest-jit: ") and err.count("\n") == 1, err
    assert message in err
    assert out == ""


def test_the_cpuid_signature_keeps_every_feature_bit_but_the_momentary_ones():
    """Restore compares signatures: a signature that dropped leaf 1's or
    leaf 7's feature bits would let a snapshot move to a host without them.
    A vCPU with one feature bit flipped must differ, naming the leaf; only
    the APIC ID, OSXSAVE and OSPKE (they describe the moment) are masked."""
    from collections import namedtuple

    from lguest_jit import snapshot
    Entry = namedtuple("Entry", "function index flags eax ebx ecx edx")
    ones = 0xFFFFFFFF
    host = [Entry(0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69), Entry(1, 0, 0, ones, ones, ones, ones),
            Entry(7, 0, 1, ones, ones, ones, ones)]
    sig = {(e[0], e[1]): e[3:] for e in snapshot.cpuid_signature(host)}
    assert sig[1, 0] == [ones, 0x00FFFFFF, ones & ~(1 << 27), ones]
    assert sig[7, 0] == [ones, ones, ones & ~(1 << 4), ones]
    for function, reg, bit in [(1, "ecx", 0), (1, "ecx", 28), (1, "edx", 0), (1, "edx", 26),
                               (7, "ebx", 3), (7, "ecx", 1), (7, "edx", 4)]:
        other = [e._replace(**{reg: getattr(e, reg) ^ (1 << bit)}) if e.function == function else e for e in host]
        why = snapshot.cpuid_mismatch(snapshot.cpuid_signature(host), snapshot.cpuid_signature(other))
        assert why is not None and why.startswith(f"CPUID leaf {function:#x}.0 differs") and f"({reg} " in why, \
            (function, reg, bit, why)
    moment = [e._replace(ebx=e.ebx & 0x00FFFFFF, ecx=e.ecx & ~(1 << 27)) if e.function == 1 else e for e in host]
    assert snapshot.cpuid_mismatch(snapshot.cpuid_signature(host), snapshot.cpuid_signature(moment)) is None


def test_a_missing_snapshot_is_refused(tmp_path):
    r = subprocess.run(_launcher("restore", str(tmp_path / "nowhere")), capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr and r.stderr.count("\n") == 1


def test_a_disk_changed_since_the_snapshot_is_refused_unless_forced(taken, tmp_path):
    where, disk, _, _ = taken
    saved = disk.read_bytes()
    st = os.stat(disk)
    try:
        with open(disk, "r+b") as f:
            f.write(b"changed")
        os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        status, out, err = _restore(str(where), text=True)
        assert status == 2 and "was modified since the snapshot" in err, err
        assert "--force" in err
        status, out, err = _restore("--force", str(where), text=True)
        assert status == 0 and out == "D", err
    finally:
        disk.write_bytes(saved)
        os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("args,message", [
    (["--snapshot-on=x"], "need --snapshot=DIR"),
    (["--snapshot-exit"], "need --snapshot=DIR"),
    (["--snapshot={dir}", "--snapshot-on=("], "bad regular expression"),
    (["--snapshot={dir}", "--snapshot-on=a{{99999999999}}"], "bad regular expression"),   # OverflowError
    (["--snapshot={dir}", "--snapshot-on=" + "(" * 50000], "bad regular expression"),     # RecursionError
    (["--snapshot={full}"], "exists and is not empty"),
    (["--snapshot={file}"], "exists and is not a directory"),
    # --force replaces a snapshot of ours, nothing else: not a source tree
    # (the directory the launcher runs in, too), not a directory that only
    # looks like one, not a symbolic link.
    (["--snapshot={full}", "--force"], "is not a snapshot (holds 'something'"),
    (["--snapshot=.", "--force"], "is not a snapshot (holds 'something'"),
    (["--snapshot={fake}", "--force"], "not an lguest-jit snapshot's"),
    (["--snapshot={link}", "--force"], "is a symbolic link"),
])
def test_bad_snapshot_options_are_refused_before_the_guest_starts(tmp_path, args, message):
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("keep me")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "state.json").write_text('{"hello": "world"}')
    (fake / "ram").write_text("keep me")
    (tmp_path / "link").symlink_to(full)
    (tmp_path / "file").write_text("")
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(_elf64(_guest(), LOAD))
    args = [a.format(dir=tmp_path / "new", full=full, file=tmp_path / "file", fake=fake, link=tmp_path / "link")
            for a in args]
    r = subprocess.run(_launcher(*args, str(MEM_MB), str(kernel)), stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=TIMEOUT, cwd=full)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("lguest-jit: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert (full / "something").read_text() == "keep me"      # never overwritten unless asked
    assert (fake / "ram").read_text() == "keep me"
    assert not (tmp_path / "new").exists()


def test_force_replaces_an_existing_snapshot(taken, tmp_path):
    old = tmp_path / "snap"
    shutil.copytree(taken[0], old)
    before = (old / "state.json").read_bytes()
    where, out, err = _take(tmp_path, extra=("--force",))
    assert where == old and out == b"R", err
    assert sorted(os.listdir(where)) == ["ram", "state.json"]
    assert (old / "state.json").read_bytes() != before        # a new snapshot, not the old one kept


def test_snapshot_write_replaces_only_a_snapshot(tmp_path):
    """The check is made again when the snapshot is written: a directory
    that stopped being a snapshot since the arguments were checked is left
    alone, and the write fails."""
    from lguest_jit import snapshot
    from lguest_jit.hw.memory import GuestMemory
    gm = GuestMemory(1 << 20)
    try:
        where = tmp_path / "snap"
        snapshot.write(str(where), gm, {"machine": {"mem_bytes": gm.size}}, SECRET)
        assert snapshot.not_a_snapshot(str(where)) is None
        snapshot.write(str(where), gm, {"machine": {"mem_bytes": gm.size}}, SECRET)       # ours: replaced
        (where / "notes.txt").write_text("mine")
        with pytest.raises(snapshot.SnapshotError, match="no longer a snapshot"):
            snapshot.write(str(where), gm, {"machine": {"mem_bytes": gm.size}}, SECRET)
        assert (where / "notes.txt").read_text() == "mine"
        assert [p.name for p in tmp_path.iterdir()] == ["snap"]           # no partial directory left
    finally:
        gm.close()


def test_a_failed_snapshot_makes_snapshot_exit_fail(tmp_path):
    """--snapshot-exit whose snapshot could not be written exits non-zero
    (here its parent directory is gone when the snapshot is taken)."""
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(_elf64(_guest(), LOAD))
    parent = tmp_path / "parent"
    parent.mkdir()
    proc = subprocess.Popen(_launcher(f"--snapshot={parent / 'snap'}", "--snapshot-exit", "64", str(kernel)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(1) == b"R", proc.stderr.read()
        parent.rmdir()
        proc.send_signal(signal.SIGUSR2)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert b"snapshot to" in err and b"failed" in err and b"Traceback" not in err, err
    assert not parent.exists()


def test_restore_refuses_options_the_snapshot_fixes(taken):
    r = subprocess.run(_launcher("restore", "--rng", str(taken[0])), capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 2 and "(--rng given)" in r.stderr and r.stderr.count("\n") == 1, r.stderr


# ---------------------------------------------------------------- device state, in process (no KVM needed)

def _rng_machine(gm, add=True):
    from lguest_jit import pci
    from lguest_jit.devices import Rng
    from lguest_jit.testing import VirtioPciDriver
    bus = pci.Bus(gm)
    dev = Rng()
    if add:                     # VirtioPciDriver.attach adds it itself
        bus.add_device(dev)
    return bus, dev, VirtioPciDriver


@pytest.fixture
def rng_state():
    """A bus whose rng served two requests, paused; its state."""
    from lguest_jit.hw.memory import GuestMemory
    gm = GuestMemory(8 << 20)
    bus, dev, Driver = _rng_machine(gm, add=False)
    drv = Driver.attach(bus, gm, dev)
    for _ in range(2):
        drv.queues[0].add(in_=[32])
        drv.kick(0)
        assert drv.wait_used(0, timeout=120)     # the first may wait for its kernel to compile
    dev.pause()
    st = bus.save_state()
    yield gm, bus, dev, drv, st
    bus.close()
    gm.close()


def test_device_state_round_trips_and_the_restored_device_serves_on(rng_state):
    from lguest_jit import vring
    from lguest_jit.hw.memory import GuestMemory
    gm, bus, dev, drv, st = rng_state
    gm2 = GuestMemory(gm.size)
    gm2.mem[:] = gm.mem
    bus2, dev2, _ = _rng_machine(gm2)
    try:
        bus2.load_state(st)
        q1, q2 = bus.devices[0].queues[0], bus2.devices[0].queues[0]
        for f in (vring.Q_SIZE, vring.Q_DESC, vring.Q_AVAIL, vring.Q_USED, vring.Q_LAST_AVAIL, vring.Q_USED_IDX):
            assert q2[f] == q1[f], f
        assert dev2.running                                     # the driver had it at DRIVER_OK
        # The same driver, now talking to the restored bus, gets a third answer.
        drv.bus, drv.gm = bus2, gm2
        for q in drv.queues:
            q.gm, q.mem = gm2, gm2.mem
        drv.queues[0].add(in_=[32])
        drv.kick(0)
        assert drv.wait_used(0, timeout=120)     # the first may wait for its kernel to compile
        assert q2[vring.Q_N_CHAINS] == q1[vring.Q_N_CHAINS] + 1
    finally:
        bus2.close()
        gm2.close()


def _tamper(st, how):
    import base64
    import copy
    st = copy.deepcopy(st)
    d = st["devices"][0]
    if how == "ring outside RAM":
        d["queues"][0]["ring"]["used"] = 1 << 40
    elif how == "negative index":
        d["queues"][0]["ring"]["chains"] = -5
    elif how == "queue count":
        d["registers"]["num_queues"] = 400
    elif how == "queue select":
        d["registers"]["queue_select"] = -1
    elif how == "read-only config space":
        cfg = bytearray(base64.b64decode(st["config_space"][1]))
        cfg[0] ^= 0xFF                                   # the vendor ID
        st["config_space"][1] = base64.b64encode(bytes(cfg)).decode()
    elif how == "shape":
        d["config"] = base64.b64encode(base64.b64decode(d["config"]) + b"\0").decode()
    elif how == "unknown field":
        d["registers"]["extra"] = 1
    elif how == "wrong type":
        d["queues"][0]["ring"]["size"] = "x"
    return st


@pytest.mark.parametrize("how,message", [
    ("ring outside RAM", "used ring lies outside guest RAM"),
    ("negative index", "chains: -5 is outside"),
    ("queue count", "other queues, features or config"),
    ("queue select", "queue_select: -1 is outside"),
    ("read-only config space", "built for other devices"),
    ("shape", "other queues, features or config"),
    ("unknown field", "unknown field 'extra'"),
    ("wrong type", "size: expected a whole number"),
])
def test_a_crafted_device_state_is_refused(rng_state, how, message):
    from lguest_jit.hw.memory import GuestMemory
    gm, bus, dev, drv, st = rng_state
    gm2 = GuestMemory(gm.size)
    bus2, dev2, _ = _rng_machine(gm2)
    try:
        with pytest.raises(ValueError, match=message):
            bus2.load_state(_tamper(st, how))
        assert not dev2.running
    finally:
        bus2.close()
        gm2.close()


def test_a_run_that_never_snapshots_says_so_and_sigusr2_without_snapshot_is_harmless(tmp_path):
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(_elf64(_guest(), LOAD))
    # --snapshot-on that never matches (the tiny guest has no virtio console output)
    status, out, err = _released(f"--snapshot={tmp_path / 'never'}", "--snapshot-on=NEVER", str(MEM_MB),
                                 str(kernel), text=True)
    assert status == 0 and out == "RD", err
    assert "no snapshot was taken" in err and "never matched" in err
    assert not (tmp_path / "never").exists()
    # SIGUSR2 to a launcher started without --snapshot: one line, the guest
    # (still waiting for its flag) carries on once released
    proc = _start(str(MEM_MB), str(kernel))
    try:
        _first_byte(proc)
        proc.send_signal(signal.SIGUSR2)
        said = read_until(proc.stderr, b"SIGUSR2 ignored", TIMEOUT)
        assert b"SIGUSR2 ignored" in said, said
        assert release(proc, FLAG, MEM_MB << 20, TIMEOUT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out == b"D", said + err
