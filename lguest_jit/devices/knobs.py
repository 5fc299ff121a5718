"""Device tuning knobs: the command-line options that change what devices
offer (``--queue-size``, ``--blk-poll-us``, ``--event-idx``, ``--indirect``,
``--seg-max``, ``--packed``, the queue counts ``--blk-queues`` and
``--net-queues``, and ``--erms``, which is the vCPU's) and the values ``bench sweep --param`` walks through.

Standard library only: the CLI checks every knob before it loads Numba.
Devices take a :class:`Knobs` through ``Device.apply_knobs`` before they are
put on the bus (the transport reads the queue sizes and features then).
A knob left unset (None) means the device's own default, which the device
class declares (``queue_max_sizes``, ``Block.poll_us``, ...): this module
knows no device.  ``KNOBS`` is the one table of the options: the launcher's
help text is generated from it, and ``SCHEMA`` reads them from a snapshot
with the same bounds.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

MIN_QUEUE_SIZE = 4            # a block request needs a header, data and status
QUEUE_SIZE_LIMIT = 32768      # §2.4: vring.MAX_QUEUE_SIZE (vring brings Numba; a test checks they agree)
MAX_POLL_US = 100_000.0
# Request queues of a block device, queue pairs of a network device: each
# queue is a thread and an MSI-X vector (a network device has 2 per pair
# plus its control queue, all within pci.transport's 128 vectors).
MAX_DEVICE_QUEUES = 32
# The environment variable through which `bench sweep` hands a benchmark
# (and its pure-Python subprocess) the knob value being measured.
BENCH_ENV = "LGUEST_JIT_BENCH_KNOBS"


@dataclasses.dataclass(frozen=True)
class Knobs:
    """Every knob; None means "as the device chooses"."""
    queue_size: int | None = None          # every queue's maximum size
    blk_poll_us: float | None = None
    event_idx: bool = True                 # offer VIRTIO_RING_F_EVENT_IDX
    indirect: bool = True                  # offer VIRTIO_RING_F_INDIRECT_DESC
    seg_max: int | None = None             # block: data segments per request
    packed: bool = False                   # offer VIRTIO_F_RING_PACKED (virtio 1.1 §2.7)
    # Block request queues (VIRTIO_BLK_F_MQ) and network queue pairs
    # (VIRTIO_NET_F_MQ); 1 is the single-queue device.  None: the device's
    # own (1); a machine description resolves it to its vCPU count.
    blk_queues: int | None = None
    net_queues: int | None = None
    # Not a device's: whether the guest is offered ERMS/FSRM (fast `rep
    # movsb`), auto = hidden on software-KVM hosts only (hw/cpuid.py).
    erms: str = "auto"
    # The network link's MTU (VIRTIO_NET_F_MTU): "auto", "off" or a number
    # as text (devices/net.py resolves auto; the text is what a snapshot keeps).
    net_mtu: str = "auto"

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> "Knobs":
        text = os.environ.get(BENCH_ENV)
        return cls(**json.loads(text)) if text else cls()


# What every numeric option accepts: ASCII digits, as written in --help,
# with at most a leading "-" (so a negative value gets its range's message);
# no "+", spaces, "_" separators, exponents, inf/nan or other scripts'
# digits, all of which int()/float() would take.  One rule for all options.
_WHOLE = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def parse_whole(text: str, what: str, unit: str = "") -> int:
    """A whole number written in ASCII digits; ValueError (one line,
    naming ``what``) for anything else."""
    if not isinstance(text, str) or not _WHOLE.fullmatch(text):
        raise ValueError(f"{what}: {text!r} is not a whole number{' of ' + unit if unit else ''} "
                         "(ASCII digits only)")
    return int(text, 10)


def parse_decimal(text: str, what: str, unit: str = "") -> float:
    """A decimal (digits, one optional point); ValueError
    otherwise (no exponent, inf or nan)."""
    if not isinstance(text, str) or not _DECIMAL.fullmatch(text):
        raise ValueError(f"{what}: {text!r} is not a number{' of ' + unit if unit else ''} "
                         "(ASCII digits and one optional point)")
    return float(text)


def _int(text: str, name: str) -> int:
    return parse_whole(text, f"--{name}")


def _queue_size(text: str) -> int:
    n = _int(text, "queue-size")
    if n < MIN_QUEUE_SIZE or n > QUEUE_SIZE_LIMIT or n & (n - 1):
        raise ValueError(f"--queue-size={text}: must be a power of two from {MIN_QUEUE_SIZE} to {QUEUE_SIZE_LIMIT}")
    return n


def _poll_us(text: str) -> float:
    us = parse_decimal(text, "--blk-poll-us", "microseconds")
    if not 0 <= us <= MAX_POLL_US:
        raise ValueError(f"--blk-poll-us={text}: must be between 0 and {MAX_POLL_US:.0f} microseconds")
    return us


def _on_off(name: str):
    def parse(text: str) -> bool:
        if text not in ("on", "off"):
            raise ValueError(f"--{name}={text}: must be on or off")
        return text == "on"
    return parse


def _seg_max(text: str) -> int:
    n = _int(text, "seg-max")
    if n < 1:
        raise ValueError(f"--seg-max={text}: must be at least 1")
    return n


def _queues(name: str):
    def parse(text: str) -> int:
        n = _int(text, name)
        if not 1 <= n <= MAX_DEVICE_QUEUES:
            raise ValueError(f"--{name}={text}: must be from 1 to {MAX_DEVICE_QUEUES}")
        return n
    return parse


def _erms(text: str) -> str:
    if text not in ERMS_CHOICES:
        raise ValueError(f"--erms={text}: must be auto, on or off")
    return text


ERMS_CHOICES = ("auto", "on", "off")
# An Ethernet MTU: IPv4's minimum (RFC 791: 68) to what the 16-bit config
# field (§5.1.4) holds.
MIN_MTU, MAX_MTU = 68, 65535
# --net-mtu=auto on software-KVM hosts: the loopback device's MTU, a 64 KiB
# frame less headers.  The emulated guest kernel pays per frame, whatever
# its size; a TCP stream in 1500-byte frames spends its time in that.
SOFTWARE_KVM_MTU = 65520


def parse_net_mtu(text: str) -> str:
    """``--net-mtu``'s value, normalised (auto, off or the number as text)."""
    if text in ("auto", "off"):
        return text
    n = parse_whole(text, "--net-mtu", "bytes") if text[:1].isdigit() or text[:1] == "-" else None
    if n is None or not MIN_MTU <= n <= MAX_MTU:
        raise ValueError(f"--net-mtu={text}: must be auto, off or a whole number of bytes from {MIN_MTU} to {MAX_MTU}")
    return str(n)


# option name -> (Knobs field, parser, metavariable, help).  The help is
# the launcher's --help text for the option (main generates its docopt
# text from this table).
KNOBS = {
    "queue-size": ("queue_size", _queue_size, "N", f"Queue size every device offers, a power of two from "
                   f"{MIN_QUEUE_SIZE} to {QUEUE_SIZE_LIMIT} (default: each device's own)."),
    "blk-poll-us": ("blk_poll_us", _poll_us, "US", "Block: busy-poll this long for the next request before "
                    "sleeping, 0 never (default: the block device's own)."),
    "event-idx": ("event_idx", _on_off("event-idx"), "ON|OFF", "Offer VIRTIO_RING_F_EVENT_IDX, on or off "
                  "(default: on)."),
    "indirect": ("indirect", _on_off("indirect"), "ON|OFF", "Offer indirect descriptors, on or off "
                 "(default: on)."),
    "seg-max": ("seg_max", _seg_max, "N", "Block: data segments per request offered as seg_max (default: the "
                "block queue size - 2)."),
    "packed": ("packed", _on_off("packed"), "ON|OFF", "Offer packed virtqueues (VIRTIO_F_RING_PACKED), on or "
               "off (default: off)."),
    "blk-queues": ("blk_queues", _queues("blk-queues"), "N", "Block: request queues each device offers "
                   "(VIRTIO_BLK_F_MQ), 1 for a single queue (default: one per vCPU)."),
    "net-queues": ("net_queues", _queues("net-queues"), "N", "Network: queue pairs each device offers "
                   "(VIRTIO_NET_F_MQ, one tap queue each), 1 for a single pair (default: one per vCPU)."),
    "net-mtu": ("net_mtu", parse_net_mtu, "AUTO|OFF|N", "Network: the MTU offered to the guest (VIRTIO_NET_F_MTU) "
                "and set on its tap (--tunnet=IP only; a bridged tap keeps its bridge's). auto is 65520 on "
                "software-KVM hosts, where every frame costs the emulated guest kernel dearly, and off elsewhere; "
                "off offers no MTU and leaves the tap at 1500 (default: auto)."),
    "erms": ("erms", _erms, "AUTO|ON|OFF", "Offer the guest fast string copies (CPUID ERMS/FSRM): auto hides "
             "them on software-KVM hosts only (default: auto)."),
}
# Knobs of the machine rather than of a device: only `bench sweep ... guest`,
# which boots a guest per value, can measure them.  ``cpus`` is the
# launcher's --cpus, not a knob: the sweep alone takes it as a parameter.
# --net-mtu changes what a guest's TCP stack sends, not the fixed frames of
# the device benchmark: it too is measured by the guest alone.
GUEST_ONLY_KNOBS = ("erms", "cpus", "net-mtu")
CPUS_SWEEP = "cpus"
# Where `bench sweep --param=cpus=...` hands bench guest the vCPU count.
BENCH_CPUS_ENV = "LGUEST_JIT_BENCH_CPUS"


def parse_sweep_cpus(text: str) -> int:
    from ..hw.firmware import MAX_CPUS        # standard library only
    n = parse_whole(text, f"--param=cpus={text}", "vCPUs")
    if not 1 <= n <= MAX_CPUS:
        raise ValueError(f"--param=cpus: {n} vCPUs (must be from 1 to {MAX_CPUS})")
    return n


def parse_knobs(values: dict) -> Knobs:
    """``{option name: text or None}`` -> Knobs; ValueError (one line) for a
    bad value or a combination that cannot work whatever the device."""
    fields = {}
    for name, text in values.items():
        if text is None:
            continue
        if name not in KNOBS:
            raise ValueError(f"unknown knob {name!r}; knobs: {', '.join(KNOBS)}")
        field, parse, _, _ = KNOBS[name]
        fields[field] = parse(text)
    knobs = Knobs(**fields)
    check_seg_max(knobs.seg_max, knobs.queue_size)
    return knobs


def check_seg_max(seg_max: int | None, queue_size: int | None) -> None:
    """§5.2.4: the header and the status byte take two of a chain's
    descriptors (the block device calls this with its own queue size)."""
    if seg_max is not None and queue_size is not None and seg_max > queue_size - 2:
        raise ValueError(f"--seg-max={seg_max}: more than the block queue size ({queue_size}) "
                         f"- 2 leaves no room for a request's header and status")


def knobs_schema():
    """How a snapshot's knobs are read (hw.fields): the command line's bounds."""
    from ..hw.fields import Bool, Float, Int, Record, Str
    return Record({"queue_size": Int(MIN_QUEUE_SIZE, QUEUE_SIZE_LIMIT, pow2=True), "blk_poll_us": Float(0, MAX_POLL_US),
                   "event_idx": Bool(), "indirect": Bool(), "seg_max": Int(1, QUEUE_SIZE_LIMIT - 2),
                   "packed": Bool(), "erms": Str(8, choices=ERMS_CHOICES), "net_mtu": Str(5),
                   "blk_queues": Int(1, MAX_DEVICE_QUEUES), "net_queues": Int(1, MAX_DEVICE_QUEUES)},
                  optional=("queue_size", "blk_poll_us", "seg_max", "blk_queues", "net_queues"))


def with_queue_counts(knobs: Knobs, cpus: int) -> Knobs:
    """The knobs a machine with ``cpus`` vCPUs runs with: a queue count
    left unset becomes one queue (pair) per vCPU, as Linux's drivers use
    one per CPU (capped at the knob's bound)."""
    n = min(cpus, MAX_DEVICE_QUEUES)
    return dataclasses.replace(knobs, blk_queues=knobs.blk_queues or n, net_queues=knobs.net_queues or n)


def auto_net_mtu(software_kvm: bool, bridged: bool) -> str:
    """What ``--net-mtu=auto`` means: SOFTWARE_KVM_MTU where the guest kernel
    is emulated and the tap is ours to size (not a bridge's), else off."""
    return str(SOFTWARE_KVM_MTU) if software_kvm and not bridged else "off"


def with_net_mtu(knobs: Knobs, software_kvm: bool, bridged: bool) -> Knobs:
    """``--net-mtu=auto`` made concrete for a machine (so a snapshot records
    what its network devices offered, whatever host restores it)."""
    if knobs.net_mtu != "auto":
        return knobs
    return dataclasses.replace(knobs, net_mtu=auto_net_mtu(software_kvm, bridged))


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """``NAME=V1,V2,...`` -> (name, [texts]), each value checked as the
    option would check it."""
    name, eq, values = spec.partition("=")
    if not eq or not values:
        raise ValueError(f"--param={spec}: expected NAME=V1,V2,... (knobs: {', '.join(KNOBS)}, {CPUS_SWEEP})")
    if name not in KNOBS and name != CPUS_SWEEP:
        raise ValueError(f"--param={spec}: unknown knob {name!r}; knobs: {', '.join(KNOBS)}, {CPUS_SWEEP}")
    texts = values.split(",")
    if any(not t for t in texts):
        raise ValueError(f"--param={spec}: empty value in the list")
    if len(set(texts)) != len(texts):
        raise ValueError(f"--param={spec}: a value appears twice")
    for t in texts:
        parse_sweep_cpus(t) if name == CPUS_SWEEP else parse_knobs({name: t})
    return name, texts
