"""Target: the packed-ring engine (virtio 1.1 §2.7) against malicious rings.

The input lays out a packed ring of any size up to 16 (flags with every
mix of AVAIL/USED marks, IDs from a small range so they collide, lengths
and addresses in and out of RAM, indirect tables with reserved flags),
the device's starting position and wrap counters, then a program: pop
(checked against tests/naive.walk_packed, and that it wrote nothing),
use a held buffer in any order (checked: exactly one used descriptor, in
the right lap, nothing else written), hand the last buffer back (unpop),
rewrite a descriptor as a driver would mid-run, and decide an interrupt
under a fuzzed driver event suppression structure (checked against
naive.packed_wants_interrupt).  A driver error ends the program, as it
ends a queue thread."""
from __future__ import annotations

import struct

import numpy as np

import naive
from lguest_jit import vring
from lguest_jit.hw.memory import GuestMemory

from .common import Reader, digest, main

MEM_SIZE = 0x10000          # 64 KiB between two guard pages
RING, DRIVER_EVENT, DEVICE_EVENT = 0x0000, 0x1000, 0x1004
DATA = 0x3000               # buffers and indirect tables from here
_IMAGE = bytes(DATA) + ((np.arange(MEM_SIZE - DATA) * 5 + 1) & 0xFF).astype(np.uint8).tobytes()
_GM = None
AVAIL, USED = naive.AVAIL_BIT, naive.USED_BIT


def _desc(r: Reader, img: bytearray, at: int, lap_wrap: int) -> None:
    kind = r.u8()
    if kind & 0xC0 == 0xC0:            # a raw 64-bit address (outside RAM, wrapping)
        addr = r.u64()
    elif kind & 0xC0 == 0x80:          # an indirect table in the data area
        addr = DATA + 16 * (r.u8() % 8)
    else:
        addr = DATA + r.u16() % (MEM_SIZE - DATA)
    length = r.u16() % 0x2000 if kind & 0x20 else r.u8()
    if kind & 0x10 and r.u8() & 1:
        length = r.u32()
    marks = r.u8()
    # Mostly the marks of the lap the slot is in; sometimes the other lap's,
    # a used descriptor's, or any of the four combinations.
    lap = AVAIL if lap_wrap else USED
    bits = [lap, lap, lap, AVAIL if not lap_wrap else USED, (AVAIL | USED) if lap_wrap else 0,
            0, AVAIL | USED, lap][marks & 7]
    flags = (kind & 7) | bits | ((marks & 0x38) << 5 if marks & 0x40 else 0)   # reserved bits, sometimes
    struct.pack_into("<QIHH", img, at, addr, length, (marks >> 3) % 6, flags)


def one_input(data: bytes) -> str:
    global _GM
    if _GM is None:
        _GM = GuestMemory(MEM_SIZE)
    mem = _GM.mem
    r = Reader(data)
    size = 1 + r.u8() % 16
    feats = r.u8()
    indirect_ok = bool(feats & 1)
    features = (1 << vring.VIRTIO_F_RING_PACKED) | (1 << vring.VIRTIO_RING_F_INDIRECT_DESC if feats & 1 else 0) \
        | (1 << vring.VIRTIO_RING_F_EVENT_IDX if feats & 2 else 0)
    pos = r.u8() % size
    wrap = (feats >> 2) & 1
    q = vring.new_queue()
    assert vring.setup_queue(q, MEM_SIZE, size, 32768, RING, DRIVER_EVENT, DEVICE_EVENT, features) == vring.OK
    q[vring.Q_LAST_AVAIL] = q[vring.Q_USED_IDX] = pos
    q[vring.Q_AVAIL_WRAP] = q[vring.Q_USED_WRAP] = wrap
    img = bytearray(_IMAGE)
    for i in range(size):
        _desc(r, img, RING + 16 * i, wrap if i >= pos else 1 - wrap)
    for i in range(8):                  # indirect tables' entries
        _desc(r, img, DATA + 16 * i, r.u8() & 1)
    mem[:] = np.frombuffer(img, np.uint8)
    iov = vring.new_iov(size)

    held = []                           # (head, slots) the device popped and has not used
    used_abs = (0 if wrap else size) + pos   # slots used so far, counted from the ring's first lap
    decided_at = used_abs
    event_error = 0
    last_popped = None
    results = []
    for _ in range(64):
        if r.left() <= 0:
            break
        op = r.u8() % 5
        if op == 0:                     # pop
            snap = mem.tobytes()
            ids = {h & 0xFFFF for h, _ in held}
            kind, ref = naive.walk_packed(snap, MEM_SIZE, size, RING, int(q[vring.Q_LAST_AVAIL]),
                                          int(q[vring.Q_AVAIL_WRAP]), indirect_ok, frozenset(ids))
            got = int(vring._pop(mem, q, iov))
            assert mem.tobytes() == snap, "pop wrote guest memory"
            results.append(got)
            if event_error:
                assert got == -event_error, (got, event_error)
                break
            if kind == "empty":
                assert got == vring.NO_BUFFER, got
                last_popped = None
                continue
            if kind == "invalid":
                assert got < 0 and got != vring.NO_BUFFER, (got, "kernel accepted an invalid list")
                break
            bid, slots, npos, nwrap, bufs = ref
            assert got == bid | slots << 16, (got, ref)
            n = int(q[vring.Q_OUT] + q[vring.Q_IN])
            assert [(int(a), int(ln), bool(w)) for a, ln, w in iov[:n].tolist()] == bufs
            assert (int(q[vring.Q_LAST_AVAIL]), int(q[vring.Q_AVAIL_WRAP])) == (npos, nwrap)
            held.append((got, slots))
            last_popped = got
        elif op == 1 and held:          # use a held buffer, in any order
            head, slots = held.pop(r.u8() % len(held))
            length = r.u16()
            at, uwrap = int(q[vring.Q_USED_IDX]), int(q[vring.Q_USED_WRAP])
            before = mem.tobytes()
            vring._push(mem, q, head, length)
            vring._publish(mem, q)
            after = mem.tobytes()
            d = RING + 16 * at
            assert before[:d + 8] == after[:d + 8] and before[d + 16:] == after[d + 16:], "push wrote elsewhere"
            ln, bid, flags = struct.unpack_from("<IHH", after, d + 8)
            assert (ln, bid) == (length, head & 0xFFFF)
            assert flags & (AVAIL | USED) == ((AVAIL | USED) if uwrap else 0) and flags & ~(AVAIL | USED) == \
                (vring.VRING_DESC_F_WRITE if length else 0)
            used_abs += slots
            assert (int(q[vring.Q_USED_IDX]), int(q[vring.Q_USED_WRAP])) == \
                (used_abs % size, 1 - (used_abs // size) % 2)
            last_popped = None
            results.append(("used", bid, ln))
        elif op == 2 and last_popped is not None:   # hand the buffer popped last back
            vring.unpop(q)
            held = [(h, s) for h, s in held if h != last_popped]
            last_popped = None
            results.append("unpop")
        elif op == 3:                   # the driver rewrites a descriptor (more lists, or a changed mind)
            i = r.u8() % size
            img = bytearray(mem.tobytes())
            _desc(r, img, RING + 16 * i, r.u8() & 1)
            mem[RING + 16 * i:RING + 16 * i + 16] = np.frombuffer(bytes(img[RING + 16 * i:RING + 16 * i + 16]),
                                                                  np.uint8)
            last_popped = None
        elif op == 4:                   # interrupt decision under a fuzzed driver event structure
            off_wrap, flags = r.u16(), r.u8() & 3
            struct.pack_into("<HH", mem, DRIVER_EVENT, off_wrap, flags)
            pending = used_abs - decided_at
            got = bool(vring._need_interrupt(mem, q))
            results.append(("irq", got))
            if pending == 0:
                assert not got
                continue
            decided_at = used_abs
            if flags == 3 or (flags == 2 and not feats & 2):
                assert got and q[vring.Q_ERROR] != 0
                # The first rule broken is the one the next pop reports.
                event_error = event_error or (vring.E_PACKED_EVENT_FLAGS if flags == 3 else vring.E_PACKED_EVENT_DESC)
            elif flags == 2 and pending >= size:
                assert got
            elif (off_wrap & 0x7FFF) < size:
                assert got == naive.packed_wants_interrupt(size, used_abs - pending, used_abs, flags, off_wrap), \
                    (size, used_abs, pending, flags, off_wrap)
            last_popped = None
    return digest(results, mem.tobytes())


if __name__ == "__main__":
    main("fuzz.fuzz_packed")
