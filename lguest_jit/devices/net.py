"""virtio-net (device type 1, virtio 1.0 §5.1) over a Linux tap device.

Two queues, receive (0) and transmit (1), each served by its own thread
running one nogil kernel.  The tap is opened with IFF_VNET_HDR and a 12-byte
header size, so frames cross between guest memory and the tap exactly as the
guest lays them out — virtio_net_hdr_v1 first, then the Ethernet frame — with
readv/writev straight on guest memory: no copy, no GIL.

Receive follows lguest's net_input: a chain is taken only once the tap has a
frame for it, and before the thread blocks (in poll for the next frame, or
on the notification eventfd for more buffers) the driver gets its interrupt
for whatever was filled.  Transmit follows net_output: each chain's readable
part is written to the tap as one frame.

Host side (``--tunnet``): ``IP[:MAC]`` gives the tap the address IP/24 and
raises it; ``bridge:NAME[:MAC]`` raises it and adds it to the existing
bridge NAME.  Interface configuration goes through pyroute2 (netlink); only
the tap itself is set up with ioctls on its file descriptor.  MAC is the
guest's address; without one a random locally administered address is used.

Offloads: lguest enables checksum and TSO on the tap unconditionally; here
the tap's offloads follow what the driver negotiated (GUEST_CSUM, GUEST_TSO4,
GUEST_TSO6, GUEST_ECN), so a driver that declines them never receives a
partial checksum or a GSO frame it cannot handle.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

import numpy as np
from numba import njit

from ..hw.libc import (EAGAIN, EINTR, POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT, fill_host_iov, host_iov, pollfds,
                       sys_poll, sys_readv, sys_writev)
from ..vring import (CHAIN_READABLE, CHAIN_WRITABLE, Q_IN, Q_OUT, Q_STOP, STOPPED, complete, finish,
                     next_chain, notify_used, unpop)
from ..hw.memory import put_le
from .base import Device
from .tunspec import BRIDGE_PREFIX, TunSpec, format_mac, parse_mac, parse_tunnet  # noqa: F401

VIRTIO_ID_NET = 1
RX, TX = 0, 1
QUEUE_SIZE = 256

# Feature bits (§5.1.3)
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_STATUS = 16

# virtio_net_hdr_v1 (§5.1.6): with VERSION_1 the header always carries
# num_buffers, so it is 12 bytes whether or not MRG_RXBUF is negotiated.
HDR_SIZE = 12
HDR_NUM_BUFFERS = 10      # offset of num_buffers (le16) in the header
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1

# Config layout (§5.1.4).  status is only meaningful with VIRTIO_NET_F_STATUS,
# which (like lguest) we do not offer; max_virtqueue_pairs only with MQ.
CFG_MAC = 0
CFG_STATUS = 6
CFG_MAX_VQ_PAIRS = 8
CFG_SIZE = 10
VIRTIO_NET_S_LINK_UP = 1

# Host failure of the tap itself: not the driver's fault, never reaches
# driver_error (serve() reports it through on_fatal).  Numbered clear of
# vring's driver-rule codes.
E_TAP = 132

# Per-device counters updated by the kernels (rx and tx use separate fields).
NS_TX_DROPPED = 0     # frames the tap refused (bad GSO header, interface down, ...)
NS_TX_ERRNO = 1       # errno of the last refusal
NS_RX_SPURIOUS = 2    # poll said readable but readv found nothing (chain kept)
NS_RX_ERRNO = 3       # errno of a fatal tap error on receive
NS_TX_BLOCKED = 4     # writev returned EAGAIN and the thread waited for POLLOUT
NS_FIELDS = 5

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
IFNAMSIZ = 16

LGUEST_FEATURES = (1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_MAC
                   | 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6 | 1 << VIRTIO_NET_F_GUEST_ECN
                   | 1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6 | 1 << VIRTIO_NET_F_HOST_ECN)


# ---------------------------------------------------------------------------
# --tunnet parsing lives in tunspec.py (no Numba); these names stay here too.

def random_mac() -> bytes:
    """A random locally administered unicast MAC."""
    mac = bytearray(os.urandom(6))
    mac[0] = (mac[0] & 0xFE) | 0x02
    return bytes(mac)


# ---------------------------------------------------------------------------
# Kernels

@njit(nogil=True, cache=True)
def _poll(pfds, timeout):
    """poll the two rows of ``pfds`` (the tap, then the stop eventfd).
    Returns 1 when the tap is ready, 0 on timeout, STOPPED when the stop
    eventfd fired, or -E_TAP when poll fails or flags the tap (ERR/HUP/NVAL)."""
    while True:
        pfds[0, 1] = pfds[0, 1] & 0xFFFF          # clear revents
        pfds[1, 1] = pfds[1, 1] & 0xFFFF
        r = sys_poll(pfds.ctypes.data, 2, timeout)
        if r == -EINTR:
            if timeout == 0:
                return 0
            continue
        if r < 0:
            return -E_TAP
        if r == 0:
            return 0
        if (pfds[1, 1] >> 16) & 0xFFFF:
            return STOPPED
        rev = (pfds[0, 1] >> 16) & 0xFFFF
        if rev & (POLLERR | POLLHUP | POLLNVAL):
            return -E_TAP
        if rev:
            return 1
        if timeout == 0:
            return 0


@njit(nogil=True, cache=True, inline='always')
def _set_num_buffers(mem, iov, count):
    """Write num_buffers = 1 (little-endian) at header offset 10 of the
    chain's writable buffers, wherever the header is split.  The tap skips
    those two bytes (it writes a 10-byte virtio_net_hdr), and §5.1.6.4 says
    the device MUST set num_buffers to 1 when MRG_RXBUF is not negotiated:
    the buffer would otherwise keep whatever the guest left there."""
    skip = HDR_NUM_BUFFERS
    value = 1
    left = 2
    for k in range(count):
        a = np.int64(iov[k, 0])
        n = np.int64(iov[k, 1])
        if skip >= n:
            skip -= n
            continue
        while skip < n and left > 0:
            mem[a + skip] = value & 0xFF
            value >>= 8
            skip += 1
            left -= 1
        if left == 0:
            return
        skip = 0


@njit(nogil=True, cache=True)
def _rx_serve(mem, q, iov, notify_fd, isr, irq_fd, scratch, hiov, tap_fd, pfds, stats):
    """The receive queue's thread (lguest's net_input, looped)."""
    head = -1        # a chain taken for a frame that was not there after all
    n = 0            # its host iov rows
    # The last readv brought a frame: more are likely queued behind it, so
    # read again before asking poll (a system call per frame; bench net).
    hot = False
    while True:
        if q[Q_STOP]:
            code = STOPPED
            break
        if not hot:
            ready = _poll(pfds, 0)
            if ready == 0:
                # About to block: the driver hears about filled buffers first.
                notify_used(mem, q, isr, irq_fd, scratch)
                ready = _poll(pfds, -1)
            if ready < 0:
                code = ready
                break
            if ready == 0:
                continue
        if head < 0:
            # A frame is waiting: now take a buffer for it (sleeping for one
            # if the driver has none posted; that path signals first too).
            code = next_chain(mem, q, iov, notify_fd, isr, irq_fd, scratch, CHAIN_WRITABLE, HDR_SIZE)
            if code < 0:
                break
            head = code
            n = fill_host_iov(mem, iov, 0, q[Q_IN], hiov)
        r = sys_readv(tap_fd, hiov.ctypes.data, n)
        if r == -EAGAIN or r == -EINTR:
            if hot:
                # The tap ran dry: the chain goes back unused (a chain is
                # held only for a frame known to be there), then poll.
                unpop(q)
                head = -1
                hot = False
                continue
            # Spurious readiness: keep the chain for the next frame.
            stats[NS_RX_SPURIOUS] += 1
            continue
        if r < 0:
            stats[NS_RX_ERRNO] = -r
            code = -E_TAP
            break
        # The tap truncates a frame longer than the buffer; r is what landed
        # (read clamps it to the iovec: scn_host_to_guest checks it).
        if r >= HDR_SIZE:
            _set_num_buffers(mem, iov, q[Q_IN])
        complete(mem, q, head, r, r)
        head = -1
        hot = True
    return finish(mem, q, isr, irq_fd, scratch, code)


@njit(nogil=True, cache=True)
def _send(tap_fd, hiov, n, pfds, stats):
    """writev one frame, waiting for POLLOUT on EAGAIN.  Returns (bytes
    written or -errno of a refused frame, 0), or (0, STOPPED / -E_TAP) when
    the wait ended otherwise; two values so no errno can pose as a stop."""
    while True:
        r = sys_writev(tap_fd, hiov.ctypes.data, n)
        if r == -EINTR:
            continue
        if r != -EAGAIN:
            return r, 0
        stats[NS_TX_BLOCKED] += 1
        w = _poll(pfds, -1)
        if w < 0:
            return 0, w


@njit(nogil=True, cache=True)
def _tx_serve(mem, q, iov, notify_fd, isr, irq_fd, scratch, hiov, tap_fd, pfds, stats):
    """The transmit queue's thread (lguest's net_output, looped)."""
    while True:
        code = next_chain(mem, q, iov, notify_fd, isr, irq_fd, scratch, CHAIN_READABLE, HDR_SIZE)
        if code < 0:
            break
        n = fill_host_iov(mem, iov, 0, q[Q_OUT], hiov)
        r, stop = _send(tap_fd, hiov, n, pfds, stats)
        if stop != 0:
            code = stop
            break
        if r < 0:
            # The tap refused this frame; like lguest, drop it and go on.
            stats[NS_TX_DROPPED] += 1
            stats[NS_TX_ERRNO] = -r
        complete(mem, q, code, 0, max(r, 0))
    return finish(mem, q, isr, irq_fd, scratch, code)


# ---------------------------------------------------------------------------
# Host side: the tap and its interface

def open_tap() -> tuple[int, str]:
    """Create a tap (``tapN``) with a 12-byte vnet header and lguest's
    offloads.  Returns (fd, interface name).  The fd is non-blocking: the
    receive kernel polls before reading."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno, f"--tunnet: cannot open /dev/net/tun: {e.strerror}") from None
    try:
        ifr = struct.pack("16sH22x", b"tap%d", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            raise OSError(e.errno, f"--tunnet: creating a tap device (TUNSETIFF): {e.strerror}") from None
        name = ifr[:IFNAMSIZ].split(b"\0", 1)[0].decode()
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HDR_SIZE))
        except OSError as e:
            raise OSError(e.errno, f"--tunnet: setting the tap's header size to {HDR_SIZE}: {e.strerror}") from None
        set_offload(fd, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
        return fd, name
    except BaseException:
        os.close(fd)
        raise


def set_offload(fd: int, flags: int) -> None:
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError as e:
        raise OSError(e.errno, f"--tunnet: setting tap offloads {flags:#x} (TUNSETOFFLOAD): {e.strerror}") from None


def offload_flags(features: int) -> int:
    """The tap offloads a driver with ``features`` can take on receive.  The
    tap wants TSO only with CSUM and ECN only with TSO (tun's set_offload)."""
    if not features >> VIRTIO_NET_F_GUEST_CSUM & 1:
        return 0
    flags = TUN_F_CSUM
    if features >> VIRTIO_NET_F_GUEST_TSO4 & 1:
        flags |= TUN_F_TSO4
    if features >> VIRTIO_NET_F_GUEST_TSO6 & 1:
        flags |= TUN_F_TSO6
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) and features >> VIRTIO_NET_F_GUEST_ECN & 1:
        flags |= TUN_F_TSO_ECN
    return flags


def configure_interface(ifname: str, spec: TunSpec) -> None:
    """Address and raise the tap, or raise it and enslave it to the bridge
    (netlink through pyroute2).  ValueError for a missing or non-bridge."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise OSError(errno.ENODEV, f"--tunnet={spec}: tap {ifname} vanished before it was configured")
        index = found[0]
        try:
            if spec.bridge is not None:
                br = ipr.link_lookup(ifname=spec.bridge)
                if not br:
                    raise ValueError(f"--tunnet={spec}: bridge {spec.bridge!r} does not exist")
                link = ipr.get_links(br[0])[0]
                info = link.get_attr("IFLA_LINKINFO")
                kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                if kind != "bridge":
                    raise ValueError(f"--tunnet={spec}: {spec.bridge!r} is not a bridge (kind {kind or 'none'})")
                ipr.link("set", index=index, master=br[0])
            else:
                # lguest's SIOCSIFADDR with a /24, as the project chose.
                ipr.addr("add", index=index, address=spec.ip, prefixlen=24)
            ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise OSError(e.code, f"--tunnet={spec}: configuring {ifname}: {os.strerror(e.code)}") from None


# ---------------------------------------------------------------------------
# The device

class Net(Device):
    """``Net(spec, on_fatal=None)``: a network card whose other end is a new
    tap interface configured from ``spec`` (a ``--tunnet`` string or a
    :class:`TunSpec`).  ``ifname`` is the tap's name, ``mac`` the guest's
    MAC.  ``close()`` stops the threads and closes the tap (the kernel then
    deletes the interface)."""

    kind = "net"
    device_type = VIRTIO_ID_NET
    pci_class = (0x02, 0x00)        # network controller, Ethernet
    queue_names = ("rx", "tx")
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, spec, on_fatal=None):
        super().__init__(on_fatal)
        self.spec = parse_tunnet(spec) if isinstance(spec, str) else spec
        if not isinstance(self.spec, TunSpec):
            raise TypeError("spec must be a --tunnet string or a TunSpec")
        self.mac = self.spec.mac or random_mac()
        self.tap_fd = -1
        self.tap_fd, self.ifname = open_tap()
        try:
            configure_interface(self.ifname, self.spec)
        except BaseException:
            os.close(self.tap_fd)
            self.tap_fd = -1
            raise
        self.name = f"net:{self.ifname}"
        self.features = self.RING_FEATURES | LGUEST_FEATURES
        cfg = np.zeros(CFG_SIZE, dtype=np.uint8)
        cfg[CFG_MAC:CFG_MAC + 6] = np.frombuffer(self.mac, dtype=np.uint8)
        put_le(cfg, CFG_STATUS, 2, VIRTIO_NET_S_LINK_UP)
        put_le(cfg, CFG_MAX_VQ_PAIRS, 2, 1)
        self.config = cfg
        self.offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        self.stats = np.zeros(NS_FIELDS, dtype=np.int64)

    def on_activate(self, ctx) -> None:
        flags = offload_flags(ctx.features)
        if flags != self.offloads:
            try:
                set_offload(self.tap_fd, flags)
            except OSError as e:
                # The guest would get frames it cannot parse: stop, loudly.
                self.failed.append(f"{self.name}: {e}")
                self.on_fatal(f"{self.name}: {e}")
                return
            self.offloads = flags

    def serve(self, index, ctx, stop_fd):
        fds = pollfds(2)
        fds[0] = (self.tap_fd, POLLIN if index == RX else POLLOUT)
        fds[1] = (stop_fd, POLLIN)
        kernel = _rx_serve if index == RX else _tx_serve
        code = int(kernel(*self.queue_args(ctx, index), host_iov(self.queue_max_sizes[index]), self.tap_fd, fds, self.stats))
        if code == -E_TAP:
            err = int(self.stats[NS_RX_ERRNO]) if index == RX else 0
            why = os.strerror(err) if err else "poll reported an error on it"
            self.failed.append(f"{self.name}: tap {self.ifname}: {why}")
            self.on_fatal(f"{self.name}: {self.queue_names[index]}: tap {self.ifname} failed: {why}")
            return STOPPED
        return code

    def net_counters(self) -> dict:
        """Host-side events the queue counters do not show."""
        s = self.stats
        return {"tx_dropped": int(s[NS_TX_DROPPED]), "tx_last_errno": int(s[NS_TX_ERRNO]),
                "tx_blocked": int(s[NS_TX_BLOCKED]), "rx_spurious": int(s[NS_RX_SPURIOUS])}

    def close(self) -> None:
        self.reset()
        if self.tap_fd >= 0:
            os.close(self.tap_fd)
            self.tap_fd = -1

    def __del__(self):
        # A Net dropped without close() must not keep its interface alive.
        fd = getattr(self, "tap_fd", -1)
        if fd >= 0 and not self.running:
            try:
                os.close(fd)
            except OSError:
                pass
