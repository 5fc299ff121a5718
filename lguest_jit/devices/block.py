"""virtio-blk (device type 2, virtio 1.0 §5.2) over a host file.

One request queue, or with ``queues=N`` (``--blk-queues``) N of them
(VIRTIO_BLK_F_MQ, §5.2.3; ``num_queues`` in the config, §5.2.4), each
served by its own thread over the one file: preadv/pwritev carry their
offset, so the threads share nothing but the descriptor.  Every request goes straight between the file and guest
memory with preadv/pwritev issued from a nogil kernel: no intermediate copy,
no GIL.  Beyond lguest: DISCARD and WRITE_ZEROES via fallocate, and a
request reaching past the end of the disk is refused *before* anything is
written (lguest wrote first and truncated after).

Request layout (§5.2.6): a 16-byte header {u32 type, u32 reserved, u64
sector} in the device-readable part, data, and a status byte as the last
byte of the device-writable part.
"""
from __future__ import annotations

import os

import numpy as np
from numba import njit

from ..hw.libc import (EINTR, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fill_host_iov,
                       host_iov, sys_fallocate, sys_fdatasync, sys_preadv, sys_pwritev)
from ..hw.memory import ld_u32, ld_u64, put_le, st_u8
from ..vring import (CHAIN_REQUEST, Q_IN, Q_IN_BYTES, Q_N_BYTES, Q_OUT, Q_OUT_BYTES, buf_to_iov, complete, finish,
                     iov_advance, iov_consume, iov_to_buf, next_chain)
from .base import Device
from .knobs import MAX_DEVICE_QUEUES, check_seg_max

VIRTIO_ID_BLOCK = 2
SECTOR = 512

# Feature bits (§5.2.3)
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types and status values (§5.2.6)
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
BLK_S_OK, BLK_S_IOERR, BLK_S_UNSUPP = 0, 1, 2
HDR_SIZE = 16
ID_BYTES = 20
WRITE_ZEROES_UNMAP = 1

# Config layout (§5.2.4)
CFG_CAPACITY = 0
CFG_SEG_MAX = 12
CFG_NUM_QUEUES = 34
CFG_MAX_DISCARD_SECTORS = 36
CFG_MAX_DISCARD_SEG = 40
CFG_DISCARD_ALIGN = 44
CFG_MAX_WZ_SECTORS = 48
CFG_MAX_WZ_SEG = 52
CFG_WZ_MAY_UNMAP = 56
CFG_SIZE = 60

QUEUE_SIZE = 128
POLL_US = 50.0      # a 4 KiB read takes ~1.5 us; a sleep and wake-up costs several
MAX_DISCARD_SECTORS = (1 << 32) - 1 - 7     # 512-byte sectors, 4 KiB aligned
MAX_DISCARD_SEGS = 16

# Limits passed to the kernel, one int64 array.
L_CAPACITY, L_READONLY, L_MAX_SECTORS, L_MAX_SEGS = 0, 1, 2, 3


@njit(nogil=True, cache=True)
def _rw_all(fd, hiov, n, offset, write):
    """preadv/pwritev all of hiov[:n] at ``offset``, resuming after short
    transfers.  Returns bytes moved, or -1 on error or end of file."""
    done = 0
    k = 0
    while k < n:
        addr = hiov.ctypes.data + 16 * k
        if write:
            r = sys_pwritev(fd, addr, n - k, offset + done)
        else:
            r = sys_preadv(fd, addr, n - k, offset + done)
        if r == -EINTR:
            continue
        if r <= 0:
            return -1
        done += r
        k = iov_advance(hiov, k, n, r)
    return done


@njit(nogil=True, cache=True)
def _fallocate_ranges(mem, q, iov, nout, fd, segs, limits, zeroes):
    """DISCARD / WRITE_ZEROES (§5.2.6): a table of {u64 sector, u32
    num_sectors, u32 flags} segments, copied out of the guest once and
    validated whole before the file is touched."""
    data = q[Q_OUT_BYTES] - HDR_SIZE
    if data <= 0 or data % 16 != 0:
        return BLK_S_UNSUPP
    nseg = data // 16
    if nseg > limits[L_MAX_SEGS] or 16 * nseg > segs.size:
        return BLK_S_UNSUPP
    if limits[L_READONLY]:
        return BLK_S_IOERR
    iov_to_buf(mem, iov, 0, nout, segs[:16 * nseg])
    last_sector = limits[L_CAPACITY] // SECTOR
    allowed_flags = WRITE_ZEROES_UNMAP if zeroes else 0
    for s in range(nseg):
        sector = ld_u64(segs, 16 * s)
        num = ld_u32(segs, 16 * s + 8)
        if ld_u32(segs, 16 * s + 12) & ~allowed_flags:
            return BLK_S_UNSUPP
        if num > limits[L_MAX_SECTORS] or sector < 0 or sector > last_sector or num > last_sector - sector:
            return BLK_S_IOERR
    for s in range(nseg):
        off = ld_u64(segs, 16 * s) * SECTOR
        length = ld_u32(segs, 16 * s + 8) * SECTOR
        if length == 0:
            continue
        if zeroes:
            r = sys_fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, length)
            if r < 0:
                # Filesystems without ZERO_RANGE (tmpfs): a hole reads as zeroes too.
                r = sys_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
        else:
            r = sys_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
        if r < 0:
            return BLK_S_IOERR
    return BLK_S_OK


@njit(nogil=True, cache=True)
def _blk_request(mem, q, iov, hiov, hdr, segs, fd, limits, ident):
    """One request, its shape checked by next_chain (CHAIN_REQUEST).
    Writes the status byte; returns the used length."""
    nout = q[Q_OUT]
    nin = q[Q_IN]
    last = nout + nin - 1
    status_at = np.int64(iov[last, 0] + iov[last, 1]) - 1
    iov[last, 1] = iov[last, 1] - np.uint64(1)
    iov_to_buf(mem, iov, 0, nout, hdr)
    iov_consume(iov, 0, nout, HDR_SIZE)
    rtype = ld_u32(hdr, 0)
    sector = ld_u64(hdr, 8)
    capacity = limits[L_CAPACITY]
    in_bytes = q[Q_IN_BYTES] - 1
    out_bytes = q[Q_OUT_BYTES] - HDR_SIZE
    status = BLK_S_OK
    used = 0
    if rtype == T_IN or rtype == T_OUT:
        nbytes = in_bytes if rtype == T_IN else out_bytes
        # §5.2.6.2: past the end is an error; check before touching the file.
        if sector < 0 or sector > capacity // SECTOR or nbytes > capacity - sector * SECTOR:
            status = BLK_S_IOERR
        elif rtype == T_OUT and limits[L_READONLY]:
            status = BLK_S_IOERR
        else:
            if rtype == T_IN:
                n = fill_host_iov(mem, iov, nout, nin, hiov)
            else:
                n = fill_host_iov(mem, iov, 0, nout, hiov)
            if n > 0 and _rw_all(fd, hiov, n, sector * SECTOR, rtype == T_OUT) != nbytes:
                status = BLK_S_IOERR
            elif rtype == T_IN:
                used = nbytes
            q[Q_N_BYTES] += nbytes
    elif rtype == T_FLUSH:
        if sys_fdatasync(fd) < 0:
            status = BLK_S_IOERR
    elif rtype == T_GET_ID:
        used = buf_to_iov(mem, iov, nout, nin, ident, min(ID_BYTES, in_bytes))
    elif rtype == T_DISCARD or rtype == T_WRITE_ZEROES:
        status = _fallocate_ranges(mem, q, iov, nout, fd, segs, limits, rtype == T_WRITE_ZEROES)
    else:
        status = BLK_S_UNSUPP
    st_u8(mem, status_at, status)
    return used + 1


@njit(nogil=True, cache=True)
def _blk_serve(mem, q, iov, notify_fd, isr, irq_fd, scratch, hiov, hdr, segs, fd, limits, ident):
    """The request queue's thread: until stopped or the driver breaks a rule."""
    while True:
        head = next_chain(mem, q, iov, notify_fd, isr, irq_fd, scratch, CHAIN_REQUEST, HDR_SIZE)
        if head < 0:
            break
        complete(mem, q, head, _blk_request(mem, q, iov, hiov, hdr, segs, fd, limits, ident), 0)
    return finish(mem, q, isr, irq_fd, scratch, head)


class Block(Device):
    """``Block(path, readonly=False)``: a disk backed by ``path``.  A file
    that cannot be opened for writing, or ``readonly=True``, gives a
    read-only disk (VIRTIO_BLK_F_RO)."""

    kind = "block"
    device_type = VIRTIO_ID_BLOCK
    pci_class = (0x01, 0x80)        # mass storage controller, other
    queue_names = ("requests",)
    queue_max_sizes = (QUEUE_SIZE,)
    poll_us = POLL_US

    @classmethod
    def from_options(cls, options, env):
        queues = getattr(env.knobs, "blk_queues", None) or 1
        return cls(on_fatal=env.on_fatal, queues=queues, **options)

    def __init__(self, path: str, readonly: bool = False, on_fatal=None, queues: int = 1):
        if not 1 <= queues <= MAX_DEVICE_QUEUES:
            raise ValueError(f"block: {queues} request queues (must be from 1 to {MAX_DEVICE_QUEUES})")
        if queues > 1:
            # Linux names them by index too (/sys/block/vdX/mq/N).
            self.queue_names = tuple(f"requests{i}" for i in range(queues))
            self.queue_max_sizes = (QUEUE_SIZE,) * queues
        super().__init__(on_fatal)
        self.path = path
        self.name = f"block:{os.path.basename(path)}"
        if not readonly:
            try:
                self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                readonly = True
        if readonly:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.readonly = readonly
        size = os.fstat(self.fd).st_size
        self.capacity_bytes = size - size % SECTOR
        self.features = (self.RING_FEATURES | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_FLUSH
                         | 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES
                         | (1 << VIRTIO_BLK_F_RO if readonly else 0)
                         | (1 << VIRTIO_BLK_F_MQ if queues > 1 else 0))
        cfg = np.zeros(CFG_SIZE, dtype=np.uint8)
        put_le(cfg, CFG_CAPACITY, 8, self.capacity_bytes // SECTOR)
        put_le(cfg, CFG_SEG_MAX, 4, QUEUE_SIZE - 2)            # header and status take two
        put_le(cfg, CFG_MAX_DISCARD_SECTORS, 4, MAX_DISCARD_SECTORS)
        put_le(cfg, CFG_MAX_DISCARD_SEG, 4, MAX_DISCARD_SEGS)
        put_le(cfg, CFG_DISCARD_ALIGN, 4, 4096 // SECTOR)
        put_le(cfg, CFG_MAX_WZ_SECTORS, 4, MAX_DISCARD_SECTORS)
        put_le(cfg, CFG_MAX_WZ_SEG, 4, MAX_DISCARD_SEGS)
        put_le(cfg, CFG_WZ_MAY_UNMAP, 1, 1)
        if queues > 1:
            put_le(cfg, CFG_NUM_QUEUES, 2, queues)
        self.config = cfg
        self.limits = np.array([self.capacity_bytes, int(readonly), MAX_DISCARD_SECTORS, MAX_DISCARD_SEGS],
                               dtype=np.int64)
        ident = os.path.basename(path).encode()[:ID_BYTES]
        self.ident = np.zeros(ID_BYTES, dtype=np.uint8)
        self.ident[:len(ident)] = np.frombuffer(ident, dtype=np.uint8)

    def apply_knobs(self, knobs) -> None:
        super().apply_knobs(knobs)
        if knobs.blk_poll_us is not None:
            self.poll_us = knobs.blk_poll_us
        check_seg_max(knobs.seg_max, self.queue_max_sizes[0])
        seg_max = knobs.seg_max if knobs.seg_max is not None else self.queue_max_sizes[0] - 2
        put_le(self.config, CFG_SEG_MAX, 4, seg_max)

    def serve(self, index, ctx, stop_fd):
        return int(_blk_serve(*self.queue_args(ctx, index), host_iov(self.queue_max_sizes[index]), np.zeros(HDR_SIZE, np.uint8),
                              np.zeros(16 * MAX_DISCARD_SEGS, np.uint8), self.fd, self.limits, self.ident))

    def close(self) -> None:
        self.reset()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
