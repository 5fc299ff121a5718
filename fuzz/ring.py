"""A split virtqueue laid out in guard-paged guest RAM from fuzz bytes, and
the reference walk of its chains (tests/naive.py).  The device targets pop
chains through the real vring kernel, check each against the reference, then
hand the popped chain to the device's request kernel."""
from __future__ import annotations

import struct

import numpy as np

import naive
from lguest_jit import vring
from lguest_jit.hw.memory import GuestMemory

from .common import Reader

MEM_SIZE = 0x10000          # 64 KiB of guest RAM between two guard pages
DESC, AVAIL, USED = 0x0000, 0x1000, 0x2000
DATA = 0x3000               # buffers and indirect tables live from here
PAYLOAD = DATA + 0x100      # the rest of the input is copied here
_IMAGE = bytes(DATA) + ((np.arange(MEM_SIZE - DATA) * 7 + 3) & 0xFF).astype(np.uint8).tobytes()
_GM = None


class Ring:
    def __init__(self, r: Reader, max_log2: int = 4):
        global _GM
        if _GM is None:
            _GM = GuestMemory(MEM_SIZE)     # one per process: guard pages on both sides
        self.gm = _GM
        self.mem = self.gm.mem
        self.size = 1 << (r.u8() % (max_log2 + 1))
        flags = r.u8()
        features = (1 << vring.VIRTIO_RING_F_INDIRECT_DESC if flags & 1 else 0) | \
                   (1 << vring.VIRTIO_RING_F_EVENT_IDX if flags & 2 else 0)
        self.indirect_ok = bool(flags & 1)
        self.q = vring.new_queue()
        assert vring.setup_queue(self.q, MEM_SIZE, self.size, 32768, DESC, AVAIL, USED, features) == vring.OK
        start = r.u16()
        self.q[vring.Q_LAST_AVAIL] = start
        self.q[vring.Q_USED_IDX] = start
        # The image is built in Python and copied into guest RAM once: rings
        # zeroed, buffer contents a pattern the target can tell apart, then
        # the descriptor table and the avail ring from the input.
        img = bytearray(_IMAGE)
        for i in range(self.size + 4):      # a few indirect-table descriptors beyond the ring
            self._desc(r, img, DESC + 16 * i if i < self.size else DATA + 16 * (i - self.size))
        struct.pack_into("<HH", img, AVAIL, r.u16(), (start + r.u8() % (self.size + 2)) & 0xFFFF)
        for i in range(self.size):
            struct.pack_into("<H", img, AVAIL + 4 + 2 * i, r.u8() % (self.size + 1))
        self.iov = vring.new_iov(self.size)
        # Whatever input is left is buffer contents (request headers...).
        rest = r.data[r.pos:r.pos + MEM_SIZE - PAYLOAD]
        r.pos += len(rest)
        img[PAYLOAD:PAYLOAD + len(rest)] = rest
        self.mem[:] = np.frombuffer(img, np.uint8)

    def _desc(self, r: Reader, img: bytearray, at: int) -> None:
        kind = r.u8()
        if kind & 0xC0 == 0xC0:        # occasionally a raw 64-bit address (out of RAM, wrapping)
            addr = r.u64()
        elif kind & 0xC0 == 0x80:      # an indirect table in the data area
            addr = DATA + 16 * (r.u8() % 8)
        else:
            addr = DATA + r.u16() % (MEM_SIZE - DATA)
        length = r.u16() % 0x2000 if kind & 0x20 else r.u8()
        if kind & 0x10 and r.u8() & 1:
            length = r.u32()
        struct.pack_into("<QIHH", img, at, addr, length, kind & 7, r.u8() % (self.size + 2))

    def chains(self, results: list):
        """Yield (head, buffers) for each valid chain, as the device's serve
        loop would get them; the ring running empty or an invalid chain
        ends the walk, recorded in ``results``.  The caller completes each
        chain with ``complete`` (or stops, as a device that found an error)."""
        for _ in range(self.size + 2):
            got = self.pop()
            if got is None or isinstance(got, int):
                results.append(got)
                return
            yield got

    def complete(self, head: int, used: int) -> None:
        vring._push(self.mem, self.q, head, used)
        vring._publish(self.mem, self.q)

    def pop(self):
        """Pop one chain with the kernel and the reference; they must agree.
        Returns (head, [(addr, len, writable)...]), None when the ring is
        empty, or the negative error code of an invalid chain."""
        snap = self.mem.tobytes()
        kind, ref = naive.walk_chain(snap, MEM_SIZE, self.size, DESC, AVAIL,
                                     int(self.q[vring.Q_LAST_AVAIL]), self.indirect_ok)
        head = int(vring._pop(self.mem, self.q, self.iov))
        assert self.mem.tobytes() == snap, "pop wrote guest memory"
        if kind == "empty":
            assert head == vring.NO_BUFFER, head
            return None
        if kind == "invalid":
            assert head < 0 and head != vring.NO_BUFFER, (head, "kernel accepted an invalid chain")
            return head
        assert head == ref[0], (head, ref)
        n = int(self.q[vring.Q_OUT] + self.q[vring.Q_IN])
        got = [(int(a), int(ln), bool(w)) for a, ln, w in self.iov[:n].tolist()]
        assert got == ref[1], (got, ref[1])
        return ref


def apply_writes(mem: bytearray, bufs, data: bytes) -> None:
    """Spread ``data`` over writable buffers in order (later ones win where
    they alias, as sequential writes do)."""
    pos = 0
    for a, ln, _w in bufs:
        if pos >= len(data):
            break
        n = min(ln, len(data) - pos)     # an empty buffer takes nothing and is skipped
        mem[a:a + n] = data[pos:pos + n]
        pos += n


def gather(mem: bytes, bufs) -> bytes:
    return b"".join(bytes(mem[a:a + ln]) for a, ln, _w in bufs)
