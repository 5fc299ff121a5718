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


def _frame(size: int, gso: bool) -> tuple[bytes, bytes]:
    """(12-byte vnet header, Ethernet frame of ``size`` bytes): IPv4 TCP
    for GSO (checksum left to the offload), else UDP."""
    proto = 6 if gso else 17
    ip_len = size - 14
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 1, 0x4000, 64, proto, 0, socket.inet_aton("10.0.2.15"),
                      socket.inet_aton("10.0.2.99"))
    if gso:
        l4 = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
        hdr = VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16) + bytes(2)
    else:
        l4 = struct.pack("!HHHH", 40000, 5001, ip_len - 20, 0)
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


def _cases() -> list:
    """(name, frame bytes, (direction, size, gso)) of every case."""
    return [(f"{d}_{name}", size, (d, size, gso)) for d, (name, size, gso) in CASES]


def _measure_here(quick: bool) -> dict:
    from .common import min_time_for, side, throughput
    _check_private_namespace()
    t = min_time_for(quick)
    out = throughput(f"bench net: {side()} device path", _cases(), lambda c: _device_rate(*c, quick, t))
    return {k.replace("requests_per_s", "frames_per_s"): v for k, v in out.items()}


def _measure_reference_here(quick: bool) -> dict:
    from .common import min_time_for, throughput
    _check_private_namespace()
    t = min_time_for(quick)
    out = throughput("bench net: plain tap loop", _cases(), lambda c: _plain_rate(*c, quick, t))
    return {k.replace("requests_per_s", "frames_per_s"): v for k, v in out.items()}


def _measure_pair_here(quick: bool) -> dict:
    """Both sides case by case, in the order device, loop, loop, device
    (each side's best kept; one of each with --quick): on a host whose
    load changes from one second to the next, the two sides of a ratio
    are measured under the same conditions."""
    from .common import live, min_time_for
    _check_private_namespace()
    t = min_time_for(quick)
    sides = {"device": {}, "reference": {}}
    order = ("device", "reference") if quick else ("device", "reference", "reference", "device")
    measure_side = {"device": _device_rate, "reference": _plain_rate}
    with live("bench net: numba device path and plain tap loop, case by case", len(_cases())) as step:
        for name, req_bytes, params in _cases():
            step(name)
            best = {}
            for which in order:
                best[which] = max(best.get(which, 0.0), measure_side[which](*params, quick, t))
            for which, fps in best.items():
                sides[which][f"{name}_frames_per_s"] = fps
                sides[which][f"{name}_MB_per_s"] = fps * req_bytes / 1e6
    return sides


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
