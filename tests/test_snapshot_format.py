"""The snapshot format as a trust boundary (issue 23, findings 6-8): the
layout is pinned to its version; an older snapshot, a forged one, and
every crafted state file this user's own key could seal are refused with
one line and exit status 2, never a traceback, never a host file the
command line would refuse."""
import base64
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess

import pytest

from lguest_jit import snapshot
from lguest_jit.hw.fields import describe
from lguest_jit.hw.kvm import kvm_available
from test_snapshot import TIMEOUT, _launcher, _take, reseal

# The layout of each format version, by fingerprint.  A changed layout with
# an unchanged VERSION fails here: bump snapshot.VERSION and add a line.
KNOWN_LAYOUTS = {2: "e46d39e03a02e7a1", 3: "7ede5d08e8983899", 4: "ef442d0e295b05c7", 5: "f7b26049bffdd24c"}


def test_the_layout_is_the_one_pinned_for_its_version():
    fingerprint = hashlib.sha256(describe(snapshot.schema()).encode()).hexdigest()[:16]
    assert KNOWN_LAYOUTS.get(snapshot.VERSION) == fingerprint, (
        f"the snapshot layout changed (now {fingerprint}): raise snapshot.VERSION and pin the new layout here")


def test_the_fingerprint_sees_a_renamed_or_retyped_field():
    from lguest_jit.hw import fields as F
    base = F.Record({"a": F.Int(0, 1), "b": F.List(F.Str(), 2)})
    for other in (F.Record({"a2": F.Int(0, 1), "b": F.List(F.Str(), 2)}),
                  F.Record({"a": F.Bool(), "b": F.List(F.Str(), 2)}),
                  F.Record({"a": F.Int(0, 1), "b": F.List(F.Int(0, 1), 2)}),
                  F.Record({"a": F.Int(0, 1)})):
        assert describe(other) != describe(base)


# -- the key ------------------------------------------------------------------------------

def test_the_key_is_made_once_0600_and_refused_when_others_can_read_it(tmp_path):
    path = tmp_path / "cache" / "snapshot.key"
    k = snapshot.key(str(path))
    assert len(k) == snapshot.KEY_BYTES and snapshot.key(str(path)) == k
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o640)
    with pytest.raises(snapshot.SnapshotError, match="accessible to others"):
        snapshot.key(str(path))
    os.chmod(path, 0o600)
    link = tmp_path / "link.key"
    link.symlink_to(path)
    with pytest.raises(snapshot.SnapshotError, match="symbolic link"):
        snapshot.key(str(link))
    path.write_bytes(b"short")
    with pytest.raises(snapshot.SnapshotError, match="damaged"):
        snapshot.key(str(path))


def test_the_ram_digest_of_a_sparse_file_is_that_of_the_memory(tmp_path):
    import numpy as np
    mem = np.zeros(64 * 4096, np.uint8)
    mem[5 * 4096 + 7] = 1
    mem[40 * 4096:42 * 4096] = 0xAB
    sparse, full = tmp_path / "sparse", tmp_path / "full"
    with open(sparse, "wb") as f:
        f.truncate(mem.size)
        f.seek(5 * 4096)
        f.write(mem[5 * 4096:6 * 4096].tobytes())
        f.seek(40 * 4096)
        f.write(mem[40 * 4096:42 * 4096].tobytes())
    full.write_bytes(mem.tobytes())          # the zeros written out: digests alike
    want = snapshot.memory_digest(mem)
    for p in (sparse, full):
        fd = os.open(p, os.O_RDONLY)
        try:
            assert snapshot.file_digest(fd, mem.size) == want
        finally:
            os.close(fd)
    mem[63 * 4096] = 2
    assert snapshot.memory_digest(mem) != want


# -- restoring crafted snapshots (KVM) -------------------------------------------------------

needs_kvm = pytest.mark.skipif(kvm_available() is not None, reason=f"KVM unusable: {kvm_available()}")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("format")
    disk = tmp / "disk.img"
    disk.write_bytes(b"\xab" * 65536)
    where, out, err = _take(tmp, extra=(f"--block={disk}", "--rng"))
    return where, disk


def _copy(base, dst):
    """A copy of the base snapshot: its RAM file hard-linked (never written
    here), its state file copied."""
    dst.mkdir()
    os.link(base[0] / "ram", dst / "ram")
    shutil.copyfile(base[0] / "state.json", dst / "state.json")
    doc = json.loads((dst / "state.json").read_text())
    return doc, json.loads(doc["body"])


def _restore(where):
    return subprocess.run(_launcher("restore", str(where)), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=TIMEOUT, env={**os.environ, "LGUEST_JIT_SERVER": "off"})


def _one_line_refusal(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith("lguest-jit: ") and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stdout == ""


def _blob(n, fill=0xFF):
    return base64.b64encode(bytes([fill]) * n).decode()


def _setitem(path, value):
    def do(body):
        node = body
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return do


def _delitem(path):
    def do(body):
        node = body
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
    return do


def _nest(n):
    return "[" * n + "]" * n


# The issue's 31 crafted state files that gave tracebacks, in this format:
# (name, change to the body (sealed again with this user's key) or to the
# raw file, words of the refusal).
BLOCK = 1      # bus devices: console, block, rng
CRAFTED = [
    ("body is a list", ("body-text", "[]"), "expected an object"),
    ("body is a number", ("body-text", "5"), "expected an object"),
    ("no disks", _delitem(["disks"]), "disks: missing"),
    ("no devices", _delitem(["machine", "devices"]), "devices: missing"),
    ("no kvm", _delitem(["kvm"]), "kvm: missing"),
    ("disk without inode", _delitem(["disks", 0, "inode"]), "inode: missing"),
    ("mem_bytes a float", _setitem(["machine", "mem_bytes"], 64.0 * 2**20), "mem_bytes: expected a whole number"),
    ("disks a number", _setitem(["disks"], 5), "disks: expected a list"),
    ("queue_size a string", _setitem(["machine", "knobs", "queue_size"], "x"), "queue_size: expected a whole"),
    ("cpuid a number", _setitem(["cpuid"], 5), "cpuid: expected a list"),
    ("uart a string", _setitem(["uart"], "x"), "uart: expected an object"),
    ("queue_size 3", _setitem(["machine", "knobs", "queue_size"], 3), "queue_size: 3 is outside"),
    ("queue_size 2**30", _setitem(["machine", "knobs", "queue_size"], 2**30), "is outside"),
    ("short regs blob", _setitem(["kvm", "classes", "regs"], _blob(10)), "regs: 10 bytes, expected 144"),
    ("mem not whole MiB", _setitem(["machine", "mem_bytes"], (64 << 20) + 4096), "not a whole number of MiB"),
    ("mem under 1 MiB", _setitem(["machine", "mem_bytes"], 4096), "mem_bytes: 4096 is outside"),
    ("mem over the MMIO window", _setitem(["machine", "mem_bytes"], 3600 << 20), "overlaps the PCI MMIO window"),
    ("garbage sregs", _setitem(["kvm", "classes", "sregs"], _blob(312)), "KVM refused"),
    ("garbage ioapic", _setitem(["kvm", "classes", "ioapic"], _blob(520)), "snapshot"),
    ("garbage xsave", _setitem(["kvm", "classes", "xsave"], _blob(4096)), "KVM refused"),
    ("short cpuid entry", _setitem(["cpuid", 0], [1, 2, 3]), "cpuid[0]: expected a list of 7"),
    ("2**70 in a register", _setitem(["bus", "devices", BLOCK, "registers", "status"], 2**70), "is outside"),
    ("2**70 in an MSI-X entry", _setitem(["bus", "devices", BLOCK, "msix", 0, "data"], 2**70), "is outside"),
    ("deep nesting in the body", ("body-text", _nest(100_000)), "nests deeper"),
    ("deep nesting in the file", ("file-text", _nest(200_000)), "nests deeper"),
    ("8 GiB sparse state file", ("file-size", 8 << 30), "more than a snapshot's"),
    ("a device that is a string", _setitem(["machine", "devices", 1], "x"), "kind must be one of"),
    ("an MSR number that is not one", _setitem(["kvm", "msrs", "x"], 1), "is not a number"),
    ("a negative counter", _setitem(["bus", "devices", BLOCK, "queues", 0, "registers", "size"], -1),
     "is outside"),
    ("an unknown device kind", _setitem(["machine", "devices", 1, "kind"], "gpu"), "kind must be one of"),
    ("uart register out of range", _setitem(["uart", "ier"], 0x10), "uart.ier: 16 is outside"),
    ("an MTU that is not one", _setitem(["machine", "knobs", "net_mtu"], "12"), "--net-mtu=12: must be"),
    ("an MTU that is no number", _setitem(["machine", "knobs", "net_mtu"], "x"), "--net-mtu=x: must be"),
]


def _craft(base, dst, change):
    doc, body = _copy(base, dst)
    state = dst / "state.json"
    if isinstance(change, tuple):
        how, what = change
        if how == "body-text":
            doc["body"] = what
            doc["sha256"] = hashlib.sha256(what.encode()).hexdigest()
            fd = os.open(dst / "ram", os.O_RDONLY)
            try:
                digest = snapshot.file_digest(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            doc["hmac"] = snapshot.sign(snapshot.key(), what.encode(), digest)
            state.write_text(json.dumps(doc))
        elif how == "file-text":
            state.write_text(what)
        elif how == "file-size":
            with open(state, "r+b") as f:
                f.truncate(what)
    else:
        change(body)
        reseal(dst, doc, body)
    return dst


@needs_kvm
@pytest.mark.parametrize("name,change,words", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_a_crafted_state_file_is_refused_in_one_line(base, tmp_path, name, change, words):
    r = _restore(_craft(base, tmp_path / "crafted", change))
    _one_line_refusal(r)
    assert words in r.stderr, r.stderr


def test_the_issue_lists_31_crafted_files():
    # ... and two more for --net-mtu, a knob that came after it.
    assert len(CRAFTED) == 31 + 2


@needs_kvm
def test_a_snapshot_of_format_1_is_refused_by_its_version(base, tmp_path):
    # What the launcher wrote before this format: arrays as tagged base64, no HMAC.
    where = tmp_path / "old"
    shutil.copytree(base[0], where)
    body = json.dumps({"machine": {"mem_bytes": 64 << 20, "blocks": [], "nets": [], "rng": False},
                       "bus": {"conf": {"$array": "AAAAAAAAAAA=", "dtype": "<i8", "shape": [1]}}}, sort_keys=True)
    (where / "state.json").write_text(json.dumps({"format": "lguest-jit-snapshot", "version": 1,
                                                  "sha256": hashlib.sha256(body.encode()).hexdigest(),
                                                  "body": body}))
    r = _restore(where)
    _one_line_refusal(r)
    assert f"has format version 1; this lguest-jit reads version {snapshot.VERSION}" in r.stderr


@needs_kvm
@pytest.mark.parametrize("target", ["/dev/null", "a directory"])
def test_a_snapshot_names_only_disks_the_command_line_would_take(base, tmp_path, target):
    """Finding 6: sealed or not, a disk path goes through --block's checks;
    a forged one is refused before any disk is looked at."""
    if target == "a directory":
        target = str(tmp_path)
    doc, body = _copy(base, tmp_path / "forged")
    body["machine"]["devices"][1]["options"]["path"] = target
    ident = snapshot.disk_identity(target) if os.path.exists(target) else body["disks"][0]
    body["disks"][0] = {**ident, "path": target}
    # Not sealed with this user's key: refused whatever it names.
    doc["body"] = json.dumps(body, sort_keys=True)
    doc["sha256"] = hashlib.sha256(doc["body"].encode()).hexdigest()
    (tmp_path / "forged" / "state.json").write_text(json.dumps(doc))
    r = _restore(tmp_path / "forged")
    _one_line_refusal(r)
    assert "authentication failed" in r.stderr
    # Sealed by this user: still the command line's checks.
    reseal(tmp_path / "forged", doc, body)
    r = _restore(tmp_path / "forged")
    _one_line_refusal(r)
    assert "is not a regular file" in r.stderr


@needs_kvm
@pytest.mark.parametrize("argv,words", [
    (["--stats-json={out}", "64", "{kernel}"], "--stats-json, which only the command line may give"),
    (["--snapshot={out}", "--force", "64", "{kernel}"], "--snapshot, which only"),
    (["bench", "vring"], "not a plain run"),
    (["--queue-size=3", "64", "{kernel}"], "--queue-size=3: must be a power of two"),
    (["--frobnicate", "64", "{kernel}"], "not a launcher command line"),
])
def test_a_snapshots_reboot_arguments_go_through_the_command_lines_checks(base, tmp_path, argv, words):
    """Finding 7: the arguments a reboot re-executes are parsed and checked
    at restore, as the command line's own."""
    doc, body = _copy(base, tmp_path / "argv")
    out = tmp_path / "victim"
    out.write_text("keep")
    body["boot_argv"] = [a.format(out=out, kernel=base[0] / "ram") for a in argv]
    reseal(tmp_path / "argv", doc, body)
    r = _restore(tmp_path / "argv")
    _one_line_refusal(r)
    assert words in r.stderr, r.stderr
    assert out.read_text() == "keep"


def test_a_snapshot_file_of_another_user_or_writable_by_others_is_refused(tmp_path):
    where = tmp_path / "snap"
    where.mkdir()
    (where / "state.json").write_text("{}")
    (where / "ram").write_bytes(b"")
    os.chmod(where / "state.json", 0o666)
    with pytest.raises(snapshot.SnapshotError, match="not yours alone to write"):
        snapshot.read(str(where), b"k" * 32)
    os.chmod(where / "state.json", 0o600)
    (where / "ram").unlink()
    (where / "ram").symlink_to(where / "state.json")
    with pytest.raises(snapshot.SnapshotError, match="not a regular file"):
        snapshot.read(str(where), b"k" * 32)


# -- mutation: many crafted files, each refused in one line or restored ---------------------

MUTATIONS = int(os.environ.get("LGUEST_JIT_SNAPSHOT_MUTATIONS", "150"))
ODD_VALUES = [-1, 0, 1, 3, 255, 2**16, 2**31, 2**32, 2**63, 2**64, 2**70, 1.5, float("inf"), "x", "", None, True,
              [], {}, [0] * 8, {"kind": "rng"}]


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, path + (k,))
        if not node:
            yield path
    elif isinstance(node, list):
        for i, v in enumerate(node[:4]):             # the first few of each list
            yield from _leaves(v, path + (i,))
        if not node:
            yield path
    else:
        yield path


def _mutate(body, rng):
    paths = [p for p in _leaves(body) if p]
    path = rng.choice(paths)
    parent = body
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    how = rng.random()
    if how < 0.1 and isinstance(parent, dict):
        del parent[last]
    elif how < 0.15 and isinstance(parent, dict):
        parent["unexpected"] = 1
    elif how < 0.3 and isinstance(parent[last], str):
        s = parent[last]
        parent[last] = s[:rng.randrange(len(s) + 1)] if s else "AAAA"
    elif how < 0.45 and type(parent[last]) is int:
        parent[last] = parent[last] + rng.choice([-1, 1, 1 << 16, 1 << 32, -(1 << 40)])
    else:
        parent[last] = json.loads(json.dumps(rng.choice(ODD_VALUES), allow_nan=True))
    return "/".join(map(str, path))


@needs_kvm
def test_mutated_state_files_are_each_refused_in_one_line_or_restored(base, tmp_path):
    """In process: read and build the restored machine (not run it); any
    exception but the launcher's one-line refusal fails the test."""
    from docopt import docopt

    from lguest_jit import main
    from lguest_jit.machine import MachineError
    rng = random.Random(23)
    refused = restored = 0
    for i in range(MUTATIONS):
        where = tmp_path / f"m{i}"
        doc, body = _copy(base, where)
        what = _mutate(body, rng)
        reseal(where, doc, body)
        args = docopt(main.__doc__, argv=["restore", str(where)])
        try:
            launcher = main.Launcher(main.RestoreConfig(args))
            try:
                launcher.build()
            finally:
                launcher.close()
            restored += 1
        except (main.UsageError, MachineError) as exc:
            assert "\n" not in str(exc) and str(exc), (what, str(exc))
            refused += 1
        shutil.rmtree(where)
    print(f"\nsnapshot mutations: {MUTATIONS} crafted, {refused} refused in one line, {restored} restored")
    assert refused + restored == MUTATIONS and refused > MUTATIONS // 2
