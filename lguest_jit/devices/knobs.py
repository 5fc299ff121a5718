"""Device tuning knobs: the command-line options that change what devices
offer (``--queue-size``, ``--blk-poll-us``, ``--event-idx``, ``--indirect``,
``--seg-max``, and ``--erms``, which is the vCPU's) and the values ``bench sweep --param`` walks through.

Standard library only: the CLI checks every knob before it loads Numba.
Devices take a :class:`Knobs` through ``Device.apply_knobs`` before they are
put on the bus (the transport reads the queue sizes and features then).
"""
from __future__ import annotations

import dataclasses
import json
import os

# The queue size each device offers unless --queue-size says otherwise (the
# device modules take theirs from here).
DEFAULT_QUEUE_SIZES = {"console": 128, "block": 128, "net": 256, "rng": 64}
MIN_QUEUE_SIZE = 4            # a block request needs a header, data and status
QUEUE_SIZE_LIMIT = 32768      # §2.4: vring.MAX_QUEUE_SIZE (vring brings Numba; a test checks they agree)
DEFAULT_BLK_POLL_US = 50.0    # a 4 KiB read takes ~1.5 us; a sleep and wake-up costs several
MAX_POLL_US = 100_000.0
# The environment variable through which `bench sweep` hands a benchmark
# (and its pure-Python subprocess) the knob value being measured.
BENCH_ENV = "LGUEST_JIT_BENCH_KNOBS"


@dataclasses.dataclass(frozen=True)
class Knobs:
    """Every knob, None or the default meaning "as the device chooses"."""
    queue_size: int | None = None          # every queue's maximum size
    blk_poll_us: float = DEFAULT_BLK_POLL_US
    event_idx: bool = True                 # offer VIRTIO_RING_F_EVENT_IDX
    indirect: bool = True                  # offer VIRTIO_RING_F_INDIRECT_DESC
    seg_max: int | None = None             # block: data segments per request (default queue size - 2)
    # Not a device's: whether the guest is offered ERMS/FSRM (fast `rep
    # movsb`), auto = hidden on software-KVM hosts only (hw/cpuid.py).
    erms: str = "auto"

    def block_seg_max(self) -> int:
        return self.seg_max if self.seg_max is not None else self.block_queue_size() - 2

    def block_queue_size(self) -> int:
        return self.queue_size or DEFAULT_QUEUE_SIZES["block"]

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> "Knobs":
        text = os.environ.get(BENCH_ENV)
        return cls(**json.loads(text)) if text else cls()


def _int(text: str, name: str) -> int:
    try:
        return int(text, 10)
    except (TypeError, ValueError):
        raise ValueError(f"--{name}={text}: not a whole number") from None


def _queue_size(text: str) -> int:
    n = _int(text, "queue-size")
    if n < MIN_QUEUE_SIZE or n > QUEUE_SIZE_LIMIT or n & (n - 1):
        raise ValueError(f"--queue-size={text}: must be a power of two from {MIN_QUEUE_SIZE} to {QUEUE_SIZE_LIMIT}")
    return n


def _poll_us(text: str) -> float:
    try:
        us = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"--blk-poll-us={text}: not a number of microseconds") from None
    if not 0 <= us <= MAX_POLL_US:      # also refuses nan
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


def _erms(text: str) -> str:
    if text not in ("auto", "on", "off"):
        raise ValueError(f"--erms={text}: must be auto, on or off")
    return text


# option name -> (Knobs field, parser, what the help says about its default)
KNOBS = {
    "queue-size": ("queue_size", _queue_size, "each device's own: " + ", ".join(
        f"{k} {v}" for k, v in DEFAULT_QUEUE_SIZES.items())),
    "blk-poll-us": ("blk_poll_us", _poll_us, f"{DEFAULT_BLK_POLL_US:g}"),
    "event-idx": ("event_idx", _on_off("event-idx"), "on"),
    "indirect": ("indirect", _on_off("indirect"), "on"),
    "seg-max": ("seg_max", _seg_max, "the block queue size - 2"),
    "erms": ("erms", _erms, "auto"),
}
# Knobs of the machine rather than of a device: only `bench sweep ... guest`,
# which boots a guest per value, can measure them.
GUEST_ONLY_KNOBS = ("erms",)


def parse_knobs(values: dict) -> Knobs:
    """``{option name: text or None}`` -> Knobs; ValueError (one line) for a
    bad value or a combination that cannot work."""
    fields = {}
    for name, text in values.items():
        if text is None:
            continue
        if name not in KNOBS:
            raise ValueError(f"unknown knob {name!r}; knobs: {', '.join(KNOBS)}")
        field, parse, _ = KNOBS[name]
        fields[field] = parse(text)
    knobs = Knobs(**fields)
    # §5.2.4: the header and the status byte take two of a chain's descriptors.
    if knobs.block_seg_max() > knobs.block_queue_size() - 2:
        raise ValueError(f"--seg-max={knobs.seg_max}: more than the block queue size ({knobs.block_queue_size()}) "
                         f"- 2 leaves no room for a request's header and status")
    return knobs


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """``NAME=V1,V2,...`` -> (name, [texts]), each value checked as the
    option would check it."""
    name, eq, values = spec.partition("=")
    if not eq or not values:
        raise ValueError(f"--param={spec}: expected NAME=V1,V2,... (knobs: {', '.join(KNOBS)})")
    if name not in KNOBS:
        raise ValueError(f"--param={spec}: unknown knob {name!r}; knobs: {', '.join(KNOBS)}")
    texts = values.split(",")
    if any(not t for t in texts):
        raise ValueError(f"--param={spec}: empty value in the list")
    if len(set(texts)) != len(texts):
        raise ValueError(f"--param={spec}: a value appears twice")
    for t in texts:
        parse_knobs({name: t})
    return name, texts
