"""Target: the snapshot reader and the restore path short of KVM: an input
is a state body (JSON text), sealed as this user's launcher would seal it
(checksum, HMAC under a fixed key over it and the RAM file's digest), so
the fuzzer reaches past authentication into ``snapshot.read`` (size and
nesting caps, the schema, the machine description's command-line checks)
and then each owner's ``load_state``: the UART, the CMOS, the KVM state's
fields and a PCI bus with a console and an rng (their transports and
queues).  Every input must be read and restored, or refused with a
SnapshotError or ValueError of one line: anything else is a finding."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

from .common import digest, main

from lguest_jit import snapshot
from lguest_jit.devices import DeviceEnv, device_class
from lguest_jit.hw import vmstate
from lguest_jit.hw.cmos import CmosRtc
from lguest_jit.hw.fields import check
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.hw.uart import Uart8250
from lguest_jit.pci import Bus

MEM_BYTES = 16 << 20
KEY = b"fuzz" * 8
_DIR = tempfile.mkdtemp(prefix="lguest-jit-fuzz-snapshot-")
os.chmod(_DIR, 0o700)
with open(os.path.join(_DIR, snapshot.RAM), "wb") as _f:
    _f.truncate(MEM_BYTES)
    _f.seek(1 << 20)
    _f.write(b"\x90" * 4096)
_fd = os.open(os.path.join(_DIR, snapshot.RAM), os.O_RDONLY)
RAM_DIGEST = snapshot.file_digest(_fd, MEM_BYTES)
os.close(_fd)
_GM = GuestMemory(MEM_BYTES)
_DEVNULL = os.open(os.devnull, os.O_WRONLY)


def seal(body: bytes) -> bytes:
    """``body`` as the state file this user's launcher would write."""
    text = body.decode("utf-8", "replace")
    return json.dumps({"format": snapshot.FORMAT, "version": snapshot.VERSION,
                       "sha256": hashlib.sha256(text.encode()).hexdigest(),
                       "hmac": snapshot.sign(KEY, text.encode(), RAM_DIGEST), "body": text}).encode()


def _bus():
    bus = Bus(_GM)
    env = DeviceEnv(on_fatal=lambda msg: None, console_fd=_DEVNULL)
    for kind in ("console", "rng"):
        bus.add_device(device_class(kind).from_options({}, env))
    return bus


def _one_line(exc) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, f"refusal not one line: {msg!r}"
    return msg.replace(_DIR, "DIR")     # the directory differs per process


def one_input(data: bytes) -> str:
    with open(os.path.join(_DIR, snapshot.STATE), "wb") as f:
        f.write(seal(data))
    try:
        st = snapshot.read(_DIR, KEY)
    except snapshot.SnapshotError as exc:
        return digest("refused", _one_line(exc))
    outcome = ["read", st["machine"].mem_bytes, len(st["machine"].devices)]
    for name, part, restore in (("uart", st["uart"], Uart8250().load_state),
                                ("cmos", st["cmos"], CmosRtc().load_state),
                                ("kvm", st["kvm"], lambda s: check(vmstate.STATE, s, "kvm"))):
        try:
            restore(part)
            outcome.append(name)
        except ValueError as exc:
            outcome.append((name, _one_line(exc)))
    bus = _bus()
    try:
        saved = st["bus"]
        if isinstance(saved, dict) and isinstance(saved.get("devices"), list):
            for d in saved["devices"]:
                if isinstance(d, dict):
                    d["active"] = False        # no queue threads in the fuzzer
        bus.load_state(saved)
        outcome.append("bus")
    except ValueError as exc:
        outcome.append(("bus", _one_line(exc)))
    finally:
        bus.close()
    return digest(outcome)


def seed_body() -> bytes:
    """A whole, valid body: what a launcher with a console and an rng saves
    (the KVM part empty: no KVM is needed to read it)."""
    from lguest_jit.devices.knobs import Knobs
    from lguest_jit.machine import DeviceDesc, Machine
    m = Machine(MEM_BYTES, "/nonexistent/vmlinux", None, "console=hvc0", False, Knobs(),
                (DeviceDesc("console"), DeviceDesc("rng")))
    bus = _bus()
    try:
        state = {"machine": m.to_fields(), "disks": [], "boot_argv": ["16", "/nonexistent/vmlinux"],
                 "kvm": {"classes": {}, "msrs": {"16": 5}}, "cpuid": [[0, 0, 0, 13, 1, 2, 3]],
                 "bus": bus.save_state(), "uart": Uart8250().save_state(), "cmos": CmosRtc().save_state()}
    finally:
        bus.close()
    return json.dumps(state, sort_keys=True).encode()


if __name__ == "__main__":
    main("fuzz.fuzz_snapshot")
