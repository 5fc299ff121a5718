"""virtio-blk reads through the whole device path, next to a plain preadv loop.

The device runs as in the launcher: its queue thread in the nogil block
kernel, woken by the queue's notification eventfd, raising its interrupt
eventfd.  The guest side is a small kernel too (a Python driver would
measure Python): it keeps ``depth`` prebuilt read requests in flight,
re-posting each one as it completes, kicks only when the device asked for
notifications, and sleeps on the interrupt like Linux's virtio-blk.  The reference is what
the device's work physically is: a loop of ``os.preadv`` calls reading the
same sizes from the same (page-cached) file.

Multiqueue cases (``mqN_...``): a device with N request queues
(VIRTIO_BLK_F_MQ) driven by N driver threads, one per queue, each with its
own notification eventfd and MSI-X vector (the interrupt-driven driver,
``depth`` requests in flight per queue), next to N threads of the
reference, each a compiled nogil ``preadv`` loop (so the threads share no
GIL) over its own slots.  ``mq_scaling_*`` is the 2-queue rate over the
1-queue rate, for the device and for the reference alike; its
``numba_vs_preadv_loop`` ratio is the device's scaling over the
reference's.  Under ``bench sweep --param=blk-queues=...`` every device
offers that many queues (the single-queue cases use the first, as a
one-CPU guest would).
"""
from __future__ import annotations

import contextlib
import functools
import os
import struct
import tempfile
import threading

import numpy as np
from numba import njit

from lguest_jit import pci, vring
from lguest_jit.devices import Block
from lguest_jit.devices import block as blk
from lguest_jit.hw.libc import host_iov, sys_preadv, sys_read, sys_write
from lguest_jit.hw.memory import (GuestMemory, cpu_relax, fence, ld_u16, ld_u16_acquire, st_u16, st_u16_release, st_u32,
                                  st_u64)
from lguest_jit.testing import VirtioPciDriver

from .common import WARMUP_TIMEOUT, device_knobs, jit_disabled, rate, report, side, throughput, min_time_for

UNIT = "read requests per second and MB/s; depth = requests in flight"
FILE_BYTES = 64 << 20
CASES = [(4096, 1), (4096, 32), (1 << 20, 1), (1 << 20, 32)]
DRIVERS = ("irq", "poll")      # interrupt-driven driver, polling driver
# The benchmark drivers use at most this many entries of the queue the device
# offers (their mock rings reserve a data slot and an indirect table per entry).
DRIVER_MAX_QUEUE = 1024


# Multiqueue cases: (request bytes, queues), each queue with MQ_DEPTH requests in flight.
MQ_CASES = [(4096, 1), (4096, 2), (1 << 20, 1), (1 << 20, 2)]
MQ_DEPTH = 16
MQ_QUEUE = 32                  # entries the multiqueue driver uses of each queue


# Pure Python with --quick measures the interrupt-driven driver only: a
# polling driver spinning in Python holds the GIL its device thread needs, so
# each completion waits out a thread switch interval (5 ms) and those cases
# take long to say little.
PYTHON_QUICK_DRIVERS = ("irq",)
PYTHON_QUICK_NOTE = ("--quick: pure Python measured the interrupt-driven driver only (a polling driver in Python "
                     "holds the GIL its device thread needs); ratios only for cases measured on both sides")
PYTHON_MQ_NOTE = ("pure Python does not measure the multiqueue cases (N driver and N device threads in Python take "
                  "turns on one GIL: they would measure the GIL); ratios only for cases measured on both sides")


def _cases(drivers=DRIVERS) -> list:
    """(name, request bytes, (request bytes, depth, driver)) of every case."""
    return [(f"{'4KiB' if b == 4096 else '1MiB'}_depth{d}_{mode}", b, (b, d, mode))
            for b, d in CASES for mode in drivers]


@njit(nogil=True, cache=True)
def _drive(mem, rings, size, heads, depth, total, notify_fd, irq_fd, event_idx, scratch, poll):
    """Keep ``depth`` requests in flight until ``total`` completed: post,
    kick if the device asked for it, then wait for used entries — sleeping
    on the interrupt like Linux's virtio-blk, or (``poll``) spinning on the
    used index like its polled queues (``poll_queues``).  Returns
    completions, or -1 if waiting on the interrupt failed."""
    avail = rings[1]
    used = rings[2]
    aidx = ld_u16(mem, avail + 2)
    last_used = ld_u16(mem, used + 2)
    posted = 0
    done = 0
    while done < total:
        old = aidx
        while posted - done < depth and posted < total:
            st_u16(mem, avail + 4 + 2 * (aidx & (size - 1)), heads[posted % depth])
            aidx = (aidx + 1) & 0xFFFF
            posted += 1
        if aidx != old:
            st_u16_release(mem, avail + 2, aidx)
            fence()
            if event_idx:
                ev = ld_u16(mem, used + 4 + 8 * size)
                kick = ((aidx - ev - 1) & 0xFFFF) < ((aidx - old) & 0xFFFF)
            else:
                kick = (ld_u16(mem, used) & vring.VRING_USED_F_NO_NOTIFY) == 0
            if kick:
                scratch[0] = 1
                sys_write(notify_fd, scratch.ctypes.data, 8)
        if poll:
            now = ld_u16_acquire(mem, used + 2)
            while now == last_used:
                cpu_relax()
                now = ld_u16_acquire(mem, used + 2)
        # Ask for an interrupt at the next completion (used_event, §2.4.7),
        # then re-check before sleeping so a completion in between is seen.
        while not poll:
            if event_idx:
                st_u16(mem, avail + 4 + 2 * size, last_used)
            fence()
            now = ld_u16_acquire(mem, used + 2)
            if now != last_used:
                break
            if sys_read(irq_fd, scratch.ctypes.data, 8) < 0:
                return -1
        done += (now - last_used) & 0xFFFF
        last_used = now
    return done


@njit(nogil=True, cache=True)
def _drive_packed(mem, rings, size, state, reqs, nrows, ids, slots_of, depth, total, notify_fd, irq_fd, event_idx,
                  scratch, poll):
    """``_drive`` for a packed ring (virtio_ring.c's packed side): request
    k's list is rows reqs[k, :nrows[k]] (addr, len, flags without the lap
    bits) under buffer ID ids[k], written at the next ring slots with the
    lap's AVAIL/USED bits, the first flags last; kicks follow the device
    event suppression structure, used descriptors are found by their flags
    and skipped by their list's length (``slots_of[id]``).  ``state`` holds
    next_avail, avail_wrap, last_used, used_wrap, in and out."""
    ring = rings[0]
    drv_ev = rings[1]
    dev_ev = rings[2]
    pos, wrap, last_used, used_wrap = state[0], state[1], state[2], state[3]
    avail_f = vring.VRING_PACKED_DESC_F_AVAIL
    used_f = vring.VRING_PACKED_DESC_F_USED
    posted = 0
    done = 0
    if event_idx and not poll:
        st_u16(mem, drv_ev, last_used | (used_wrap << 15))
        st_u16_release(mem, drv_ev + 2, vring.RING_EVENT_FLAGS_DESC)
    while done < total:
        added = 0
        while posted - done < depth and posted < total:
            k = posted % depth
            first = pos
            first_flags = 0
            for j in range(nrows[k]):
                d = ring + 16 * pos
                lap = avail_f if wrap else used_f
                st_u64(mem, d, reqs[k, j, 0])
                st_u32(mem, d + 8, reqs[k, j, 1])
                st_u16(mem, d + 12, ids[k])
                if j == 0:
                    first_flags = reqs[k, j, 2] | lap
                else:
                    st_u16(mem, d + 14, reqs[k, j, 2] | lap)
                pos += 1
                if pos == size:
                    pos = 0
                    wrap ^= 1
            st_u16_release(mem, ring + 16 * first + 14, first_flags)
            added += nrows[k]
            posted += 1
        if added:
            fence()
            flags = ld_u16(mem, dev_ev + 2)
            if flags == vring.RING_EVENT_FLAGS_DESC:
                off_wrap = ld_u16(mem, dev_ev)
                event = off_wrap & 0x7FFF
                if (off_wrap >> 15) != wrap:
                    event -= size
                kick = ((pos - event - 1) & 0xFFFF) < (added & 0xFFFF)
            else:
                kick = flags != vring.RING_EVENT_FLAGS_DISABLE
            if kick:
                scratch[0] = 1
                sys_write(notify_fd, scratch.ctypes.data, 8)
        while True:
            fl = ld_u16_acquire(mem, ring + 16 * last_used + 14)
            if ((fl >> 7) & 1) == used_wrap and ((fl >> 15) & 1) == used_wrap:
                break
            if poll:
                cpu_relax()
                continue
            if event_idx:
                st_u16(mem, drv_ev, last_used | (used_wrap << 15))
            fence()
            fl = ld_u16_acquire(mem, ring + 16 * last_used + 14)
            if ((fl >> 7) & 1) == used_wrap and ((fl >> 15) & 1) == used_wrap:
                break
            if sys_read(irq_fd, scratch.ctypes.data, 8) < 0:
                return -1
        # Reap every used descriptor there is.
        while True:
            fl = ld_u16_acquire(mem, ring + 16 * last_used + 14)
            if ((fl >> 7) & 1) != used_wrap or ((fl >> 15) & 1) != used_wrap:
                break
            bid = ld_u16(mem, ring + 16 * last_used + 12)
            last_used += slots_of[bid]
            if last_used >= size:
                last_used -= size
                used_wrap ^= 1
            done += 1
    state[0], state[1], state[2], state[3] = pos, wrap, last_used, used_wrap
    return done


def _packed_driver(gm, q, feats, heads, depth, poll, notify, irq, label):
    rows = [q.rows[int(h)] for h in heads[:depth]]
    width = max(len(r) for r in rows)
    reqs = np.zeros((depth, width, 3), dtype=np.int64)
    for k, r in enumerate(rows):
        reqs[k, :len(r)] = r
    nrows = np.array([len(r) for r in rows], dtype=np.int64)
    ids = np.array(heads[:depth], dtype=np.int64)
    slots_of = np.zeros(65536, dtype=np.int64)
    slots_of[ids] = nrows
    rings = np.array([q.desc, q.avail, q.used], dtype=np.int64)
    event_idx = bool(feats >> vring.VIRTIO_RING_F_EVENT_IDX & 1)
    scratch = np.zeros(1, np.uint64)
    state = np.zeros(4, dtype=np.int64)

    def run(n):
        state[:] = (q.next_avail, q.avail_wrap, q.last_used, q.used_wrap)
        if _drive_packed(gm.mem, rings, q.size, state, reqs, nrows, ids, slots_of, depth, n, notify, irq, event_idx,
                         scratch, poll) != n:
            raise RuntimeError(f"{label}device stopped answering")
        q.next_avail, q.avail_wrap, q.last_used, q.used_wrap = (int(v) for v in state)
        if event_idx and not poll:
            q.event_shadow = vring.RING_EVENT_FLAGS_DESC
    return run


def driver(gm, bus, q, feats, heads, depth, poll=False, queue=0):
    """``run(n)``: ``_drive`` ``n`` requests through queue ``queue`` (the
    bus's ``queue``-th notification; ``q`` its MockDriver, set up, ``heads``
    posted once and drained), keeping the Python-side driver in step.  A
    packed queue (``q.packed``: the driver negotiated VIRTIO_F_RING_PACKED,
    ``--packed=on``) is driven by ``_drive_packed``."""
    return _driver_on(gm, q, feats, heads, depth, poll, bus.ioeventfds()[queue][2], bus.interrupts()[0][1])


def _driver_on(gm, q, feats, heads, depth, poll, notify, irq, label=""):
    """``driver``'s ``run(n)`` on the given notification and interrupt
    eventfds, for either ring layout."""
    if q.packed:
        return _packed_driver(gm, q, feats, heads, depth, poll, notify, irq, label)
    rings = np.array([q.desc, q.avail, q.used], dtype=np.int64)
    event_idx = bool(feats >> vring.VIRTIO_RING_F_EVENT_IDX & 1)
    scratch = np.zeros(1, np.uint64)

    def run(n):
        if _drive(gm.mem, rings, q.size, heads, depth, n, notify, irq, event_idx, scratch, poll) != n:
            raise RuntimeError(f"{label}device stopped answering")
        # Keep the Python-side driver's view in step (for teardown).
        q.avail_shadow = ld_u16(gm.mem, q.avail + 2)
        q.last_used = ld_u16(gm.mem, q.used + 2)
    return run


def drive_rate(gm, bus, q, feats, heads, depth, min_time, poll=False, queue=0) -> float:
    """Requests per second that ``_drive`` keeps going (see ``driver``), as
    ``rate()`` times it.  bench_rng and bench_net drive their devices the
    same way."""
    return rate(driver(gm, bus, q, feats, heads, depth, poll, queue), min_time=min_time)


def _sector(k: int, req_bytes: int) -> int:
    """The sector request slot ``k`` reads, in the device run and in the
    reference loop alike (same file pages, so the same cache behaviour)."""
    return (k * req_bytes // 512) % (FILE_BYTES // 512 - req_bytes // 512)


def _setup(path, req_bytes, depth):
    dev = Block(path)
    dev.apply_knobs(device_knobs())
    qsize = min(dev.queue_max_sizes[0], DRIVER_MAX_QUEUE)
    slot = req_bytes + 8192       # header, the page-aligned data, the status byte
    span = qsize * slot + 16 * qsize * qsize + (2 << 20)     # data slots and indirect tables
    gm = GuestMemory((span + (2 << 20) + 0xFFF) & ~0xFFF)
    bus = pci.Bus(gm)
    t = bus.add_device(dev)
    drv = VirtioPciDriver(bus, t.slot, gm, slot_bytes=slot, queue_span=span)
    feats = drv.init(queue_sizes=[qsize])
    q = drv.queues[0]
    heads = []
    indirect = bool(feats >> vring.VIRTIO_RING_F_INDIRECT_DESC & 1)
    # A smaller queue (bench sweep) holds fewer requests: three descriptors each when direct.
    for k in range(min(depth, qsize if indirect else qsize // 3)):
        hdr = struct.pack("<IIQ", blk.T_IN, 0, _sector(k, req_bytes))
        # As Linux does: indirect, and the data in whole pages (a destination
        # 16 bytes off a page boundary halves preadv's copy rate here).
        # (Without indirect descriptors offered, direct chains of three.)
        heads.append(q.add(out=[hdr], in_=[req_bytes, 1], indirect=indirect, align=4096))
    # Let the device drain the initial posting so the driver kernel starts clean.
    drv.kick(0)
    for _ in heads:
        drv.wait_used(0, timeout=WARMUP_TIMEOUT)
    q.num_added = 0
    return gm, bus, dev, drv, q, np.array(heads, dtype=np.int64), feats


def _device_rate(path, req_bytes, depth, min_time, poll=False):
    gm, bus, dev, drv, q, heads, feats = _setup(path, req_bytes, depth)
    if poll:
        q.disable_cb()      # a polling driver wants no interrupts
    try:
        return drive_rate(gm, bus, q, feats, heads, len(heads), min_time, poll)
    finally:
        bus.close()
        gm.close()


def _preadv_rate(path, req_bytes, depth, min_time):
    # The same physical work as the device: request slot k reads the same
    # sector into its own page-aligned destination in guest memory, in turn.
    fd = os.open(path, os.O_RDONLY)
    stride = req_bytes + 4096
    gm = GuestMemory((depth * stride + 0xFFF) & ~0xFFF)
    bufs = [memoryview(gm.mem[k * stride:k * stride + req_bytes]) for k in range(depth)]
    offsets = [_sector(k, req_bytes) * 512 for k in range(depth)]

    def run(n):
        for i in range(n):
            k = i % depth
            os.preadv(fd, [bufs[k]], offsets[k])
    try:
        return rate(run, min_time=min_time)
    finally:
        os.close(fd)
        bufs.clear()        # the views must go before the mapping can close
        gm.close()


def _size_name(req_bytes: int) -> str:
    return "4KiB" if req_bytes == 4096 else "1MiB"


def _mq_cases() -> list:
    """(name, request bytes, (request bytes, queues)) of the multiqueue cases."""
    return [(f"mq{n}_{_size_name(b)}_depth{MQ_DEPTH}", b, (b, n)) for b, n in MQ_CASES]


def parallel(runs):
    """``run(n)``: ``n`` operations split evenly over ``runs`` (one
    ``run_k(share)`` per thread, the first on the caller's), all started
    together and joined: ``rate()`` of it is the threads' total rate."""
    def run(n):
        shares = [n // len(runs) + (1 if k < n % len(runs) else 0) for k in range(len(runs))]
        errors = []

        def body(k):
            try:
                if shares[k]:
                    runs[k](shares[k])
            except BaseException as exc:      # noqa: BLE001 - re-raised on the caller's thread
                errors.append(exc)
        threads = [threading.Thread(target=body, args=(k,)) for k in range(1, len(runs))]
        for t in threads:
            t.start()
        body(0)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    return run


def msix_driver(gm, drv, qi, feats, heads, depth):
    """``run(n)``: ``_drive`` ``n`` requests through queue ``qi`` of a
    driver that took MSI-X (``drv.init(msix=True)``): the queue's own
    notification eventfd and its vector's eventfd, so N such drivers on N
    threads never take each other's interrupts."""
    notify = next(t.notify_fds[qi] for t in drv.bus.devices if t.slot == drv.slot)
    return _driver_on(gm, drv.queues[qi], feats, heads, depth, False, notify, drv.vector_fd(1 + qi),
                      f"queue {qi}: ")


def _mq_device_rate(path, req_bytes, queues, min_time):
    knobs = device_knobs()
    dev = Block(path, queues=max(queues, knobs.blk_queues or 1))
    dev.apply_knobs(knobs)
    qsize = min(dev.queue_max_sizes[0], MQ_QUEUE)
    slot = req_bytes + 8192
    span = qsize * slot + 16 * qsize * qsize + (1 << 20)
    gm = GuestMemory((0x100000 + queues * span + 0xFFF) & ~0xFFF)
    bus = pci.Bus(gm, msix=True)
    try:
        t = bus.add_device(dev)
        drv = VirtioPciDriver(bus, t.slot, gm, slot_bytes=slot, queue_span=span)
        feats = drv.init(queue_sizes=[qsize] * len(dev.queue_max_sizes), msix=True, enable=range(queues))
        indirect = bool(feats >> vring.VIRTIO_RING_F_INDIRECT_DESC & 1)
        runs = []
        for qi in range(queues):
            q = drv.queues[qi]
            depth = min(MQ_DEPTH, qsize if indirect else qsize // 3)
            heads = [q.add(out=[struct.pack("<IIQ", blk.T_IN, 0, _sector(qi * MQ_DEPTH + k, req_bytes))],
                           in_=[req_bytes, 1], indirect=indirect, align=4096) for k in range(depth)]
            drv.kick(qi)
            for _ in heads:
                drv.wait_used(qi, timeout=WARMUP_TIMEOUT)
            q.num_added = 0
            runs.append(msix_driver(gm, drv, qi, feats, np.array(heads, dtype=np.int64), depth))
        return rate(parallel(runs), min_time=min_time)
    finally:
        bus.close()
        dev.close()
        gm.close()


@njit(nogil=True, cache=True)
def _preadv_loop(fd, hiov, offsets, n):
    """The reference's loop, compiled and without the GIL so N of them run
    side by side: ``n`` preadv calls, slot ``i % depth`` each."""
    depth = offsets.size
    for i in range(n):
        k = i % depth
        if sys_preadv(fd, hiov.ctypes.data + 16 * k, 1, offsets[k]) <= 0:
            return -1
    return n


def _mq_preadv_rate(path, req_bytes, threads, min_time):
    fd = os.open(path, os.O_RDONLY)
    stride = req_bytes + 4096
    gm = GuestMemory((threads * MQ_DEPTH * stride + 0xFFF) & ~0xFFF)
    base = gm.mem.ctypes.data
    runs = []
    for t in range(threads):
        hiov = host_iov(MQ_DEPTH)
        offsets = np.zeros(MQ_DEPTH, dtype=np.int64)
        for k in range(MQ_DEPTH):
            hiov[k] = (base + (t * MQ_DEPTH + k) * stride, req_bytes)
            offsets[k] = _sector(t * MQ_DEPTH + k, req_bytes) * 512

        def run(n, hiov=hiov, offsets=offsets):
            if _preadv_loop(fd, hiov, offsets, n) != n:
                raise RuntimeError("preadv failed")
        runs.append(run)
    try:
        return rate(parallel(runs), min_time=min_time)
    finally:
        os.close(fd)
        gm.close()


def with_scaling(out: dict) -> dict:
    """Add ``mq_scaling_<size>``: the 2-queue (2-thread) rate over the
    1-queue one, for each request size."""
    for b in sorted({b for b, _ in MQ_CASES}):
        one = out.get(f"mq1_{_size_name(b)}_depth{MQ_DEPTH}_requests_per_s")
        two = out.get(f"mq2_{_size_name(b)}_depth{MQ_DEPTH}_requests_per_s")
        if one and two:
            out[f"mq_scaling_{_size_name(b)}"] = two / one
    return out


@contextlib.contextmanager
def _disk():
    d = "/dev/shm" if os.path.isdir("/dev/shm") else None
    f = tempfile.NamedTemporaryFile(prefix="lguest-jit-bench-", dir=d, delete=False)
    try:
        f.write(np.random.default_rng(0).integers(0, 256, FILE_BYTES, dtype=np.uint8).tobytes())
        f.close()
        yield f.name
    finally:
        os.unlink(f.name)


def measure(quick: bool = False) -> dict:
    t = min_time_for(quick)
    cases = _cases(PYTHON_QUICK_DRIVERS if quick and jit_disabled() else DRIVERS)
    with _disk() as path:
        out = throughput(f"bench blk: {side()} device path", cases,
                         lambda c: _device_rate(path, c[0], c[1], t, poll=c[2] == "poll"))
        if not jit_disabled():
            out.update(throughput(f"bench blk: {side()} device path, N queues and N driver threads", _mq_cases(),
                                  lambda c: _mq_device_rate(path, c[0], c[1], t)))
        return with_scaling(out)


def measure_reference(quick: bool = False) -> dict:
    t = min_time_for(quick)
    with _disk() as path:
        preadv = functools.cache(lambda req_bytes, depth: _preadv_rate(path, req_bytes, depth, t))
        # The same loop is the reference for both drivers.
        out = throughput("bench blk: preadv loop", _cases(), lambda c: preadv(c[0], c[1]))
        out.update(throughput("bench blk: N compiled preadv loops on N threads", _mq_cases(),
                              lambda c: _mq_preadv_rate(path, c[0], c[1], t)))
        return with_scaling(out)


def run(quick: bool = False) -> dict:
    return report("blk", UNIT, "benchmarks.bench_blk",
                  quick, measure, measure_reference, "preadv_loop",
                  python_note=(PYTHON_QUICK_NOTE + "; " if quick else "") + PYTHON_MQ_NOTE)
