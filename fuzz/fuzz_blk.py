"""Target: virtio-blk's request kernel (devices/block._blk_request) on
chains popped by the vring engine, against a shadow disk: a plain model of
§5.2.6 that says what the disk file and guest memory must hold afterwards.
The disk is a memfd; guest RAM keeps its guard pages."""
from __future__ import annotations

import os
import struct

import numpy as np

from lguest_jit import vring
from lguest_jit.devices import block as blk
from lguest_jit.hw.libc import host_iov

from .common import Reader, digest, main
from .ring import Ring, apply_writes, gather

SECTORS = 16
_fd = None


def _disk(r: Reader) -> bytes:
    global _fd
    if _fd is None:
        _fd = os.memfd_create("fuzz-disk", os.MFD_CLOEXEC)
    seed = r.u8()
    img = bytes((i * 13 + seed) & 0xFF for i in range(SECTORS * blk.SECTOR))
    os.ftruncate(_fd, 0)
    os.pwrite(_fd, img, 0)
    return img


def shadow(mem: bytearray, disk: bytearray, bufs, readonly: bool, ident: bytes):
    """(used, status) the device must answer, applying its effects to
    ``mem`` and ``disk``; (-1, None) when the request has no status byte or
    a short header (a driver error)."""
    out = [b for b in bufs if not b[2]]
    inn = [b for b in bufs if b[2]]
    if not inn or inn[-1][1] == 0:
        return -1, None
    status_at = inn[-1][0] + inn[-1][1] - 1
    data_in = inn[:-1] + [(inn[-1][0], inn[-1][1] - 1, True)]
    readable = gather(mem, out)
    if len(readable) < 16:
        return -1, None
    rtype, _res, sector = struct.unpack_from("<IIQ", readable)
    payload = readable[16:]
    cap = SECTORS * blk.SECTOR
    in_bytes = sum(b[1] for b in data_in)
    status, used = blk.BLK_S_OK, 0
    if rtype in (blk.T_IN, blk.T_OUT):
        n = in_bytes if rtype == blk.T_IN else len(payload)
        if sector > cap // blk.SECTOR or n > cap - sector * blk.SECTOR:
            status = blk.BLK_S_IOERR
        elif rtype == blk.T_OUT and readonly:
            status = blk.BLK_S_IOERR
        elif rtype == blk.T_IN:
            apply_writes(mem, data_in, bytes(disk[sector * blk.SECTOR:sector * blk.SECTOR + n]))
            used = n
        else:
            disk[sector * blk.SECTOR:sector * blk.SECTOR + n] = payload
    elif rtype == blk.T_FLUSH:
        pass
    elif rtype == blk.T_GET_ID:
        n = min(blk.ID_BYTES, in_bytes)
        apply_writes(mem, data_in, ident[:n])
        used = n
    elif rtype in (blk.T_DISCARD, blk.T_WRITE_ZEROES):
        status = _ranges(disk, payload, readonly, rtype == blk.T_WRITE_ZEROES)
    else:
        status = blk.BLK_S_UNSUPP
    mem[status_at] = status
    return used + 1, status


def _ranges(disk, payload, readonly, zeroes):
    if not payload or len(payload) % 16 or len(payload) // 16 > blk.MAX_DISCARD_SEGS:
        return blk.BLK_S_UNSUPP
    if readonly:
        return blk.BLK_S_IOERR
    segs = [struct.unpack_from("<QII", payload, 16 * i) for i in range(len(payload) // 16)]
    last = SECTORS
    for sector, num, flags in segs:
        if flags & ~(blk.WRITE_ZEROES_UNMAP if zeroes else 0):
            return blk.BLK_S_UNSUPP
        if num > blk.MAX_DISCARD_SECTORS or sector > last or num > last - sector:
            return blk.BLK_S_IOERR
    for sector, num, _f in segs:
        disk[sector * blk.SECTOR:(sector + num) * blk.SECTOR] = bytes(num * blk.SECTOR)
    return blk.BLK_S_OK


def one_input(data: bytes) -> str:
    r = Reader(data)
    readonly = bool(r.u8() & 1)
    disk = bytearray(_disk(r))
    ring = Ring(r)
    ident = np.frombuffer(b"fuzz-disk".ljust(blk.ID_BYTES, b"\0"), np.uint8).copy()
    limits = np.array([SECTORS * blk.SECTOR, int(readonly), blk.MAX_DISCARD_SECTORS, blk.MAX_DISCARD_SEGS],
                      dtype=np.int64)
    hiov, hdr, segs = host_iov(ring.size), np.zeros(16, np.uint8), np.zeros(16 * blk.MAX_DISCARD_SEGS, np.uint8)
    results = []
    for head, bufs in ring.chains(results):
        want_mem = bytearray(ring.mem.tobytes())
        want_used, want_status = shadow(want_mem, disk, bufs, readonly, bytes(ident))
        # As the device's serve kernel: next_chain's shape rule, then the request.
        err = int(vring.shape_error(ring.q, ring.iov, vring.CHAIN_REQUEST, blk.HDR_SIZE))
        if want_used < 0:
            assert err != vring.OK, ("driver error not caught", bufs)
            results.append(("error", err))
            break
        assert err == vring.OK, ("valid request refused", err, bufs)
        used = int(blk._blk_request(ring.mem, ring.q, ring.iov, hiov, hdr, segs, _fd, limits, ident))
        last = [b for b in bufs if b[2]][-1]
        status = int(ring.mem[last[0] + last[1] - 1])
        assert (used, status) == (want_used, want_status), ((used, status), (want_used, want_status), bufs)
        assert ring.mem.tobytes() == bytes(want_mem), "guest memory differs from the shadow"
        assert os.pread(_fd, len(disk) + 1, 0) == bytes(disk), "disk differs from the shadow disk"
        results.append((head, used, status))
        ring.complete(head, used)
    return digest(results, ring.mem.tobytes(), bytes(disk))


if __name__ == "__main__":
    main("fuzz.fuzz_blk")
