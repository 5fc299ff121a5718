"""Snapshots of a running guest: what is written, and the checks on reading.

A snapshot is a directory:

``ram``
    Guest RAM, a sparse file (all-zero pages are holes).  A restore maps it
    copy-on-write (``GuestMemory(image=...)``): nothing is read up front
    but its digest, and every restore of one snapshot shares its pages in
    the page cache.
``state.json``
    Everything else, versioned: the machine description
    (``lguest_jit.machine``: memory, kernel, devices and their options,
    knobs), the identity of each disk, the arguments a reboot starts the
    launcher with, the KVM state of the VM and its vCPU (``hw.vmstate``),
    the CPUID the vCPU had, PCI config space and every transport's
    registers and queues (``pci``), each device's own state, the UART and
    the CMOS.  Every part is named fields its owner declares (``STATE``,
    ``hw.fields``); ``schema()`` is all of them together.

Trust (README, "Snapshots"): a snapshot is restored only when it carries
an HMAC-SHA256, under this user's key (``key()``: 32 random bytes, 0600 in
the user's cache directory, made on first use), over its state and a
digest of its RAM: only snapshots this user's launcher wrote are read
further.  Even then every field goes through ``schema()`` with the command
line's bounds, and whatever the snapshot names (disks, the reboot's
arguments) through the command line's own checks.  The version changes
whenever a saved layout does (``tests/test_snapshot_format.py`` pins the
layout's fingerprint per version), so an older snapshot is refused in one
line, never misread.

A failure is a :class:`SnapshotError` with one line for the user.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import re
import shutil
import stat
import time

FORMAT = "lguest-jit-snapshot"
VERSION = 5
STATE = "state.json"
RAM = "ram"
KEY = "snapshot.key"
KEY_BYTES = 32
MAX_STATE_BYTES = 8 << 20     # the state of 31 devices is well under 1 MiB
MAX_DEPTH = 16                # nesting of JSON containers; the schema needs 6
PAGE = 4096


class SnapshotError(Exception):
    """A snapshot that cannot be written or restored: one line, exit 2."""


# -- the key ------------------------------------------------------------------------------


def key_path() -> str:
    base = os.environ.get("LGUEST_JIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lguest-jit")
    return os.path.join(base, KEY)


def key(path: str | None = None) -> bytes:
    """This user's snapshot key, made on first use.  Refused when it is not
    a regular file of this user, readable or writable by anyone else, or not
    of the key's size (someone else's key would let them forge snapshots)."""
    path = path or key_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        _make_key(path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotError(f"snapshot key {path!r}: {exc.strerror}"
                            + (" (a symbolic link)" if exc.errno == errno.ELOOP else "")) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(f"snapshot key {path!r} is not a regular file")
        if st.st_uid != os.geteuid():
            raise SnapshotError(f"snapshot key {path!r} belongs to uid {st.st_uid}, not to you")
        if st.st_mode & 0o077:
            raise SnapshotError(f"snapshot key {path!r} is accessible to others (mode {st.st_mode & 0o777:o}; "
                                f"it must be 600)")
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise SnapshotError(f"snapshot key {path!r} is damaged ({len(data)} bytes)")
    return data


def _make_key(path: str) -> None:
    """Write a new key beside ``path`` and link it into place: a second
    launcher making one at the same moment keeps the first."""
    d = os.path.dirname(path)
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        tmp = f"{path}.new-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise SnapshotError(f"cannot make the snapshot key {path!r}: {exc.strerror}") from None


def sign(secret: bytes, body: bytes, ram_digest: bytes) -> str:
    """The HMAC a snapshot carries: over its state body and its RAM's digest."""
    return hmac.new(secret, b"lguest-jit snapshot\0" + ram_digest + body, hashlib.sha256).hexdigest()


# -- the RAM digest -----------------------------------------------------------------------


def _digest_pages(h, chunk, first_page: int, indices: list) -> None:
    """Feed the non-zero pages of ``chunk`` (uint8, whole pages, starting at
    page ``first_page``) to ``h``; their numbers go to ``indices``.  Zero
    pages are skipped, so a hole and written zeros digest alike."""
    import numpy as np
    pages = chunk.reshape(-1, PAGE)
    nz = np.flatnonzero(pages.view(np.uint64).any(axis=1))
    if len(nz):
        h.update(np.ascontiguousarray(pages[nz]).tobytes())
        indices.append(nz + first_page)


def _finish(h, indices: list, size: int) -> bytes:
    import numpy as np
    idx = np.concatenate(indices).astype("<i8") if indices else np.zeros(0, "<i8")
    h.update(idx.tobytes())
    h.update(int(size).to_bytes(8, "little"))
    return h.digest()


CHUNK_PAGES = 256


def memory_digest(mem) -> bytes:
    """The digest of guest RAM ``mem`` (uint8, whole pages) as it is saved."""
    h, indices = hashlib.sha256(), []
    step = CHUNK_PAGES * PAGE
    for off in range(0, mem.size, step):
        _digest_pages(h, mem[off:off + step], off // PAGE, indices)
    return _finish(h, indices, mem.size)


def file_digest(fd: int, size: int) -> bytes:
    """The same digest of a RAM file, reading only its data extents."""
    import numpy as np
    h, indices = hashlib.sha256(), []
    step = CHUNK_PAGES * PAGE
    page = 0                                  # every page below this one is done
    while page * PAGE < size:
        try:
            data = os.lseek(fd, page * PAGE, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break                         # holes to the end
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        page = max(page, data // PAGE)
        while page * PAGE < min(hole, size):
            want = min(step, size - page * PAGE)
            raw = os.pread(fd, want, page * PAGE)
            buf = np.zeros(-(-len(raw) // PAGE) * PAGE, np.uint8)
            buf[:len(raw)] = np.frombuffer(raw, np.uint8)
            _digest_pages(h, buf, page, indices)
            page += len(buf) // PAGE
            if len(raw) < want:
                break
        page = max(page, -(-hole // PAGE))
    return _finish(h, indices, size)


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
    for field, what in (("inode", "is another file (inode)"), ("device", "is on another file system"),
                      ("size", "changed size"), ("mtime_ns", "was modified")):
        if now[field] != saved[field]:
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


def write(path: str, gm, state: dict, secret: bytes) -> dict:
    """Write RAM and ``state`` (``schema()``'s fields) into directory
    ``path``, authenticated with ``secret`` (built beside it and renamed
    into place, so a crash never leaves half a snapshot under the name).
    Returns {"ram_bytes_written", "state_bytes", "seconds"}."""
    t0 = time.monotonic()
    tmp = f"{path}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    try:
        written = gm.save_image(os.path.join(tmp, RAM))
        body = json.dumps(state, sort_keys=True)
        doc = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(body.encode()).hexdigest(),
               "hmac": sign(secret, body.encode(), memory_digest(gm.mem)), "body": body}
        fd = os.open(os.path.join(tmp, STATE), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
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


def _nesting(text: str) -> int:
    """How deeply JSON ``text`` nests its containers (strings skipped), so
    a crafted file cannot exhaust the parser's recursion."""
    depth = top = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > top:
                top = depth
                if top > MAX_DEPTH:
                    return top
        elif ch in "]}":
            depth -= 1
    return top


def _json(text: str, what: str, where: str):
    if _nesting(text) > MAX_DEPTH:
        raise SnapshotError(f"snapshot {where!r}: {what} nests deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise SnapshotError(f"snapshot {where!r}: {what} is damaged ({str(e).splitlines()[0][:80]})") from None


def _own_file(path: str, where: str) -> os.stat_result:
    """A file of the snapshot: a regular file (not a link) of this user that
    nobody else may write."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {where!r} is incomplete: {os.path.basename(path)} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError(f"snapshot {where!r}: {os.path.basename(path)} is not a regular file")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise SnapshotError(f"snapshot {where!r}: {os.path.basename(path)} is not yours alone to write")
    return st


def schema():
    """Every field of a snapshot's state, each declared by its owner."""
    from . import machine
    from .devices import DEVICES, device_class
    from .hw import vmstate
    from .hw.cmos import CmosRtc
    from .hw.fields import Int, List, Record, Str, U
    from .hw.uart import Uart8250
    from .pci import Bus
    disk = Record({"path": Str(4096), "size": Int(0, 2**63 - 1), "inode": U(64), "device": U(64),
                   "mtime_ns": Int(-(2**63), 2**63 - 1)})
    return Record({"machine": machine.schema(), "disks": List(disk, 31), "boot_argv": List(Str(4096), 512),
                   "kvm": vmstate.STATE, "cpuid": List(List(U(32), 7, min_len=7), 1024),
                   "bus": Bus.state_schema({k: device_class(k).STATE for k in DEVICES}),
                   "uart": Uart8250.STATE, "cmos": CmosRtc.STATE})


def read(path: str, secret: bytes | None = None) -> dict:
    """The state of the snapshot in directory ``path``, every check that
    needs no KVM and no device done: the files are this user's, the state
    file is of our format and version, whole, authenticated with this
    user's key (``secret``, default ``key()``) together with the RAM file,
    and every field fits ``schema()``; the machine it describes passes the
    command line's checks (``machine.from_fields``) and the RAM file has
    its size.  Disks and CPUID are compared by the caller.  Returns the
    fields with ``machine`` a ``Machine``, plus ``dir`` and ``ram_file``."""
    from .hw.fields import FieldError, check
    from .machine import MachineError, from_fields
    if not os.path.isdir(path):
        raise SnapshotError(f"snapshot {path!r} does not exist or is not a directory")
    state_file, ram_file = os.path.join(path, STATE), os.path.join(path, RAM)
    for f in (state_file, ram_file):
        _own_file(f, path)
    try:
        fd = os.open(state_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_STATE_BYTES:
                raise SnapshotError(f"snapshot {path!r}: {STATE} is {size} bytes, more than a snapshot's "
                                    f"{MAX_STATE_BYTES}")
            raw = f.read(MAX_STATE_BYTES + 1)
        text = raw.decode("utf-8")
    except OSError as e:
        raise SnapshotError(f"snapshot {path!r}: {STATE} cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SnapshotError(f"snapshot {path!r}: {STATE} is damaged (not UTF-8)") from None
    doc = _json(text, STATE, path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SnapshotError(f"snapshot {path!r}: {STATE} is not an lguest-jit snapshot")
    if doc.get("version") != VERSION:
        v = doc.get("version")
        raise SnapshotError(f"snapshot {path!r} has format version {v if type(v) is int else '?'}; "
                            f"this lguest-jit reads version {VERSION}")
    body, mac = doc.get("body"), doc.get("hmac")
    if not isinstance(body, str) or hashlib.sha256(body.encode()).hexdigest() != doc.get("sha256"):
        raise SnapshotError(f"snapshot {path!r}: {STATE} is damaged (checksum mismatch)")
    secret = key() if secret is None else secret
    try:
        fd = os.open(ram_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            ram_size = os.fstat(fd).st_size
            digest = file_digest(fd, ram_size)
        finally:
            os.close(fd)
    except OSError as e:
        raise SnapshotError(f"snapshot {path!r}: {RAM} cannot be read ({e.strerror})") from None
    if not isinstance(mac, str) or not hmac.compare_digest(mac, sign(secret, body.encode(), digest)):
        raise SnapshotError(f"snapshot {path!r} was not written by your lguest-jit, or was changed since "
                            f"(authentication failed)")
    try:
        state = check(schema(), _json(body, "its state", path), "state")
        state["machine"] = from_fields(state["machine"])
    except (FieldError, MachineError) as e:
        raise SnapshotError(f"snapshot {path!r}: {e}") from None
    files = [p for d in state["machine"].devices for p in d.files()]
    if [d["path"] for d in state["disks"]] != files:
        raise SnapshotError(f"snapshot {path!r}: its disks do not match its devices")
    if ram_size != state["machine"].mem_bytes:
        raise SnapshotError(f"snapshot {path!r}: the RAM file holds {ram_size} bytes, the snapshot says "
                            f"{state['machine'].mem_bytes}")
    # The parts are handed to their owners as saved: each owner reads its
    # fields through the same declarations again (``load_state``).
    raw_state = json.loads(body)
    for part in ("kvm", "bus", "uart", "cmos"):
        state[part] = raw_state[part]
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


__all__ = ["SnapshotError", "FORMAT", "VERSION", "check_target", "write", "read", "schema", "key", "key_path",
           "disk_identity", "disk_changed", "cpuid_signature", "cpuid_mismatch", "memory_digest", "file_digest", "sign"]
