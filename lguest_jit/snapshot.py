"""Snapshots of a running guest: what is written, and the checks on reading.

A snapshot is a directory:

``ram``
    Guest RAM, a sparse file (all-zero pages are holes).  A restore maps it
    copy-on-write (``GuestMemory(image=...)``): nothing is read up front,
    and every restore of one snapshot shares its pages in the page cache.
``state.json``
    Everything else, versioned: the machine's shape (memory size, devices
    and their backing files), the KVM state of the VM and its vCPU
    (``hw.vmstate``: registers, FPU/XSAVE, MSRs, LAPIC, events, irqchips,
    PIT, clock), the CPUID the vCPU had, PCI config space and every
    transport's registers and queues, the UART and CMOS, and a SHA-256 of
    its own body so a damaged file is refused rather than half-restored.

Reading checks everything that can be checked without creating a device;
a failure is a :class:`SnapshotError` with one line for the user.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import time

FORMAT = "lguest-jit-snapshot"
VERSION = 1
STATE = "state.json"
RAM = "ram"


class SnapshotError(Exception):
    """A snapshot that cannot be written or restored: one line, exit 2."""


# -- arrays and blobs in JSON -------------------------------------------------------------


def pack(value):
    """JSON-able form of ``value``: numpy arrays and bytes become tagged
    base64, containers are walked."""
    import numpy as np
    if isinstance(value, np.ndarray):
        return {"$array": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode(),
                "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {str(k): pack(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [pack(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    return value


def unpack(value):
    import numpy as np
    if isinstance(value, dict):
        if "$array" in value:
            raw = base64.b64decode(value["$array"], validate=True)
            arr = np.frombuffer(raw, dtype=np.dtype(value["dtype"])).copy()
            return arr.reshape(value["shape"])
        if "$bytes" in value:
            return base64.b64decode(value["$bytes"], validate=True)
        return {k: unpack(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unpack(v) for v in value]
    return value


# -- disks --------------------------------------------------------------------------------


def disk_identity(path: str) -> dict:
    """What says a disk file is the one the guest's page cache matches."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "inode": st.st_ino, "device": st.st_dev,
            "mtime_ns": st.st_mtime_ns}


def disk_changed(saved: dict) -> str | None:
    """None when the disk is as it was at snapshot time, else what changed."""
    path = saved["path"]
    try:
        now = disk_identity(path)
    except OSError as e:
        return f"disk {path!r} cannot be opened: {e.strerror}"
    for key, what in (("inode", "is another file (inode)"), ("device", "is on another file system"),
                      ("size", "changed size"), ("mtime_ns", "was modified")):
        if now[key] != saved[key]:
            return f"disk {path!r} {what} since the snapshot"
    return None


# -- writing ------------------------------------------------------------------------------


# Every file a snapshot directory holds: --force replaces a directory only
# when it holds nothing else (and its state file is ours).
SNAPSHOT_FILES = (STATE, RAM)
_OUR_HEAD = re.compile(rb'\s*\{\s*"format"\s*:\s*"' + FORMAT.encode() + rb'"')


def not_a_snapshot(path: str) -> str | None:
    """None when directory ``path`` is empty or one of our snapshots (only
    our files, a state file that starts as ours: read no further than its
    first bytes), else what it is instead: what --force may replace."""
    try:
        names = os.listdir(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not names:
        return None
    strangers = sorted(set(names) - set(SNAPSHOT_FILES))
    if strangers:
        return f"holds {strangers[0]!r}, which no snapshot has"
    state = os.path.join(path, STATE)
    if os.path.islink(state) or not os.path.isfile(state):
        return f"has no {STATE} of ours"
    try:
        with open(state, "rb") as f:
            head = f.read(256)
    except OSError as exc:
        return f"has a {STATE} that cannot be read ({exc.strerror})"
    if not _OUR_HEAD.match(head):
        return f"has a {STATE} that is not an lguest-jit snapshot's"
    return None


def check_target(path: str, overwrite: bool) -> str:
    """--snapshot=DIR at argument time: where a snapshot may be written.
    An existing directory is replaced only with ``overwrite`` and only when
    it is a snapshot of ours (``not_a_snapshot``): never a source tree."""
    if not path:
        raise SnapshotError("--snapshot: empty directory name")
    path = os.path.abspath(path)
    if os.path.lexists(path):
        if os.path.islink(path):
            raise SnapshotError(f"--snapshot: {path!r} is a symbolic link; name the directory itself")
        if not os.path.isdir(path):
            raise SnapshotError(f"--snapshot: {path!r} exists and is not a directory")
        if os.listdir(path) and not overwrite:
            raise SnapshotError(f"--snapshot: {path!r} exists and is not empty (--force to replace it)")
        why = not_a_snapshot(path)
        if why is not None:
            raise SnapshotError(f"--snapshot: {path!r} is not a snapshot ({why}); --force replaces only a snapshot")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise SnapshotError(f"--snapshot: cannot write into {parent!r}")
    return path


def write(path: str, gm, state: dict) -> dict:
    """Write RAM and ``state`` into directory ``path`` (built beside it and
    renamed into place, so a crash never leaves half a snapshot under the
    name).  Returns {"ram_bytes_written", "state_bytes", "seconds"}."""
    t0 = time.monotonic()
    tmp = f"{path}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    try:
        written = gm.save_image(os.path.join(tmp, RAM))
        body = json.dumps(pack(state), sort_keys=True)
        doc = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(body.encode()).hexdigest(),
               "body": body}
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.lexists(path):
            # Checked again: the directory may have changed since the
            # arguments were checked.
            why = "a symbolic link" if os.path.islink(path) else not_a_snapshot(path)
            if why is not None:
                raise SnapshotError(f"{path!r} is no longer a snapshot ({why}); not replaced")
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"ram_bytes_written": written, "state_bytes": len(body), "seconds": time.monotonic() - t0}


# -- reading ------------------------------------------------------------------------------


def read(path: str) -> dict:
    """The state of the snapshot in directory ``path``, every check that
    needs no KVM and no device done: the files are there, the state file is
    whole, of our format and version, and the RAM file has the size the
    state says.  Disks and CPUID are checked by the caller."""
    if not os.path.isdir(path):
        raise SnapshotError(f"snapshot {path!r} does not exist or is not a directory")
    state_file, ram_file = os.path.join(path, STATE), os.path.join(path, RAM)
    for f in (state_file, ram_file):
        if not os.path.isfile(f):
            raise SnapshotError(f"snapshot {path!r} is incomplete: {os.path.basename(f)} is missing")
    try:
        with open(state_file) as f:
            doc = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise SnapshotError(f"snapshot {path!r}: {STATE} is damaged ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SnapshotError(f"snapshot {path!r}: {STATE} is not an lguest-jit snapshot")
    if doc.get("version") != VERSION:
        raise SnapshotError(f"snapshot {path!r} has format version {doc.get('version')!r}; "
                            f"this lguest-jit reads version {VERSION}")
    body = doc.get("body")
    if not isinstance(body, str) or hashlib.sha256(body.encode()).hexdigest() != doc.get("sha256"):
        raise SnapshotError(f"snapshot {path!r}: {STATE} is damaged (checksum mismatch)")
    try:
        state = unpack(json.loads(body))
    except (ValueError, TypeError, KeyError) as e:
        raise SnapshotError(f"snapshot {path!r}: {STATE} is damaged ({e})") from None
    size = state.get("machine", {}).get("mem_bytes")
    have = os.stat(ram_file).st_size
    if have != size:
        raise SnapshotError(f"snapshot {path!r}: the RAM file holds {have} bytes, the snapshot says {size}")
    state["dir"] = path
    state["ram_file"] = ram_file
    return state


def cpuid_signature(entries) -> list:
    """The CPUID a vCPU has, comparable across runs (kvm_cpuid_entry2
    list).  Fields that describe the moment rather than the CPU are masked:
    the APIC IDs (this host's KVM reports the host CPU the vCPU last ran on)
    and the OSXSAVE/OSPKE bits (they mirror the guest's CR4)."""
    out = []
    for e in entries:
        eax, ebx, ecx, edx = e.eax, e.ebx, e.ecx, e.edx
        if e.function == 1:
            ebx &= 0x00FFFFFF
            ecx &= ~(1 << 27)
        elif e.function == 7 and e.index == 0:
            ecx &= ~(1 << 4)
        elif e.function in (0xB, 0x1F):
            edx = 0
        out.append([e.function, e.index, e.flags, eax, ebx, ecx, edx])
    return sorted(out)


def cpuid_mismatch(saved: list, now: list) -> str | None:
    if saved == now:
        return None
    s = {(e[0], e[1]): e for e in saved}
    n = {(e[0], e[1]): e for e in now}
    for key in sorted(set(s) | set(n)):
        if s.get(key) != n.get(key):
            regs = "eax ebx ecx edx".split()
            diff = [f"{r} {a:#x} -> {b:#x}" for r, a, b in zip(regs, (s.get(key) or [0] * 7)[3:],
                                                               (n.get(key) or [0] * 7)[3:]) if a != b]
            return f"CPUID leaf {key[0]:#x}.{key[1]} differs from the snapshot's host ({', '.join(diff)})"
    return "CPUID differs from the snapshot's host"


__all__ = ["SnapshotError", "FORMAT", "VERSION", "check_target", "write", "read", "disk_identity", "disk_changed",
           "cpuid_signature", "cpuid_mismatch", "pack", "unpack"]
