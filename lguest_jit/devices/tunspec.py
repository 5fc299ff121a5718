"""The ``--tunnet`` option's grammar (lguest's): ``IP[:MAC]`` or
``bridge:NAME[:MAC]``.  Standard library only, so the CLI refuses a bad
spec before it loads Numba; :mod:`lguest_jit.devices.net` uses the result."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

BRIDGE_PREFIX = "bridge:"
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
_IFNAME_RE = re.compile(r"^[^\s/:]{1,15}$")


@dataclass(frozen=True)
class TunSpec:
    """A parsed ``--tunnet``: exactly one of ``ip`` (host-side IPv4 address)
    and ``bridge`` (name of an existing bridge) is set; ``mac`` is the
    guest's MAC (6 bytes) or None for a random one."""
    ip: str | None = None
    bridge: str | None = None
    mac: bytes | None = None

    def __str__(self) -> str:
        where = BRIDGE_PREFIX + self.bridge if self.bridge is not None else self.ip
        return where if self.mac is None else f"{where}:{format_mac(self.mac)}"


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` -> 6 bytes; ValueError unless a unicast MAC."""
    if not _MAC_RE.match(text):
        raise ValueError(f"bad MAC address {text!r} (want six hex pairs like 52:54:00:12:34:56)")
    mac = bytes(int(p, 16) for p in text.split(":"))
    if mac[0] & 1:
        raise ValueError(f"MAC address {text} is a multicast address; a guest needs a unicast one")
    return mac


def parse_tunnet(spec: str) -> TunSpec:
    """Parse ``IP[:MAC]`` or ``bridge:NAME[:MAC]`` (lguest's --tunnet).
    Raises ValueError with a one-line message naming what is wrong (without
    the option name: the caller prefixes ``--tunnet=SPEC: ``)."""
    if not isinstance(spec, str):
        raise TypeError("--tunnet spec must be a string")
    rest, bridging = spec, spec.startswith(BRIDGE_PREFIX)
    if bridging:
        rest = spec[len(BRIDGE_PREFIX):]
    # As in lguest, the first colon after the address or bridge name starts the MAC.
    where, sep, mac_text = rest.partition(":")
    mac = parse_mac(mac_text) if sep else None
    if bridging:
        if not where:
            raise ValueError("must specify a bridge name after 'bridge:'")
        if not _IFNAME_RE.match(where):
            raise ValueError(f"{where!r} is not a valid bridge name "
                             "(1-15 characters, no spaces, '/' or ':')")
        return TunSpec(bridge=where, mac=mac)
    try:
        ip = ipaddress.IPv4Address(where)
    except ValueError:
        raise ValueError(f"bad IPv4 address {where!r} (want IP[:MAC] or bridge:NAME[:MAC])") from None
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{ip} cannot be an interface address")
    return TunSpec(ip=str(ip), mac=mac)
