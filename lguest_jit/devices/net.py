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

Multiqueue (``pairs=N``, ``--net-queues``; §5.1.6.5.5): N receive/transmit
pairs (queues rx0, tx0, rx1, tx1, ...) and the control queue after them,
VIRTIO_NET_F_MQ and VIRTIO_NET_F_CTRL_VQ offered and ``max_virtqueue_pairs``
= N.  The tap is opened with IFF_MULTI_QUEUE, one file descriptor per pair,
so each pair's threads have their own tap queue.  Only the first pair runs
until the driver sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET; the pairs beyond
the number it sets are parked (their threads wait, their tap queues are
detached so the tap steers no frame to them).  The control queue's kernel
checks every command like any guest input and answers VIRTIO_NET_ERR to
what it does not take (each refusal counted); a valid pair count comes back
to Python, which parks or starts pairs, and only then is it acknowledged.
With N = 1 the device is the single-pair one: no control queue, MQ and
CTRL_VQ not offered, a plain tap.

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
import threading

import numpy as np
from numba import njit

from ..hw.libc import (EAGAIN, EINTR, POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT, fill_host_iov, host_iov, pollfds,
                       sys_poll, sys_readv, sys_writev)
from ..vring import (CHAIN_READABLE, CHAIN_REQUEST, CHAIN_WRITABLE, Q_IN, Q_OUT, Q_OUT_BYTES, Q_STOP, STOPPED,
                     complete, finish, iov_to_buf, next_chain, notify_used, unpop)
from ..hw.memory import ld_u16, put_le, st_u8
from ..hw.fields import Int, Record, U, check
from .base import Device
from .knobs import MAX_DEVICE_QUEUES, MAX_MTU, MIN_MTU, SOFTWARE_KVM_MTU, auto_net_mtu, parse_net_mtu  # noqa: F401
from .tunspec import BRIDGE_PREFIX, TunSpec, format_mac, parse_mac, parse_tunnet  # noqa: F401

VIRTIO_ID_NET = 1
RX, TX = 0, 1
TX_POLL_US = 50.0    # a frame's writev takes a few us; a sleep and wake-up of the thread costs more
QUEUE_SIZE = 256

# Feature bits (§5.1.3)
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22

# The control virtqueue (§5.1.6.5): a readable {u8 class, u8 command,
# data}, then a writable ack byte.
VIRTIO_NET_OK, VIRTIO_NET_ERR = 0, 1
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000
CTRL_HDR = 2
CTRL_QUEUE_SIZE = 64
CTRL_BUF = 64             # command bytes copied out of the guest (a pairs-set has 2 after the header)
# _ctrl_serve's return when the driver set a new pair count: the command
# is held, unanswered, until Python has parked or started the pairs.
CTRL_APPLY = 1

# The device's multiqueue state, one int64 array the control kernel and
# Python share.
MQ_ACTIVE = 0             # queue pairs in use (1 until the driver sets more, §5.1.6.5.5)
MQ_MAX = 1                # max_virtqueue_pairs when MQ was negotiated, else 0 (the class is not offered)
MQ_WANTED = 2             # the pair count of the held command
MQ_HELD = 3               # head of the held command's chain, -1: none
MQ_ACK_AT = 4             # guest address of its ack byte
NC_OK = 5                 # commands acknowledged VIRTIO_NET_OK
NC_BAD_CLASS = 6          # refusals (VIRTIO_NET_ERR), by reason: a class the device does not offer
NC_BAD_COMMAND = 7        # a command its class does not have
NC_BAD_LENGTH = 8         # command data of the wrong size
NC_BAD_PAIRS = 9          # a pair count outside 1..max_virtqueue_pairs
MQ_FIELDS = 10
CTRL_COUNTERS = {"ok": NC_OK, "err_class": NC_BAD_CLASS, "err_command": NC_BAD_COMMAND,
                 "err_length": NC_BAD_LENGTH, "err_pairs": NC_BAD_PAIRS}

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
CFG_MTU = 10
CFG_SIZE = 12
DEFAULT_MTU = 1500        # a tap's own, and what a driver without VIRTIO_NET_F_MTU assumes
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
TUNSETQUEUE = 0x400454D9
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
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


@njit(nogil=True, cache=True)
def _ctrl_serve(mem, q, iov, notify_fd, isr, irq_fd, scratch, buf, mq):
    """The control queue's thread (§5.1.6.5).  Every command gets its ack
    byte; the ones the device does not take get VIRTIO_NET_ERR and a count
    by reason.  A valid VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET returns CTRL_APPLY
    with its chain held (``mq[MQ_HELD]``): the next call, once Python has
    applied the count, acknowledges it.  Otherwise returns STOPPED or -E_*."""
    if mq[MQ_HELD] >= 0:
        st_u8(mem, mq[MQ_ACK_AT], VIRTIO_NET_OK)
        mq[NC_OK] += 1
        complete(mem, q, mq[MQ_HELD], 1, 0)
        mq[MQ_HELD] = -1
    while True:
        head = next_chain(mem, q, iov, notify_fd, isr, irq_fd, scratch, CHAIN_REQUEST, CTRL_HDR)
        if head < 0:
            break
        last = q[Q_OUT] + q[Q_IN] - 1
        ack_at = np.int64(iov[last, 0] + iov[last, 1]) - 1     # checked in RAM by the pop; shape: >= 1 byte
        iov_to_buf(mem, iov, 0, q[Q_OUT], buf)
        length = q[Q_OUT_BYTES] - CTRL_HDR
        cls = np.int64(buf[0])
        cmd = np.int64(buf[1])
        if cls != VIRTIO_NET_CTRL_MQ or mq[MQ_MAX] == 0:
            mq[NC_BAD_CLASS] += 1          # RX, MAC, VLAN, ANNOUNCE, offloads: their features are not offered
        elif cmd != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET:
            mq[NC_BAD_COMMAND] += 1        # RSS_CONFIG / HASH_CONFIG need features not offered (§5.1.6.5.6)
        elif length != 2:
            mq[NC_BAD_LENGTH] += 1         # virtqueue_pairs is one le16
        else:
            pairs = ld_u16(buf, CTRL_HDR)
            if pairs < VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN or pairs > mq[MQ_MAX]:
                mq[NC_BAD_PAIRS] += 1
            else:
                mq[MQ_WANTED] = pairs
                mq[MQ_ACK_AT] = ack_at
                mq[MQ_HELD] = head
                return finish(mem, q, isr, irq_fd, scratch, CTRL_APPLY)
        st_u8(mem, ack_at, VIRTIO_NET_ERR)
        complete(mem, q, head, 1, 0)
    return finish(mem, q, isr, irq_fd, scratch, head)


# ---------------------------------------------------------------------------
# Host side: the tap and its interface

def open_tap() -> tuple[int, str]:
    """Create a tap (``tapN``) with a 12-byte vnet header and lguest's
    offloads.  Returns (fd, interface name).  The fd is non-blocking: the
    receive kernel polls before reading."""
    fds, name = open_tap_queues(1)
    return fds[0], name


def open_tap_queues(queues: int) -> tuple[list, str]:
    """A tap as ``open_tap`` makes it, with ``queues`` queues: more than one
    opens it IFF_MULTI_QUEUE, one file descriptor per queue (the first
    creates the interface, each other attaches to it by name).  Returns
    (fds, interface name)."""
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    fds: list = []
    name = "tap%d"
    try:
        for _ in range(queues):
            try:
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise OSError(e.errno, f"--tunnet: cannot open /dev/net/tun: {e.strerror}") from None
            fds.append(fd)
            ifr = struct.pack("16sH22x", name.encode(), flags)
            try:
                ifr = fcntl.ioctl(fd, TUNSETIFF, ifr)
            except OSError as e:
                what = "creating a tap device" if len(fds) == 1 else f"adding queue {len(fds) - 1} to {name}"
                raise OSError(e.errno, f"--tunnet: {what} (TUNSETIFF): {e.strerror}") from None
            name = ifr[:IFNAMSIZ].split(b"\0", 1)[0].decode()
        # The header size and offloads are the interface's, set once.
        try:
            fcntl.ioctl(fds[0], TUNSETVNETHDRSZ, struct.pack("i", HDR_SIZE))
        except OSError as e:
            raise OSError(e.errno, f"--tunnet: setting the tap's header size to {HDR_SIZE}: {e.strerror}") from None
        set_offload(fds[0], TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
        return fds, name
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def set_tap_queue(fd: int, attached: bool) -> None:
    """Attach a multiqueue tap's queue ``fd`` (the tap steers frames to it)
    or detach it (it gets none; its fd stays open)."""
    try:
        fcntl.ioctl(fd, TUNSETQUEUE, struct.pack("16sH22x", b"", IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE))
    except OSError as e:
        raise OSError(e.errno, f"--tunnet: {'attaching' if attached else 'detaching'} a tap queue (TUNSETQUEUE): "
                      f"{e.strerror}") from None


def set_offload(fd: int, flags: int) -> None:
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError as e:
        raise OSError(e.errno, f"--tunnet: setting tap offloads {flags:#x} (TUNSETOFFLOAD): {e.strerror}") from None


def set_mtu(ifname: str, mtu: int) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                raise OSError(errno.ENODEV, f"tap {ifname} vanished")
            ipr.link("set", index=found[0], mtu=mtu)
    except NetlinkError as e:
        raise OSError(e.code, f"setting the MTU of {ifname} to {mtu}: {os.strerror(e.code)}") from None


def resolve_mtu(choice: str, spec: TunSpec, software_kvm: bool | None = None) -> int:
    """The MTU a device offers for ``--net-mtu=choice`` (0: none offered);
    auto as ``knobs.auto_net_mtu`` says, the host probed only then (a
    machine built by the launcher arrives with auto already resolved)."""
    choice = parse_net_mtu(choice)
    if choice == "auto":
        if software_kvm is None:
            from ..hw.hosts import software_kvm as probe
            software_kvm = probe() is not None
        choice = auto_net_mtu(software_kvm, spec.bridge is not None)
    if choice == "off":
        return 0
    mtu = int(choice)
    if spec.bridge is not None:
        raise ValueError(f"--net-mtu={choice}: the tap of --tunnet={spec} takes its bridge's MTU; "
                         "use --net-mtu=off, or an addressed tap (--tunnet=IP)")
    return mtu


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


def configure_interface(ifname: str, spec: TunSpec, mtu: int = 0) -> None:
    """Address and raise the tap (with ``mtu`` when not 0), or raise it and
    enslave it to the bridge (netlink through pyroute2).  ValueError for a
    missing or non-bridge."""
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
                if mtu:
                    ipr.link("set", index=index, mtu=mtu)
            ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise OSError(e.code, f"--tunnet={spec}: configuring {ifname}: {os.strerror(e.code)}") from None


# ---------------------------------------------------------------------------
# The device

class Net(Device):
    """``Net(spec, on_fatal=None, pairs=1)``: a network card whose other end
    is a new tap interface configured from ``spec`` (a ``--tunnet`` string
    or a :class:`TunSpec`).  ``ifname`` is the tap's name, ``mac`` the
    guest's MAC.  ``pairs`` > 1 offers that many queue pairs and the
    control queue (module docstring).  ``close()`` stops the threads and
    closes the tap (the kernel then deletes the interface)."""

    kind = "net"
    device_type = VIRTIO_ID_NET
    pci_class = (0x02, 0x00)        # network controller, Ethernet
    queue_names = ("rx", "tx")
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    @classmethod
    def from_options(cls, options, env):
        pairs = getattr(env.knobs, "net_queues", None) or 1
        spec = options["spec"]
        spec = parse_tunnet(spec) if isinstance(spec, str) else spec
        mtu = resolve_mtu(getattr(env.knobs, "net_mtu", "off"), spec)
        return cls(on_fatal=env.on_fatal, pairs=pairs, mtu=mtu, **dict(options, spec=spec))

    tx_poll_us = TX_POLL_US

    def __init__(self, spec, on_fatal=None, pairs: int = 1, mtu: int = 0):
        if not 1 <= pairs <= MAX_DEVICE_QUEUES:
            raise ValueError(f"net: {pairs} queue pairs (must be from 1 to {MAX_DEVICE_QUEUES})")
        if mtu and not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"net: MTU {mtu} (must be from {MIN_MTU} to {MAX_MTU}, or 0 for none offered)")
        self.pairs = pairs
        if pairs > 1:
            # receiveq1, transmitq1, ..., then the control queue (§5.1.2).
            self.queue_names = tuple(f"{d}{k}" for k in range(pairs) for d in ("rx", "tx")) + ("ctrl",)
            self.queue_max_sizes = (QUEUE_SIZE,) * (2 * pairs) + (CTRL_QUEUE_SIZE,)
        super().__init__(on_fatal)
        self.spec = parse_tunnet(spec) if isinstance(spec, str) else spec
        if not isinstance(self.spec, TunSpec):
            raise TypeError("spec must be a --tunnet string or a TunSpec")
        self.mac = self.spec.mac or random_mac()
        if mtu and self.spec.bridge is not None:
            raise ValueError(f"net: an MTU for the tap of --tunnet={self.spec}, which takes its bridge's")
        self.mtu = mtu
        self.tap_fd = -1
        self.tap_fds: list = []
        self.tap_fds, self.ifname = open_tap_queues(pairs)
        self.tap_fd = self.tap_fds[0]
        try:
            configure_interface(self.ifname, self.spec, mtu)
        except BaseException:
            self._close_taps()
            raise
        self.name = f"net:{self.ifname}"
        self.features = self.RING_FEATURES | LGUEST_FEATURES
        if pairs > 1:
            self.features |= 1 << VIRTIO_NET_F_MQ | 1 << VIRTIO_NET_F_CTRL_VQ
        cfg = np.zeros(CFG_SIZE, dtype=np.uint8)
        cfg[CFG_MAC:CFG_MAC + 6] = np.frombuffer(self.mac, dtype=np.uint8)
        put_le(cfg, CFG_STATUS, 2, VIRTIO_NET_S_LINK_UP)
        put_le(cfg, CFG_MAX_VQ_PAIRS, 2, pairs)
        if mtu:
            # §5.1.4: the device's maximum MTU; Linux takes it as eth0's and,
            # above 1500, posts receive chains big enough for a whole frame.
            self.features |= 1 << VIRTIO_NET_F_MTU
            put_le(cfg, CFG_MTU, 2, mtu)
        self.config = cfg
        self.offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        self._tap_mtu = mtu or DEFAULT_MTU
        self.stats = np.zeros(NS_FIELDS, dtype=np.int64)
        # Multiqueue: which pairs run (mq, shared with the control kernel),
        # which tap queues are attached, and per pair an eventfd that stops
        # its threads' waits (the device's stop_fd stops them all).
        self.mq = np.zeros(MQ_FIELDS, dtype=np.int64)
        self.mq[MQ_ACTIVE] = 1
        self.mq[MQ_HELD] = -1
        self._attached = [True] * pairs
        self._pair_stop = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(pairs)] if pairs > 1 else []
        self._cond = threading.Condition()
        self._parked: set = set()       # queue indices waiting for their pair to be in use
        self._serving: set = set()      # queue indices of pairs > 0 whose thread is in serve()
        self._features = 0
        if pairs > 1:
            self._sync_tap_queues()

    def queue_poll_us(self, index: int) -> float:
        """Transmit queues busy-poll for the next frame before sleeping: a
        driver sending a stream posts it while we still look, and neither
        side pays a notification and a wake-up per burst.  Receive queues
        wait on the tap, the control queue is rare: they never poll."""
        return self.tx_poll_us if index < 2 * self.pairs and index % 2 == TX else 0.0

    # -- multiqueue
    def _roles(self, features: int) -> dict:
        """Queue index -> (role, pair) under the negotiated ``features``:
        without MQ only the first pair exists and, with CTRL_VQ, the
        control queue is queue 2 (§5.1.2: N = 1)."""
        if self.pairs == 1:
            return {RX: ("rx", 0), TX: ("tx", 0)}
        if features >> VIRTIO_NET_F_MQ & 1:
            roles = {2 * k + d: ("rx" if d == RX else "tx", k) for k in range(self.pairs) for d in (RX, TX)}
            if features >> VIRTIO_NET_F_CTRL_VQ & 1:
                roles[2 * self.pairs] = ("ctrl", 0)
            return roles
        roles = {RX: ("rx", 0), TX: ("tx", 0)}
        if features >> VIRTIO_NET_F_CTRL_VQ & 1:
            roles[2] = ("ctrl", 0)
        return roles

    def _sync_tap_queues(self, active: int | None = None) -> None:
        """Attach the tap queues of the first ``active`` pairs (default: those
        in use), detach the others: no thread polls a detached one (a poll
        there fails), its pair is parked first and started after."""
        active = int(self.mq[MQ_ACTIVE]) if active is None else active
        for k, fd in enumerate(self.tap_fds):
            want = k < active
            if self._attached[k] != want:
                set_tap_queue(fd, want)
                self._attached[k] = want

    def _set_pairs(self, ctx, wanted: int) -> None:
        """The driver set ``wanted`` pairs (checked by the control kernel):
        park the pairs beyond it (their threads out of their kernels, then
        their tap queues detached), or attach and start the new ones."""
        active = int(self.mq[MQ_ACTIVE])
        if wanted < active:
            with self._cond:
                self.mq[MQ_ACTIVE] = wanted
            for k in range(wanted, active):
                for i in (2 * k, 2 * k + 1):
                    q = ctx.queues[i]
                    if q is not None:
                        q[Q_STOP] = 1
                        os.eventfd_write(ctx.notify_fds[i], 1)
                os.eventfd_write(self._pair_stop[k], 1)
            with self._cond:
                # A thread that ended (a driver error) is as good as parked.
                self._cond.wait_for(lambda: self._stopping or all(
                    i in self._parked or i not in self._serving
                    for k in range(wanted, active) for i in (2 * k, 2 * k + 1)))
                if self._stopping:
                    return          # threads may still poll; on_activate detaches at the next start
            self._sync_tap_queues(wanted)
            return
        self._sync_tap_queues(wanted)
        for k in range(max(active, 1), wanted):
            try:
                os.eventfd_read(self._pair_stop[k])     # left set when the pair was parked
            except BlockingIOError:
                pass
        with self._cond:
            self.mq[MQ_ACTIVE] = wanted
            self._cond.notify_all()

    def _wait_active(self, index: int, pair: int) -> bool:
        """Park queue ``index`` until its pair is in use; False when the
        device stops instead."""
        with self._cond:
            while not self._stopping and pair >= self.mq[MQ_ACTIVE]:
                self._parked.add(index)
                self._cond.notify_all()
                self._cond.wait()
            self._parked.discard(index)
            return not self._stopping

    def _stop_threads(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for fd in self._pair_stop:
            os.eventfd_write(fd, 1)
        super()._stop_threads()
        for fd in self._pair_stop:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass

    def on_activate(self, ctx) -> None:
        self._features = ctx.features
        self.mq[MQ_MAX] = self.pairs if ctx.features >> VIRTIO_NET_F_MQ & 1 and self.pairs > 1 else 0
        if self.mq[MQ_MAX] == 0:
            self.mq[MQ_ACTIVE] = 1
        flags = offload_flags(ctx.features)
        try:
            if self.pairs > 1:
                self._sync_tap_queues()
            # A driver that declined VIRTIO_NET_F_MTU assumes 1500 and posts
            # buffers for that: the tap must not hand it larger frames.
            want = self.mtu if ctx.features >> VIRTIO_NET_F_MTU & 1 else DEFAULT_MTU
            if self.mtu and want != self._tap_mtu:
                set_mtu(self.ifname, want)
                self._tap_mtu = want
            if flags != self.offloads:
                set_offload(self.tap_fd, flags)
                self.offloads = flags
        except OSError as e:
            # The guest would get frames it cannot parse: stop, loudly.
            self.failed.append(f"{self.name}: {e}")
            self.on_fatal(f"{self.name}: {e}")

    def reset(self) -> None:
        super().reset()
        # §5.1.6.5.5: after a reset only the first pair is in use.
        self.mq[MQ_ACTIVE] = 1
        self.mq[MQ_HELD] = -1
        self._parked.clear()
        if self.pairs > 1 and self.tap_fds:
            self._sync_tap_queues()       # the threads are gone: no poll on a queue being detached

    def serve(self, index, ctx, stop_fd):
        role, pair = self._roles(self._features).get(index, (None, 0))
        if role is None:
            return STOPPED          # a queue the negotiated features do not have: nothing to serve
        if role == "ctrl":
            return self._serve_ctrl(index, ctx)
        if pair == 0:
            return self._serve_pair(index, ctx, stop_fd, role, pair)
        with self._cond:
            self._serving.add(index)
        try:
            return self._serve_pair(index, ctx, stop_fd, role, pair)
        finally:
            with self._cond:
                self._serving.discard(index)
                self._cond.notify_all()

    def _serve_pair(self, index, ctx, stop_fd, role, pair):
        while True:
            if pair > 0 and not self._wait_active(index, pair):
                return STOPPED
            tap = self.tap_fds[pair]
            fds = pollfds(2)
            fds[0] = (tap, POLLIN if role == "rx" else POLLOUT)
            fds[1] = (self._pair_stop[pair] if pair > 0 else stop_fd, POLLIN)
            kernel = _rx_serve if role == "rx" else _tx_serve
            code = int(kernel(*self.queue_args(ctx, index), host_iov(self.queue_max_sizes[index]), tap, fds,
                              self.stats))
            if pair > 0 and code == STOPPED:
                with self._cond:
                    if self._stopping:
                        return STOPPED
                    # The pair was parked: ready for its next start.  Its
                    # stop eventfd stays set (the pair's other queue may not
                    # have seen it yet); _set_pairs clears it at the start.
                    ctx.queues[index][Q_STOP] = 0
                continue
            if code == -E_TAP:
                err = int(self.stats[NS_RX_ERRNO]) if role == "rx" else 0
                why = os.strerror(err) if err else "poll reported an error on it"
                self.failed.append(f"{self.name}: tap {self.ifname}: {why}")
                self.on_fatal(f"{self.name}: {self.queue_names[index]}: tap {self.ifname} failed: {why}")
                return STOPPED
            return code

    def _serve_ctrl(self, index, ctx):
        args = self.queue_args(ctx, index)
        buf = np.zeros(CTRL_BUF, np.uint8)
        while True:
            code = int(_ctrl_serve(*args, buf, self.mq))
            if code != CTRL_APPLY:
                return code
            self._set_pairs(ctx, int(self.mq[MQ_WANTED]))

    def counters(self) -> dict:
        out = super().counters()
        if self.pairs > 1:
            out["ctrl"].update({f"commands_{k}": int(self.mq[i]) for k, i in CTRL_COUNTERS.items()})
            out["ctrl"]["pairs_in_use"] = int(self.mq[MQ_ACTIVE])
        return out

    # -- snapshots: the pairs in use and the control queue's counters (the
    # queues' own state is the transport's)
    STATE = Record({"pairs_in_use": Int(1, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX),
                    "commands": Record({k: U(62) for k in CTRL_COUNTERS}),
                    "mtu": Int(0, MAX_MTU)})

    def save_state(self) -> dict:
        return {"pairs_in_use": int(self.mq[MQ_ACTIVE]),
                "commands": {k: int(self.mq[i]) for k, i in CTRL_COUNTERS.items()}, "mtu": self.mtu}

    def load_state(self, state: dict) -> None:
        st = check(self.STATE, state, self.name)
        # The guest's driver read the MTU at probe: it must not change under it.
        if st["mtu"] != self.mtu:
            raise ValueError(f"{self.name}: snapshot's device offered MTU {st['mtu'] or 'none'}, this one "
                             f"{self.mtu or 'none'}")
        if st["pairs_in_use"] > self.pairs:
            raise ValueError(f"{self.name}: snapshot uses {st['pairs_in_use']} queue pairs, the device has "
                             f"{self.pairs}")
        self.mq[MQ_ACTIVE] = st["pairs_in_use"]
        for k, i in CTRL_COUNTERS.items():
            self.mq[i] = st["commands"][k]

    def net_counters(self) -> dict:
        """Host-side events the queue counters do not show."""
        s = self.stats
        return {"tx_dropped": int(s[NS_TX_DROPPED]), "tx_last_errno": int(s[NS_TX_ERRNO]),
                "tx_blocked": int(s[NS_TX_BLOCKED]), "rx_spurious": int(s[NS_RX_SPURIOUS])}

    def _close_taps(self) -> None:
        for fd in self.tap_fds + self._pair_stop if hasattr(self, "_pair_stop") else self.tap_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.tap_fds = []
        self._pair_stop = []
        self.tap_fd = -1

    def close(self) -> None:
        self.reset()
        self._close_taps()

    def __del__(self):
        # A Net dropped without close() must not keep its interface alive.
        if getattr(self, "tap_fds", None) and not self.running:
            self._close_taps()
