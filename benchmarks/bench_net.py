"""virtio-net through the whole device path, next to a plain tap read/write loop.

Transmit: the driver kernel (bench_blk's, as for every device benchmark)
keeps ``depth`` prebuilt frames in flight on the transmit queue; the
device's queue thread writes each one to its tap (writev straight from
guest memory).  The frames are addressed to another host's MAC, so the
host stack drops them on arrival: what is measured is the path to the tap.

Receive: ``batch`` frames are queued on the tap's host side first (an
AF_PACKET socket sending out of the tap, with a virtio-net header so a
64 KiB frame goes as one TCP segmentation-offload frame), then the timer
starts and the driver kernel posts buffers until the device has filled
one per frame (readv from the tap straight into guest memory).

Sizes: 64 B, 1500 B and 64 KiB frames (the last with the offloads the
driver negotiated: TSO and checksum offload, GSO frames across the tap).
The reference is a plain loop of ``os.writev`` / ``os.readv`` calls on a
second tap made the same way, moving the same frames.  ``bench net`` runs
the two case by case (device, loop, loop, device, each side's best kept),
so both sides of a ratio see the same load; per frame the device thread
spends no more CPU time than the loop, and what it loses on a busy host is
waiting for a core at each hand-over between driver and device thread.

Multiqueue cases (``mqN_...``): a device with N queue pairs (VIRTIO_NET_F_MQ,
N set in use through the control queue) on an IFF_MULTI_QUEUE tap, driven
by N driver threads, one per transmit (or receive) queue with its own
MSI-X vector, next to N threads of the reference, each a compiled nogil
``writev``/``readv`` loop on its own queue of a multiqueue tap.  Receive
batches are split between the queues by flow: the frames for queue k
carry a source port the tap steers to its queue k (found once, on a probe
tap: the steering hash is the host's, the same for every tap with N
queues).  ``bench net`` alternates them with the reference case by case
as it does the single-queue cases.  ``mq_scaling_*`` is the 2-pair rate
over the 1-pair rate, device and reference alike (its
``numba_vs_tap_loop`` ratio: the device's scaling over the reference's).

Everything runs in a private network namespace (``unshare --net``, as the
net tests do), checked to hold nothing but its loopback: no frame can reach
the host's network.  Each side runs in its own namespace, in a subprocess.
"""
from __future__ import annotations

import functools
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

from numba import njit

from lguest_jit.hw.libc import EAGAIN, EINTR, sys_readv, sys_writev

UNIT = "frames per second and MB/s; tx: guest to tap, rx: tap to guest"
# (name, Ethernet frame bytes, GSO): 64 KiB is the vnet header plus the frame.
SIZES = [("64B", 64, False), ("1500B", 1500, False), ("64KiB", 65536 - 12, True)]
DIRECTIONS = ("tx", "rx")
CASES = [(d, s) for s in SIZES for d in DIRECTIONS]
DEPTH = 64                     # transmit frames in flight
DRIVER_QUEUE = 256             # entries of each queue the driver uses
HOST_IP, REF_IP = "10.0.2.2", "10.0.3.2"
GUEST_MAC = bytes.fromhex("525400123456")
OTHER_MAC = bytes.fromhex("020000000099")     # nobody's: the host drops what is sent to it
NETNS_ENV = "LGUEST_JIT_BENCH_NETNS"
# virtio_net_hdr (§5.1.6): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR = struct.Struct("<BBHHHH")
NEEDS_CSUM, GSO_TCPV4 = 1, 1
SOL_PACKET, PACKET_VNET_HDR = 263, 15
ROUND_TIMEOUT = 60.0
MAX_ROUNDS = 1000


def _frame(size: int, gso: bool, sport: int = 40000) -> tuple[bytes, bytes]:
    """(12-byte vnet header, Ethernet frame of ``size`` bytes): IPv4 TCP
    for GSO (checksum left to the offload), else UDP, from port ``sport``."""
    proto = 6 if gso else 17
    ip_len = size - 14
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 1, 0x4000, 64, proto, 0, socket.inet_aton("10.0.2.15"),
                      socket.inet_aton("10.0.2.99"))
    if gso:
        l4 = struct.pack("!HHIIBBHHH", sport, 5001, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
        hdr = VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16) + bytes(2)
    else:
        l4 = struct.pack("!HHHH", sport, 5001, ip_len - 20, 0)
        hdr = bytes(12)
    eth = OTHER_MAC + GUEST_MAC + b"\x08\x00"
    body = eth + iph + l4
    return hdr, body + bytes(size - len(body))


@functools.cache
def netns_problem() -> str | None:
    """None when a private network namespace with a tap can be made here."""
    from lguest_jit.testing import netns_problem as problem
    return problem()


def _in_netns(func: str, quick: bool) -> dict:
    """``func(quick)`` of this module in a fresh network namespace (the
    environment, NUMBA_DISABLE_JIT included, is inherited)."""
    if os.environ.get(NETNS_ENV) == "1":
        return globals()[f"_{func}_here"](quick)
    problem = netns_problem()
    if problem:
        raise RuntimeError(f"bench net: {problem}")
    code = f"import json, benchmarks.bench_net as m; print('\\n' + json.dumps(m.{func}({bool(quick)!r})))"
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", code], env=dict(os.environ, **{NETNS_ENV: "1"}),
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _check_private_namespace() -> None:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        names = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    if names != {"lo"}:
        raise RuntimeError(f"bench net: not a fresh network namespace ({sorted(names)}); refusing to touch it")
    for conf in ("all", "default"):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                f.write("1")       # no IPv6 chatter on the taps
        except OSError:
            pass


def _long_queue(ifname: str, frames: int) -> None:
    """Room on the tap's host side for a whole receive batch."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], txqlen=max(1000, 2 * frames))


class _Injector:
    """Sends frames out of a tap (they arrive on its file descriptor), with
    a virtio-net header so a GSO frame goes as one."""

    def __init__(self, ifname: str):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        self.sock.bind((ifname, 0))

    def send(self, hdr: bytes, frame: bytes, count: int) -> None:
        msg = hdr[:10] + frame           # the socket's header has no num_buffers
        for _ in range(count):
            self.sock.send(msg)

    def close(self) -> None:
        self.sock.close()


def _batch(quick: bool, gso: bool) -> int:
    from .common import jit_disabled
    if jit_disabled():
        return 32
    return (64 if gso else 128) if quick else (256 if gso else 1024)


def _rounds(quick: bool) -> int:
    # Many short rounds, the best kept: a receive batch hands the CPU between
    # the driver and the device thread a few times, and on a busy host one
    # such hand-over can wait milliseconds for a core.
    return 5 if quick else 15


def _round_budget(min_time: float) -> float:
    """Seconds of receive rounds (fills included) to run past the first
    ``_rounds``: on a host whose cores other work keeps busy, a round with
    no preemption in it comes one time in tens, and the device side's two
    hand-overs per round make that rarer than for the one-thread loop;
    both sides get the same budget."""
    return 4 * min_time


def _best_rate(rounds: int, batch: int, fill, drain, budget: float = 0.0) -> float:
    """Frames per second of the fastest drain of ``batch`` frames, each
    queued by ``fill()`` first (not timed): at least ``rounds`` rounds, and
    more until ``budget`` seconds have gone (at most MAX_ROUNDS)."""
    best = None
    start = time.perf_counter()
    k = 0
    while k < rounds or (time.perf_counter() - start < budget and k < MAX_ROUNDS):
        fill()
        t0 = time.perf_counter()
        drain()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
        k += 1
    return batch / best


def _device_rate(direction: str, size: int, gso: bool, quick: bool, min_time: float) -> float:
    import numpy as np

    from lguest_jit import pci, vring
    from lguest_jit.devices.net import RX, TX, Net, TunSpec
    from lguest_jit.hw.memory import GuestMemory
    from lguest_jit.testing import VirtioPciDriver

    from .bench_blk import driver
    from .common import WARMUP_TIMEOUT, device_knobs, rate

    dev = Net(TunSpec(ip=HOST_IP, mac=GUEST_MAC))
    dev.apply_knobs(device_knobs())
    qsize = min(dev.queue_max_sizes[0], DRIVER_QUEUE)
    slot = 12 + size + 8192
    span = qsize * slot + 16 * qsize * qsize + (2 << 20)
    gm = GuestMemory((0x100000 + 2 * span + 0xFFF) & ~0xFFF)
    bus = pci.Bus(gm)
    inject = None
    try:
        t = bus.add_device(dev)
        drv = VirtioPciDriver(bus, t.slot, gm, slot_bytes=slot, queue_span=span)
        feats = drv.init(queue_sizes=[qsize, qsize])
        hdr, frame = _frame(size, gso)
        if direction == "tx":
            q = drv.queues[TX]
            heads = [q.add(out=[hdr + frame]) for _ in range(min(DEPTH, qsize))]
            drv.kick(TX)
            for _ in heads:
                drv.wait_used(TX, timeout=WARMUP_TIMEOUT)
            q.num_added = 0
            r = rate(driver(gm, bus, q, feats, np.array(heads, np.int64), len(heads), queue=TX), min_time=min_time)
            if dev.net_counters()["tx_dropped"]:
                raise RuntimeError(f"bench net: the tap refused {size}-byte frames "
                                   f"(errno {dev.net_counters()['tx_last_errno']})")
            return r
        batch = _batch(quick, gso)
        _long_queue(dev.ifname, batch)
        inject = _Injector(dev.ifname)
        q = drv.queues[RX]
        indirect = bool(feats >> vring.VIRTIO_RING_F_INDIRECT_DESC & 1)
        depth = min(batch, qsize if indirect else qsize // 2)
        # The vnet header and the frame in two buffers, as Linux posts them.
        heads = [q.add(in_=[12, size], indirect=indirect) for _ in range(depth)]
        # Warm-up (and compilation): one frame per posted buffer, so none is
        # left posted; each timed batch posts its own.
        drv.kick(RX)
        inject.send(hdr, frame, depth)
        for _ in heads:
            _check_whole(drv.wait_used(RX, timeout=WARMUP_TIMEOUT)[1], size)
        q.num_added = 0
        run = driver(gm, bus, q, feats, np.array(heads, np.int64), depth, queue=RX)
        return _guarded_rate(_rounds(quick), batch, lambda: inject.send(hdr, frame, batch), lambda: run(batch),
                             lambda: inject.send(hdr, frame, batch), _round_budget(min_time))
    finally:
        if inject is not None:
            inject.close()
        bus.close()
        dev.close()
        gm.close()


def _check_whole(got: int, size: int) -> None:
    """A frame arrived as sent (a GSO frame not cut into segments)."""
    if got != 12 + size:
        raise RuntimeError(f"bench net: a {size}-byte frame arrived as {got - 12} bytes (offloads not in effect?)")


def _guarded_rate(rounds, batch, fill, drain, unstick, budget) -> float:
    """_best_rate, with a watchdog: if frames were lost on the host side the
    driver would wait for them forever, so after ROUND_TIMEOUT more are sent
    and the run fails instead of hanging."""
    done = threading.Event()
    stuck = []

    def watch():
        while not done.wait(ROUND_TIMEOUT):
            stuck.append(True)
            unstick()
    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        r = _best_rate(rounds, batch, fill, drain, budget)
    finally:
        done.set()
        w.join()
    if stuck:
        raise RuntimeError("bench net: frames queued on the tap never reached the device")
    return r


def _plain_rate(direction: str, size: int, gso: bool, quick: bool, min_time: float) -> float:
    from lguest_jit.devices.net import TunSpec, configure_interface, open_tap

    from .common import rate

    from lguest_jit.hw.memory import GuestMemory
    fd, ifname = open_tap()
    inject = views = None
    try:
        configure_interface(ifname, TunSpec(ip=REF_IP))
        hdr, frame = _frame(size, gso)
        # As many buffers as the device cycles through, in the same kind of
        # memory (a cache-hot single buffer would flatter the loop).
        slots = min(DEPTH, DRIVER_QUEUE) if direction == "tx" else min(_batch(quick, gso), DRIVER_QUEUE)
        stride = -(-(12 + size) // 4096) * 4096
        gm = GuestMemory(slots * stride)
        views = [(memoryview(gm.mem[k * stride:k * stride + 12]), memoryview(gm.mem[k * stride + 12:k * stride + 12 + size]))
                 for k in range(slots)]
        if direction == "tx":
            for h, f in views:
                h[:] = hdr
                f[:] = frame

            def run(n):
                for i in range(n):
                    os.writev(fd, views[i % slots])
            return rate(run, min_time=min_time)
        batch = _batch(quick, gso)
        _long_queue(ifname, batch)
        inject = _Injector(ifname)

        def drain():
            got = 0
            while got < batch:
                try:
                    os.readv(fd, views[got % slots])
                except BlockingIOError:
                    continue      # the tap is non-blocking, as the device's
                got += 1
        inject.send(hdr, frame, 1)
        while True:
            try:
                _check_whole(os.readv(fd, views[0]), size)
                break
            except BlockingIOError:
                pass
        return _best_rate(_rounds(quick), batch, lambda: inject.send(hdr, frame, batch), drain, _round_budget(min_time))
    finally:
        if inject is not None:
            inject.close()
        os.close(fd)
        if views is not None:
            views.clear()     # the views must go before the mapping can close
            gm.close()


# ---------------------------------------------------------------------------
# Multiqueue: N pairs and N driver threads against N compiled tap loops.

MQ_SIZES = [("1500B", 1500, False), ("64KiB", 65536 - 12, True)]
MQ_PAIRS = (1, 2)
PROBE_IP = "10.0.4.2"


def _mq_cases() -> list:
    """(name, frame bytes, (direction, size, gso, pairs)) of the multiqueue cases."""
    return [(f"mq{p}_{d}_{name}", size, (d, size, gso, p)) for name, size, gso in MQ_SIZES for d in DIRECTIONS
            for p in MQ_PAIRS]


@functools.cache
def _steered_ports(pairs: int, size: int, gso: bool) -> tuple:
    """A source port per tap queue whose frames a ``pairs``-queue tap
    steers to that queue (found on a probe tap of its own)."""
    import select

    from lguest_jit.devices.net import TunSpec, configure_interface, open_tap_queues
    if pairs == 1:
        return (40000,)
    fds, ifname = open_tap_queues(pairs)
    inject = None
    try:
        configure_interface(ifname, TunSpec(ip=PROBE_IP))
        inject = _Injector(ifname)
        found = {}
        for sport in range(40000, 40512):
            hdr, frame = _frame(size, gso, sport)
            inject.send(hdr, frame, 1)
            ready, _, _ = select.select(fds, [], [], 1.0)
            for fd in ready:
                while True:
                    try:
                        os.read(fd, 1 << 17)
                    except BlockingIOError:
                        break
                found.setdefault(fds.index(fd), sport)
            if len(found) == pairs:
                return tuple(found[k] for k in range(pairs))
        raise RuntimeError(f"bench net: no flow found for every one of {pairs} tap queues")
    finally:
        if inject is not None:
            inject.close()
        for fd in fds:
            os.close(fd)


def _mq_device_rate(direction: str, size: int, gso: bool, pairs: int, quick: bool, min_time: float) -> float:
    import numpy as np

    from lguest_jit import pci, vring
    from lguest_jit.devices.net import VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, Net, TunSpec
    from lguest_jit.hw.memory import GuestMemory
    from lguest_jit.testing import VirtioPciDriver

    from .bench_blk import msix_driver, parallel
    from .common import WARMUP_TIMEOUT, device_knobs, rate

    ports = _steered_ports(pairs, size, gso) if direction == "rx" else None
    knobs = device_knobs()
    dev = Net(TunSpec(ip=HOST_IP, mac=GUEST_MAC), pairs=max(pairs, knobs.net_queues or 1))
    dev.apply_knobs(knobs)
    qsize = min(dev.queue_max_sizes[0], DRIVER_QUEUE)
    slot = 12 + size + 8192
    span = qsize * slot + 16 * qsize * qsize + (2 << 20)
    nq = len(dev.queue_max_sizes)
    gm = GuestMemory((0x100000 + nq * span + 0xFFF) & ~0xFFF)
    bus = pci.Bus(gm, msix=True)
    inject = None
    try:
        t = bus.add_device(dev)
        drv = VirtioPciDriver(bus, t.slot, gm, slot_bytes=slot, queue_span=span)
        feats = drv.init(queue_sizes=[qsize] * nq, msix=True)
        if dev.pairs > 1:
            # The pairs in use, set as Linux's virtnet_set_queues does.
            ctrl = nq - 1
            drv.queues[ctrl].add(out=[bytes([VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET]),
                                      struct.pack("<H", pairs)], in_=[1])
            drv.kick(ctrl)
            if drv.wait_used(ctrl, timeout=WARMUP_TIMEOUT)[2][-1][0] != 0:
                raise RuntimeError("bench net: the device refused the pair count")
        if direction == "tx":
            hdr, frame = _frame(size, gso)
            runs = []
            for k in range(pairs):
                qi = 2 * k + 1
                q = drv.queues[qi]
                heads = [q.add(out=[hdr + frame]) for _ in range(min(DEPTH, qsize))]
                drv.kick(qi)
                for _ in heads:
                    drv.wait_used(qi, timeout=WARMUP_TIMEOUT)
                q.num_added = 0
                runs.append(msix_driver(gm, drv, qi, feats, np.array(heads, np.int64), len(heads)))
            r = rate(parallel(runs), min_time=min_time)
            if dev.net_counters()["tx_dropped"]:
                raise RuntimeError(f"bench net: the tap refused {size}-byte frames")
            return r
        batch = _batch(quick, gso)
        _long_queue(dev.ifname, batch)
        inject = _Injector(dev.ifname)
        indirect = bool(feats >> vring.VIRTIO_RING_F_INDIRECT_DESC & 1)
        share = batch // pairs
        frames = [_frame(size, gso, ports[k]) for k in range(pairs)]
        runs = []
        for k in range(pairs):
            qi = 2 * k
            q = drv.queues[qi]
            depth = min(share, qsize if indirect else qsize // 2)
            heads = [q.add(in_=[12, size], indirect=indirect) for _ in range(depth)]
            drv.kick(qi)
            inject.send(*frames[k], depth)
            for _ in heads:
                _check_whole(drv.wait_used(qi, timeout=WARMUP_TIMEOUT)[1], size)
            q.num_added = 0
            runs.append(msix_driver(gm, drv, qi, feats, np.array(heads, np.int64), depth))
        drain = parallel(runs)

        def fill():
            for k in range(pairs):
                inject.send(*frames[k], share)
        return _guarded_rate(_rounds(quick), share * pairs, fill, lambda: drain(share * pairs), fill,
                             _round_budget(min_time))
    finally:
        if inject is not None:
            inject.close()
        bus.close()
        dev.close()
        gm.close()


@njit(nogil=True, cache=True)
def _writev_loop(fd, hiov, slots, n):
    """The multiqueue reference's transmit loop, compiled without the GIL
    so N threads run side by side: ``n`` writev calls of (header, frame)."""
    for i in range(n):
        while True:
            r = sys_writev(fd, hiov.ctypes.data + 32 * (i % slots), 2)
            if r != -EAGAIN and r != -EINTR:
                break
        if r < 0:
            return -1
    return n


@njit(nogil=True, cache=True)
def _readv_loop(fd, hiov, slots, n):
    """... and its receive loop: ``n`` frames read, spinning on the
    non-blocking tap as the plain loop does."""
    got = 0
    while got < n:
        r = sys_readv(fd, hiov.ctypes.data + 32 * (got % slots), 2)
        if r == -EAGAIN or r == -EINTR:
            continue
        if r < 0:
            return -1
        got += 1
    return got


def _mq_plain_rate(direction: str, size: int, gso: bool, pairs: int, quick: bool, min_time: float) -> float:
    from lguest_jit.devices.net import TunSpec, configure_interface, open_tap_queues
    from lguest_jit.hw.libc import host_iov
    from lguest_jit.hw.memory import GuestMemory

    from .bench_blk import parallel
    from .common import rate

    ports = _steered_ports(pairs, size, gso) if direction == "rx" else (40000,) * pairs
    fds, ifname = open_tap_queues(pairs)
    inject = gm = None
    try:
        configure_interface(ifname, TunSpec(ip=REF_IP))
        batch = _batch(quick, gso)
        share = batch // pairs
        slots = min(DEPTH, DRIVER_QUEUE) if direction == "tx" else min(share, DRIVER_QUEUE)
        stride = -(-(12 + size) // 4096) * 4096
        gm = GuestMemory(pairs * slots * stride)
        base = gm.mem.ctypes.data
        frames = [_frame(size, gso, ports[k]) for k in range(pairs)]
        iovs = []
        for k in range(pairs):
            hiov = host_iov(2 * slots)
            for j in range(slots):
                at = (k * slots + j) * stride
                hiov[2 * j] = (base + at, 12)
                hiov[2 * j + 1] = (base + at + 12, size)
                if direction == "tx":
                    gm.mem[at:at + 12] = memoryview(frames[k][0])
                    gm.mem[at + 12:at + 12 + size] = memoryview(frames[k][1])
            iovs.append(hiov)
        loop = _writev_loop if direction == "tx" else _readv_loop

        def runner(k):
            def run(n):
                if loop(fds[k], iovs[k], slots, n) != n:
                    raise RuntimeError("bench net: tap loop failed")
            return run
        par = parallel([runner(k) for k in range(pairs)])
        if direction == "tx":
            return rate(par, min_time=min_time)
        _long_queue(ifname, batch)
        inject = _Injector(ifname)

        def fill():
            for k in range(pairs):
                inject.send(*frames[k], share)
        for k in range(pairs):          # warm-up (and compilation)
            inject.send(*frames[k], 1)
        par(pairs)
        return _best_rate(_rounds(quick), share * pairs, fill, lambda: par(share * pairs), _round_budget(min_time))
    finally:
        if inject is not None:
            inject.close()
        for fd in fds:
            os.close(fd)
        if gm is not None:
            gm.close()


def with_scaling(out: dict) -> dict:
    """``mq_scaling_<direction>_<size>``: the 2-pair rate over the 1-pair one."""
    for name, _, _ in MQ_SIZES:
        for d in DIRECTIONS:
            one, two = out.get(f"mq1_{d}_{name}_frames_per_s"), out.get(f"mq2_{d}_{name}_frames_per_s")
            if one and two:
                out[f"mq_scaling_{d}_{name}"] = two / one
    return out


def _cases() -> list:
    """(name, frame bytes, (direction, size, gso)) of every case."""
    return [(f"{d}_{name}", size, (d, size, gso)) for d, (name, size, gso) in CASES]


def _measure_here(quick: bool) -> dict:
    from .common import jit_disabled, min_time_for, side, throughput
    _check_private_namespace()
    t = min_time_for(quick)
    out = throughput(f"bench net: {side()} device path", _cases(), lambda c: _device_rate(*c, quick, t))
    if not jit_disabled():      # N threads of pure Python would measure the GIL
        out.update(throughput(f"bench net: {side()} device path, N pairs and N driver threads", _mq_cases(),
                              lambda c: _mq_device_rate(*c, quick, t)))
    return with_scaling({k.replace("requests_per_s", "frames_per_s"): v for k, v in out.items()})


def _measure_reference_here(quick: bool) -> dict:
    from .common import min_time_for, throughput
    _check_private_namespace()
    t = min_time_for(quick)
    out = throughput("bench net: plain tap loop", _cases(), lambda c: _plain_rate(*c, quick, t))
    out.update(throughput("bench net: N compiled tap loops on a multiqueue tap", _mq_cases(),
                          lambda c: _mq_plain_rate(*c, quick, t)))
    return with_scaling({k.replace("requests_per_s", "frames_per_s"): v for k, v in out.items()})


def _measure_pair_here(quick: bool) -> dict:
    """Both sides case by case, in the order device, loop, loop, device
    (each side's best kept; one of each with --quick): on a host whose
    load changes from one second to the next, the two sides of a ratio
    are measured under the same conditions.  The N-pair cases follow the
    single-queue ones, alternating the same way."""
    from .common import jit_disabled, live, min_time_for
    _check_private_namespace()
    t = min_time_for(quick)
    sides = {"device": {}, "reference": {}}
    order = ("device", "reference") if quick else ("device", "reference", "reference", "device")
    cases = [(*c, {"device": _device_rate, "reference": _plain_rate}) for c in _cases()]
    if not jit_disabled():      # as in _measure_here
        cases += [(*c, {"device": _mq_device_rate, "reference": _mq_plain_rate}) for c in _mq_cases()]
    with live("bench net: numba device path and plain tap loop, case by case", len(cases)) as step:
        for name, req_bytes, params, measure_side in cases:
            step(name)
            best = {}
            for which in order:
                best[which] = max(best.get(which, 0.0), measure_side[which](*params, quick, t))
            for which, fps in best.items():
                sides[which][f"{name}_frames_per_s"] = fps
                sides[which][f"{name}_MB_per_s"] = fps * req_bytes / 1e6
    return {which: with_scaling(out) for which, out in sides.items()}


def measure(quick: bool = False) -> dict:
    return _in_netns("measure", quick)


def measure_reference(quick: bool = False) -> dict:
    return _in_netns("measure_reference", quick)


def measure_pair(quick: bool = False) -> dict:
    """``{"device": measure(), "reference": measure_reference()}``, the
    cases interleaved in one namespace (what ``run`` reports)."""
    return _in_netns("measure_pair", quick)


def run(quick: bool = False) -> dict:
    from .common import report
    problem = netns_problem()
    if problem:
        return {"benchmark": "net", "skipped": problem}
    pair = {}

    def device(q):
        pair.update(measure_pair(q))
        return pair["device"]
    return report("net", UNIT, "benchmarks.bench_net", quick, device, lambda q: pair["reference"], "tap_loop")
