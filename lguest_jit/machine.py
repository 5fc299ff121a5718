"""The machine description: what a run, a snapshot and a restore all build from.

A :class:`Machine` is memory, vCPUs, kernel, initrd, command line, the
strict-mode switch, the device knobs and the devices in bus order, each a
:class:`DeviceDesc` (a registry kind, ``lguest_jit.devices.DEVICES``, and
its options).  The command line makes one (``from_args``), a snapshot
saves one (``to_fields``) and a restore reads one back (``from_fields``):
both go through the same checks, so a snapshot can name nothing the
command line would refuse (a disk that is not a readable regular file, a
bad ``--tunnet``, a knob out of bounds, a memory size the launcher cannot
lay out).  ``Launcher.build`` (main.py) builds every device from it in one
loop.

``DEVICE_OPTIONS`` is the command line's side of each device: its option,
help text, and how the option's text becomes the device's options.  The
launcher's --help is generated from it and from the knob table.

Standard library only: the CLI checks its arguments before loading Numba.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .devices.knobs import Knobs, check_seg_max, knobs_schema, parse_net_mtu
from .devices.tunspec import parse_tunnet
from .hw import fields as F
from .hw.firmware import MAX_CPUS       # standard library only

MIN_MEM_MB = 16
MAX_MEM_MB = (1 << 22) - 1            # under 4 TiB
# The PCI MMIO window (pci.Bus's mmio_base up to 4 GiB): guest RAM is one
# block from address 0, so it must end below the window.
MMIO_WINDOW_MB = 0xE0000000 >> 20
MAX_CMDLINE = 2048                    # the boot protocol's cmdline_size on x86


class MachineError(ValueError):
    """A description the launcher cannot build: one line for the user."""


def check_mem_mb(mb: int) -> int:
    if mb < MIN_MEM_MB:
        raise MachineError(f"memory size {mb} MB is too small to boot Linux (minimum {MIN_MEM_MB} MB)")
    if mb > MAX_MEM_MB:
        raise MachineError(f"memory size {mb} MB is absurd (4 TiB or more)")
    if mb > MMIO_WINDOW_MB:
        raise MachineError(f"memory size {mb} MB overlaps the PCI MMIO window at {MMIO_WINDOW_MB} MB "
                           f"(guest RAM is at most {MMIO_WINDOW_MB} MB)")
    return mb


def readable_file(path: str, what: str) -> str:
    """An input the launcher reads (or a disk it opens): an existing,
    readable regular file.  Device nodes and directories are refused."""
    if not path:
        raise MachineError(f"{what}: empty file name")
    if not os.path.exists(path):
        raise MachineError(f"{what} {path!r} does not exist")
    if not os.path.isfile(path):
        raise MachineError(f"{what} {path!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise MachineError(f"{what} {path!r} is not readable")
    return path


# -- the devices' command-line side ---------------------------------------------------------


@dataclass(frozen=True)
class DeviceOption:
    """How device ``kind`` is asked for on the command line."""
    kind: str
    option: str                  # docopt's option spec, e.g. "-b --block=FILE"
    help: str
    repeat: bool                 # may be given more than once (one device each)
    parse: object                # option text (or True for a flag) -> the device's options
    check: object                # the device's options (from either side) -> checked options
    schema: object               # the options' fields (hw.fields), for a snapshot


def _block_options(spec: str) -> dict:
    path, _, flags = spec.partition(",")
    if flags not in ("", "ro"):
        raise MachineError(f"--block={spec}: unknown flag {flags!r} (only ',ro')")
    return {"path": path, "readonly": flags == "ro"}


def _block_check(opts: dict) -> dict:
    path = readable_file(opts["path"], "block device file")
    return {"path": os.path.abspath(path), "readonly": opts["readonly"]}


def _net_check(opts: dict) -> dict:
    try:
        return {"spec": str(parse_tunnet(opts["spec"]))}
    except ValueError as exc:
        raise MachineError(f"--tunnet={opts['spec']}: {exc}") from None


def _vsock_options(spec: str) -> dict:
    cid, sep, path = spec.partition(":")
    if not sep or not cid.isdigit():
        raise MachineError(f"--vsock={spec}: expected CID:PATH (a guest CID of 3 or more, a socket path)")
    return {"cid": int(cid, 10), "path": path}


def _vsock_check(opts: dict) -> dict:
    cid, path = opts["cid"], opts["path"]
    if not 3 <= cid <= 0xFFFFFFFE:
        raise MachineError(f"--vsock: guest CID {cid} must be from 3 to 4294967294 (0-2 are reserved)")
    if not path or len(os.fsencode(path)) > 107 - len("_4294967295"):
        raise MachineError(f"--vsock: socket path {path[:40]!r} is empty or too long for a Unix socket")
    where = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(where):
        raise MachineError(f"--vsock: directory {where!r} does not exist")
    return {"cid": cid, "path": os.path.abspath(path)}


DEVICE_OPTIONS = (
    DeviceOption("net", "-t --tunnet=SPEC", "Network device on a tap: IP[:MAC] or bridge:NAME[:MAC].", True,
                 lambda spec: _net_check({"spec": spec}), _net_check, F.Record({"spec": F.Str(64)})),
    DeviceOption("block", "-b --block=FILE", "Block device backed by FILE (FILE,ro for read-only).", True,
                 _block_options, _block_check, F.Record({"path": F.Str(4096), "readonly": F.Bool()})),
    DeviceOption("rng", "-r --rng", "Random number device.", False, lambda _: {}, lambda o: o, F.Record({})),
    DeviceOption("vsock", "--vsock=CID:PATH", "virtio-vsock for guest CID (3 or more): host programs connect "
                 "to the Unix socket PATH, guest connects to port P reach PATH_P.", False,
                 _vsock_options, _vsock_check, F.Record({"cid": F.Int(3, 0xFFFFFFFE), "path": F.Str(107)})),
)
# The console is always there, first on the bus, and has no options.
ALWAYS = (DeviceOption("console", "", "", False, None, lambda o: o, F.Record({})),)
BY_KIND = {d.kind: d for d in ALWAYS + DEVICE_OPTIONS}


@dataclass(frozen=True)
class DeviceDesc:
    kind: str
    options: dict = dataclasses.field(default_factory=dict)

    def files(self) -> list[str]:
        """The host files this device opens (a snapshot records their identity)."""
        return [self.options["path"]] if "path" in self.options else []


@dataclass(frozen=True)
class Machine:
    mem_bytes: int
    kernel: str | None           # absolute path; None for a restored guest that never boots afresh
    initrd: str | None
    cmdline: str
    strict: bool
    knobs: Knobs
    devices: tuple               # DeviceDesc, in bus order
    cpus: int = 1                # vCPUs (MP table entries, one loop thread each)

    def of_kind(self, kind: str) -> list:
        return [d for d in self.devices if d.kind == kind]

    def to_fields(self) -> dict:
        """The description as a snapshot saves it (``SCHEMA``'s fields)."""
        return {"mem_bytes": self.mem_bytes, "kernel": self.kernel, "initrd": self.initrd, "cmdline": self.cmdline,
                "strict": self.strict, "knobs": dataclasses.asdict(self.knobs),
                "devices": [{"kind": d.kind, "options": dict(d.options)} for d in self.devices],
                "cpus": self.cpus}


def device_descs(args) -> tuple:
    """The devices the command line asks for, in bus order (the console,
    then each kind in ``DEVICE_OPTIONS`` order), every option checked."""
    out = [DeviceDesc("console")]
    for d in DEVICE_OPTIONS:
        given = args[d.option.split()[-1].split("=")[0]]
        out += descs(d.kind, given if d.repeat else ([given] if given else []))
    return tuple(out)


def descs(kind: str, texts) -> list:
    """Devices of ``kind`` from their options' texts, each checked."""
    d = BY_KIND[kind]
    return [DeviceDesc(kind, d.check(d.parse(t))) for t in texts]


def check_devices(devices) -> tuple:
    """Devices read from a snapshot: the console first and only once, each
    kind known, its options through the command line's checks."""
    if not devices or devices[0]["kind"] != "console" or sum(d["kind"] == "console" for d in devices) != 1:
        raise MachineError("the console must be the first device, once")
    for kind, d in BY_KIND.items():
        if not d.repeat and sum(x["kind"] == kind for x in devices) > 1:
            raise MachineError(f"at most one {kind} device")
    return tuple(DeviceDesc(d["kind"], BY_KIND[d["kind"]].check(d["options"])) for d in devices)


def schema(max_devices: int = 31):
    """How a snapshot's machine description is read: every field, with the
    command line's bounds (files are checked after, by ``from_fields``)."""
    device = F.OneOf("kind", {k: F.Record({"kind": F.Str(16), "options": d.schema}) for k, d in BY_KIND.items()})
    return F.Record({"mem_bytes": F.Int(MIN_MEM_MB << 20, MAX_MEM_MB << 20), "kernel": F.Str(4096),
                     "initrd": F.Str(4096), "cmdline": F.Str(MAX_CMDLINE), "strict": F.Bool(),
                     "knobs": knobs_schema(), "devices": F.List(device, max_devices, min_len=1),
                     "cpus": F.Int(1, MAX_CPUS)},
                    optional=("kernel", "initrd"))


def from_fields(st: dict) -> Machine:
    """A snapshot's description (already read through ``schema()``),
    checked as the command line would check it."""
    mem = st["mem_bytes"]
    if mem & ((1 << 20) - 1):
        raise MachineError(f"memory size of {mem} bytes is not a whole number of MiB")
    check_mem_mb(mem >> 20)
    fields = dict(st["knobs"])
    try:
        fields["net_mtu"] = parse_net_mtu(fields["net_mtu"])
        knobs = Knobs(**fields)
        check_seg_max(knobs.seg_max, knobs.queue_size)
    except ValueError as exc:
        raise MachineError(str(exc)) from None
    return Machine(mem, st["kernel"], st["initrd"], st["cmdline"], st["strict"], knobs,
                   check_devices(st["devices"]), cpus=st["cpus"])


__all__ = ["Machine", "DeviceDesc", "DeviceOption", "DEVICE_OPTIONS", "MachineError", "MIN_MEM_MB", "check_mem_mb",
           "readable_file", "device_descs", "descs", "check_devices", "schema", "from_fields"]
