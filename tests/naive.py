"""Plain-Python reference implementations the kernels are checked against.

Written for clarity, straight from virtio 1.0 §2.4 (split rings) and 1.1
§2.7 (packed rings), with no shared code with lguest_jit.vring.  Only the *valid-chain* result is compared; for invalid
input the reference just says "invalid".
"""
from __future__ import annotations

import struct

NEXT, WRITE, INDIRECT = 1, 2, 4


def walk_chain(mem: bytes, mem_size: int, size: int, desc: int, avail: int, last_avail: int,
               indirect_ok: bool):
    """Return ('empty', None), ('invalid', None) or ('ok', (head, [(addr, len, writable), ...]))."""
    def u16(a): return struct.unpack_from("<H", mem, a)[0]

    def inside(a, n): return 0 <= a and a + n <= mem_size

    idx = u16(avail + 2)
    if idx == last_avail:
        return "empty", None
    if (idx - last_avail) % 65536 > size:
        return "invalid", None
    head = u16(avail + 4 + 2 * (last_avail % size))
    if head >= size:
        return "invalid", None
    out = []
    table, entries, in_indirect, seen = desc, size, False, set()
    i = head
    while True:
        if (table, i) in seen:
            return "invalid", None
        seen.add((table, i))
        addr, length, flags, nxt = struct.unpack_from("<QIHH", mem, table + 16 * i)
        if flags & INDIRECT:
            if not indirect_ok or in_indirect or flags & NEXT or length == 0 or length % 16 or length // 16 > size \
                    or not inside(addr, length):
                return "invalid", None
            table, entries, in_indirect, i = addr, length // 16, True, 0
            continue
        if not inside(addr, length):
            return "invalid", None
        writable = bool(flags & WRITE)
        if not writable and any(w for _, _, w in out):
            return "invalid", None
        out.append((addr, length, writable))
        if len(out) > size:
            return "invalid", None
        if not flags & NEXT:
            return "ok", (head, out)
        if nxt >= entries:
            return "invalid", None
        i = nxt


AVAIL_BIT, USED_BIT = 1 << 7, 1 << 15


def walk_packed(mem: bytes, mem_size: int, size: int, ring: int, pos: int, wrap: int, indirect_ok: bool,
                held=frozenset()):
    """The list at ring position ``pos`` of a packed ring (virtio 1.1 §2.7),
    the device's wrap counter being ``wrap``; ``held`` the buffer IDs the
    device has not given back.  Returns ('empty', None), ('invalid', None)
    or ('ok', (buffer id, ring slots, next pos, next wrap, [(addr, len,
    writable), ...]))."""
    def desc(a):
        return struct.unpack_from("<QIHH", mem, a)          # addr, len, id, flags

    def available(flags, w):
        # §2.7.1: AVAIL matches the lap's wrap counter, USED does not.
        return bool(flags & AVAIL_BIT) == bool(w) and bool(flags & USED_BIT) != bool(w)

    def inside(a, n): return 0 <= a and a + n <= mem_size

    if not available(desc(ring + 16 * pos)[3], wrap):
        return "empty", None
    elements = []
    slots = 0
    while True:
        addr, length, bid, flags = desc(ring + 16 * pos)
        if slots and not available(flags, wrap):
            return "invalid", None
        slots += 1
        pos, wrap = (pos + 1, wrap) if pos + 1 < size else (0, 1 - wrap)
        if flags & INDIRECT:
            if not indirect_ok or slots > 1 or flags & NEXT or length == 0 or length % 16 \
                    or length // 16 > size or not inside(addr, length):
                return "invalid", None
            for k in range(length // 16):
                ea, el, _, ef = desc(addr + 16 * k)
                if ef & INDIRECT or not inside(ea, el):
                    return "invalid", None
                elements.append((ea, el, bool(ef & WRITE)))
        else:
            if not inside(addr, length):
                return "invalid", None
            elements.append((addr, length, bool(flags & WRITE)))
            if flags & NEXT:
                if len(elements) >= size:
                    return "invalid", None
                continue
        break
    if len(elements) > size:
        return "invalid", None
    writable = [w for _, _, w in elements]
    if writable != sorted(writable):                         # readable after writable
        return "invalid", None
    if bid in held:
        return "invalid", None
    return "ok", (bid, slots, pos, wrap, elements)


def packed_wants_interrupt(size: int, used_before: int, used_now: int, flags: int, off_wrap: int) -> bool:
    """Does the driver event suppression structure (§2.7.10, §2.7.14) ask
    for an interrupt, the device having used ring slots ``used_before`` ..
    ``used_now - 1`` (counted from the ring's start, laps included)?
    DESC: some slot in that span is at the event's offset in a lap whose
    wrap counter (1 on the first lap) is the event's."""
    if flags == 1:
        return False
    if flags != 2:
        return True
    off, wrap = off_wrap & 0x7FFF, off_wrap >> 15
    return any(a % size == off and 1 - (a // size) % 2 == wrap for a in range(used_before, used_now))


def vring_need_event(event: int, new: int, old: int) -> bool:
    return (new - event - 1) % 65536 < (new - old) % 65536


def page_walk(mem, cr3: int, vaddr: int):
    """x86-64 4-level translation of ``vaddr`` through the tables at ``cr3``
    in guest memory ``mem`` (4 KiB, 2 MiB and 1 GiB pages, Intel SDM vol. 3
    §4.5).  The physical address, or None when an entry is not present."""
    def entry(table, index):
        return int.from_bytes(bytes(mem[table + 8 * index:table + 8 * index + 8]), "little")
    frame = 0x000FFFFFFFFFF000
    pml4e = entry(cr3 & frame, (vaddr >> 39) & 511)
    if not pml4e & 1:
        return None
    pdpte = entry(pml4e & frame, (vaddr >> 30) & 511)
    if not pdpte & 1:
        return None
    if pdpte & 0x80:
        return (pdpte & 0x000FFFFFC0000000) | (vaddr & 0x3FFFFFFF)
    pde = entry(pdpte & frame, (vaddr >> 21) & 511)
    if not pde & 1:
        return None
    if pde & 0x80:
        return (pde & 0x000FFFFFFFE00000) | (vaddr & 0x1FFFFF)
    pte = entry(pde & frame, (vaddr >> 12) & 511)
    if not pte & 1:
        return None
    return (pte & frame) | (vaddr & 0xFFF)


def bar_decode(bars, size):
    """PCI BAR decode as a plain table: ``bars`` maps slot -> BAR0 register
    value; returns page number -> slot.  A BAR of 0 (unassigned) or the
    all-ones sizing probe decodes nothing; where BARs overlap the lowest
    slot wins (the launcher's documented rule)."""
    probe = ~(size - 1) & 0xFFFFFFFF
    out = {}
    for slot in sorted(bars, reverse=True):       # lower slots overwrite higher ones
        base = bars[slot] & probe
        if base not in (0, probe):
            out[base // size] = slot
    return out


def log2_histogram(latencies_ns, buckets: int = 64) -> list:
    """Latencies counted by bit length: bucket k holds 2**(k-1) .. 2**k - 1
    (bucket 0: zero or negative), the last bucket everything longer."""
    hist = [0] * buckets
    for ns in latencies_ns:
        k = 0 if ns <= 0 else len(bin(ns)) - 2
        hist[min(k, buckets - 1)] += 1
    return hist


def histogram_percentile(hist, p: float):
    """Upper bound of the bucket holding the p-th fraction of the counts
    (the smallest value v such that at least ceil(p * total) counts are <= v)."""
    import math
    total = sum(hist)
    if total == 0:
        return None
    rank = max(1, math.ceil(round(p * total, 9)))
    seen = 0
    for k, c in enumerate(hist):
        seen += c
        if seen >= rank:
            return (1 << k) - 1


def mp_tables(cpus: int, table_addr: int) -> tuple[bytes, bytes]:
    """(floating pointer, configuration table) of an MP 1.4 machine with
    `cpus` processors (APIC ids 0..cpus-1, id 0 the boot processor, local
    APIC version 0x14 at 0xfee00000), bus 0 PCI and bus 1 ISA, no I/O APIC:
    MP 1.4 §4.1 (pointer), §4.2 (header), §4.3.1 (processor), §4.3.2 (bus).
    Field by field, little-endian, every checksum byte making its
    structure sum to 0 mod 256."""
    def le(value, n):
        return bytes((value >> (8 * i)) & 0xFF for i in range(n))

    def fix_checksum(raw, at):
        raw[at] = (256 - sum(raw) % 256) % 256
        return bytes(raw)

    body = b""
    for apic_id in range(cpus):
        flags = 0x01 | (0x02 if apic_id == 0 else 0)         # EN, and BP for the boot CPU
        body += bytes([0, apic_id, 0x14, flags]) + le(0, 4) + le(0, 4) + bytes(8)
    body += bytes([1, 0]) + b"PCI   "
    body += bytes([1, 1]) + b"ISA   "
    length = 44 + len(body)
    header = bytearray(b"PCMP" + le(length, 2) + bytes([4, 0]) + b"LGUESTJT" + b"lguest-jit  "
                       + le(0, 4) + le(0, 2) + le(cpus + 2, 2) + le(0xFEE00000, 4) + le(0, 2) + bytes([0, 0]))
    table = fix_checksum(bytearray(header + body), 7)
    pointer = fix_checksum(bytearray(b"_MP_" + le(table_addr, 4) + bytes([1, 4, 0, 0, 0, 0, 0, 0])), 10)
    return pointer, table
