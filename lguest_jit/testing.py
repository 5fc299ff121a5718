"""A guest-side virtio driver that runs in the launcher's process.

``MockDriver`` plays one split virtqueue the way Linux's
drivers/virtio/virtio_ring.c does: rings in guest memory, a free list
threaded through the descriptor table, direct and indirect chains, the avail
index published after the ring entry, kicks decided with event-idx or the
NO_NOTIFY flag, used entries reaped with ``used_event`` kept current.  Tests
and benchmarks drive the device side with it without a hypervisor.

Buffers: each head index ``h`` owns a fixed data slot of ``slot_bytes`` at
``data_base + h * slot_bytes`` (and an indirect table slot), so a chain's
segments never overlap another in-flight chain's.  An ``add()`` segment is
``bytes`` (device-readable data, copied into the slot), an ``int`` (a
device-writable buffer of that length in the slot) or an ``(addr, length)``
tuple used as it is (for hand-made or malicious layouts).

For malformed-ring tests, ``write_desc`` / ``post`` write raw entries.
"""
from __future__ import annotations

import os

import numpy as np

from . import pci, vring
from .hw.memory import GuestMemory

_NEXT = vring.VRING_DESC_F_NEXT
_WRITE = vring.VRING_DESC_F_WRITE
_INDIRECT = vring.VRING_DESC_F_INDIRECT


class NoSpace(Exception):
    """Not enough free descriptors (virtqueue_add's -ENOSPC)."""


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class MockDriver:
    """A split virtqueue's driver side; with VIRTIO_F_RING_PACKED among
    ``features`` the constructor gives a :class:`PackedDriver` instead, so
    a caller that negotiated the feature drives whichever layout it got."""

    def __new__(cls, gm=None, size=256, base=0x10000, features=0, slot_bytes=4096):
        if cls is MockDriver and features >> vring.VIRTIO_F_RING_PACKED & 1:
            cls = PackedDriver
        return super().__new__(cls)

    packed = False

    def __init__(self, gm: GuestMemory, size: int = 256, base: int = 0x10000,
                 features: int = 0, slot_bytes: int = 4096):
        size, base, slot_bytes = int(size), int(base), int(slot_bytes)
        if size & (size - 1) or not 0 < size <= vring.MAX_QUEUE_SIZE:
            raise ValueError("queue size must be a power of two")
        self.gm, self.mem, self.size = gm, gm.mem, size
        self.features = features
        self.event_idx = bool(features & (1 << vring.VIRTIO_RING_F_EVENT_IDX))
        self.indirect_ok = bool(features & (1 << vring.VIRTIO_RING_F_INDIRECT_DESC))
        self.desc = _align(base, 4096)
        self.avail = self.desc + 16 * size
        self.used = _align(self.avail + 6 + 2 * size, 4096)
        self.indirect_base = _align(self.used + 6 + 8 * size, 4096)
        self.data_base = _align(self.indirect_base + 16 * size * size, 4096)
        self.slot_bytes = slot_bytes
        self.end = self.data_base + size * slot_bytes
        if self.end > gm.size:
            raise ValueError(f"driver layout needs {self.end:#x} bytes of guest RAM, have {gm.size:#x}")
        gm.mem[self.desc:self.indirect_base] = 0
        # Free list threaded through desc.next, as virtio_ring.c does.
        for i in range(size - 1):
            self._st16(self.desc + 16 * i + 14, i + 1)
        self.free_head = 0
        self.num_free = size
        self.avail_shadow = 0
        self.num_added = 0
        self.last_used = 0
        self.avail_flags = 0
        self.inflight: dict[int, tuple[int, list[tuple[int, int, bool]], bool]] = {}

    # -- little helpers over guest memory (plain Python: this is the guest)
    def _ld16(self, a): return int(self.mem[a]) | int(self.mem[a + 1]) << 8
    def _ld32(self, a): return int.from_bytes(self.mem[a:a + 4].tobytes(), "little")
    def _st16(self, a, v): self.mem[a:a + 2] = [v & 0xFF, (v >> 8) & 0xFF]

    def _wdesc(self, table, i, addr, length, flags, nxt):
        d = table + 16 * i
        self.mem[d:d + 16] = list(addr.to_bytes(8, "little") + length.to_bytes(4, "little")
                                  + flags.to_bytes(2, "little") + nxt.to_bytes(2, "little"))

    def rings(self) -> tuple[int, int, int]:
        return self.desc, self.avail, self.used

    def device_queue(self, max_size: int | None = None):
        """The device-side state for this queue, as the transport would set
        it up at queue_enable."""
        q = vring.new_queue()
        err = vring.setup_queue(q, self.gm.size, self.size, max_size or self.size,
                                self.desc, self.avail, self.used, self.features)
        if err:
            raise ValueError(vring.error_message(err))
        return q

    # -- adding buffers
    def add(self, out=(), in_=(), indirect: bool = False, align: int = 0) -> int:
        """Post a chain: each buffer is bytes (device-readable contents), an
        int (a length, placed in the head's slot) or an explicit (addr,
        length).  With ``align``, placed buffers of at least ``align`` bytes
        start on an ``align`` boundary, as Linux's block layer hands devices
        whole pages while headers and status bytes are small allocations."""
        segs = [(s, False) for s in out] + [(s, True) for s in in_]
        if not segs:
            raise ValueError("a chain needs at least one buffer")
        use_indirect = indirect and self.indirect_ok and len(segs) > 1
        need = 1 if use_indirect else len(segs)
        if need > self.num_free:
            raise NoSpace
        head = self.free_head
        slot = self.data_base + head * self.slot_bytes
        placed = []
        cursor = slot
        for s, writable in segs:
            if align and not isinstance(s, tuple) and (s if isinstance(s, int) else len(s)) >= align:
                cursor = -(-cursor // align) * align
            if isinstance(s, tuple):
                addr, length = s
            elif isinstance(s, int):
                addr, length = cursor, s
                cursor += s
            else:
                addr, length = cursor, len(s)
                self.mem[cursor:cursor + length] = np.frombuffer(bytes(s), dtype=np.uint8)
                cursor += length
            placed.append((addr, length, writable))
        if cursor > slot + self.slot_bytes:
            raise ValueError(f"chain needs {cursor - slot} bytes, slots hold {self.slot_bytes}")

        if use_indirect:
            table = self.indirect_base + head * 16 * self.size
            for k, (addr, length, w) in enumerate(placed):
                last = k == len(placed) - 1
                self._wdesc(table, k, addr, length, (_WRITE if w else 0) | (0 if last else _NEXT), 0 if last else k + 1)
            self.free_head = self._ld16(self.desc + 16 * head + 14)
            self._wdesc(self.desc, head, table, 16 * len(placed), _INDIRECT, 0)
        else:
            i = head
            for k, (addr, length, w) in enumerate(placed):
                nxt = self._ld16(self.desc + 16 * i + 14)
                last = k == len(placed) - 1
                self._wdesc(self.desc, i, addr, length, (_WRITE if w else 0) | (0 if last else _NEXT), nxt)
                if not last:
                    i = nxt
            self.free_head = self._ld16(self.desc + 16 * i + 14)
        self.num_free -= need
        self.inflight[head] = (need, placed, use_indirect)
        self.post(head)
        return head

    def post(self, head: int) -> None:
        """Put ``head`` in the avail ring and publish the new index (ring
        entry first; Python's GIL plus x86 store order stands in for wmb)."""
        self._st16(self.avail + 4 + 2 * (self.avail_shadow & (self.size - 1)), head)
        self.avail_shadow = (self.avail_shadow + 1) & 0xFFFF
        self._st16(self.avail + 2, self.avail_shadow)
        self.num_added += 1

    def kick_prepare(self) -> bool:
        """virtqueue_kick_prepare: should the driver notify the device?"""
        new = self.avail_shadow
        old = (new - self.num_added) & 0xFFFF
        self.num_added = 0
        if self.event_idx:
            event = self._ld16(self.used + 4 + 8 * self.size)
            return vring.need_event(event, new, old)
        return not (self._ld16(self.used) & vring.VRING_USED_F_NO_NOTIFY)

    # -- reaping
    def used_idx(self) -> int:
        return self._ld16(self.used + 2)

    def get_used(self):
        """Reap one used entry: (head, length, [bytes of each writable
        segment]) or None."""
        if self.last_used == self.used_idx():
            return None
        e = self.used + 4 + 8 * (self.last_used & (self.size - 1))
        head, length = self._ld32(e), self._ld32(e + 4)
        if head not in self.inflight:
            raise AssertionError(f"device returned head {head}, which is not in flight")
        need, placed, was_indirect = self.inflight.pop(head)
        data = [self.mem[a:a + n].tobytes() for a, n, w in placed if w]
        # Return the descriptors to the free list.
        if was_indirect:
            tail = head
        else:
            tail = head
            for _ in range(need - 1):
                tail = self._ld16(self.desc + 16 * tail + 14)
        self._st16(self.desc + 16 * tail + 14, self.free_head)
        self.free_head = head
        self.num_free += need
        self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx and not (self.avail_flags & vring.VRING_AVAIL_F_NO_INTERRUPT):
            self._st16(self.avail + 4 + 2 * self.size, self.last_used)
        return head, length, data

    def disable_cb(self) -> None:
        self.avail_flags |= vring.VRING_AVAIL_F_NO_INTERRUPT
        if not self.event_idx:
            self._st16(self.avail, self.avail_flags)

    def enable_cb(self) -> bool:
        """Re-enable interrupts; True if used entries are already pending
        (the caller must poll instead of waiting)."""
        self.avail_flags &= ~vring.VRING_AVAIL_F_NO_INTERRUPT
        if self.event_idx:
            self._st16(self.avail + 4 + 2 * self.size, self.last_used)
        else:
            self._st16(self.avail, self.avail_flags)
        return self.last_used != self.used_idx()

    def set_used_event(self, value: int) -> None:
        self._st16(self.avail + 4 + 2 * self.size, value)

    # -- raw access for malformed rings
    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int, table: int | None = None) -> None:
        self._wdesc(self.desc if table is None else table, i, addr, length, flags, nxt)

    def set_avail_idx(self, idx: int) -> None:
        self._st16(self.avail + 2, idx)


class PackedDriver(MockDriver):
    """One packed virtqueue (virtio 1.1 §2.7) driven as Linux's
    virtio_ring.c drives it (virtqueue_add_packed and friends): buffer IDs
    from a free list, a list's descriptors written at the next ring
    positions with each lap's AVAIL/USED bits and the first one's flags
    last, indirect tables without NEXT, kicks decided from the device event
    suppression structure (EVENT_IDX: its offset and wrap), used
    descriptors found by their flags and skipped by their list's length,
    the driver event structure kept current (off_wrap before flags).

    ``add`` returns the buffer ID; ``get_used`` gives (id, length, data).
    Data and indirect-table slots belong to IDs, as they belong to heads
    in :class:`MockDriver`.  ``desc`` is the ring, ``avail`` the driver
    event suppression structure, ``used`` the device's (the addresses the
    transport's queue_desc/driver/device registers take)."""

    packed = True
    F_AVAIL = vring.VRING_PACKED_DESC_F_AVAIL
    F_USED = vring.VRING_PACKED_DESC_F_USED

    def __init__(self, gm: GuestMemory, size: int = 256, base: int = 0x10000,
                 features: int = 0, slot_bytes: int = 4096):
        size, base, slot_bytes = int(size), int(base), int(slot_bytes)
        if not 0 < size <= vring.MAX_PACKED_QUEUE_SIZE:
            raise ValueError("packed queue size must be 1 .. 2**15")
        self.gm, self.mem, self.size = gm, gm.mem, size
        self.features = features | 1 << vring.VIRTIO_F_RING_PACKED
        self.event_idx = bool(features & (1 << vring.VIRTIO_RING_F_EVENT_IDX))
        self.indirect_ok = bool(features & (1 << vring.VIRTIO_RING_F_INDIRECT_DESC))
        self.desc = _align(base, 4096)
        self.avail = self.desc + 16 * size           # driver event suppression
        self.used = self.avail + 4                   # device event suppression
        self.indirect_base = _align(self.used + 4, 4096)
        self.data_base = _align(self.indirect_base + 16 * size * size, 4096)
        self.slot_bytes = slot_bytes
        self.end = self.data_base + size * slot_bytes
        if self.end > gm.size:
            raise ValueError(f"driver layout needs {self.end:#x} bytes of guest RAM, have {gm.size:#x}")
        gm.mem[self.desc:self.indirect_base] = 0      # §2.7.13: the ring starts zeroed
        self.next_id = list(range(1, size)) + [size]   # free list of buffer IDs (desc_extra[].next)
        self.free_head = 0
        self.num_free = size
        self.next_avail = 0
        self.avail_wrap = 1
        self.last_used = 0
        self.used_wrap = 1
        self.num_added = 0
        self.event_shadow = vring.RING_EVENT_FLAGS_ENABLE
        self.inflight: dict[int, tuple[int, list[tuple[int, int, bool]], bool]] = {}
        # The ring descriptors each ID's last list took, (addr, len, flags
        # without the lap bits): what a compiled driver re-posts (benchmarks).
        self.rows: dict[int, list[tuple[int, int, int]]] = {}

    def _ld64(self, a): return int.from_bytes(self.mem[a:a + 8].tobytes(), "little")

    def _wdesc(self, table, i, addr, length, flags, bid):
        # flags None: leave them (a list's first descriptor is exposed last)
        d = table + 16 * i
        raw = addr.to_bytes(8, "little") + length.to_bytes(4, "little") + bid.to_bytes(2, "little")
        if flags is not None:
            raw += flags.to_bytes(2, "little")
        self.mem[d:d + len(raw)] = list(raw)

    def _lap_bits(self, wrap: int) -> int:
        return self.F_AVAIL if wrap else self.F_USED

    def add(self, out=(), in_=(), indirect: bool = False, align: int = 0) -> int:
        segs = [(s, False) for s in out] + [(s, True) for s in in_]
        if not segs:
            raise ValueError("a chain needs at least one buffer")
        use_indirect = indirect and self.indirect_ok and len(segs) > 1
        need = 1 if use_indirect else len(segs)
        if need > self.num_free or self.free_head >= self.size or len(segs) > self.size:
            raise NoSpace                          # (a list is never longer than the ring, §2.7.17)
        bid = self.free_head
        slot = self.data_base + bid * self.slot_bytes
        placed = []
        cursor = slot
        for s, writable in segs:
            if align and not isinstance(s, tuple) and (s if isinstance(s, int) else len(s)) >= align:
                cursor = -(-cursor // align) * align
            if isinstance(s, tuple):
                addr, length = s
            elif isinstance(s, int):
                addr, length = cursor, s
                cursor += s
            else:
                addr, length = cursor, len(s)
                self.mem[cursor:cursor + length] = np.frombuffer(bytes(s), dtype=np.uint8)
                cursor += length
            placed.append((addr, length, writable))
        if cursor > slot + self.slot_bytes:
            raise ValueError(f"chain needs {cursor - slot} bytes, slots hold {self.slot_bytes}")
        head = self.next_avail
        head_flags = None
        rows = self.rows[bid] = []
        if use_indirect:
            table = self.indirect_base + bid * 16 * self.size
            for k, (addr, length, w) in enumerate(placed):
                self._wdesc(table, k, addr, length, _WRITE if w else 0, 0)
            head_flags = _INDIRECT | self._lap_bits(self.avail_wrap)
            self._wdesc(self.desc, head, table, 16 * len(placed), None, bid)
            rows.append((table, 16 * len(placed), _INDIRECT))
            self._step_avail()
        else:
            for k, (addr, length, w) in enumerate(placed):
                flags = (_WRITE if w else 0) | (0 if k == len(placed) - 1 else _NEXT) | self._lap_bits(self.avail_wrap)
                rows.append((addr, length, flags & ~(self.F_AVAIL | self.F_USED)))
                if k == 0:
                    head_flags = flags            # its flags wait for the rest of the list
                    self._wdesc(self.desc, self.next_avail, addr, length, None, bid)
                else:
                    self._wdesc(self.desc, self.next_avail, addr, length, flags, bid)
                self._step_avail()
        self.free_head = self.next_id[bid]
        self.num_free -= need
        self.num_added += need
        self.inflight[bid] = (need, placed, use_indirect)
        # The first descriptor's flags last: the list appears whole (§2.7.6).
        self._st16(self.desc + 16 * head + 14, head_flags)
        return bid

    def _step_avail(self):
        self.next_avail += 1
        if self.next_avail == self.size:
            self.next_avail = 0
            self.avail_wrap ^= 1

    def post(self, head: int) -> None:
        raise NotImplementedError("a packed ring has no avail ring: add() makes a list available")

    def kick_prepare(self) -> bool:
        """virtqueue_kick_prepare_packed."""
        new = self.next_avail
        old = (new - self.num_added) & 0xFFFF
        self.num_added = 0
        off_wrap, flags = self._ld16(self.used), self._ld16(self.used + 2)
        if flags != vring.RING_EVENT_FLAGS_DESC:
            return flags != vring.RING_EVENT_FLAGS_DISABLE
        event = off_wrap & 0x7FFF
        if off_wrap >> 15 != self.avail_wrap:
            event -= self.size
        return vring.need_event(event & 0xFFFF, new, old)

    def _used_at(self, pos: int, wrap: int) -> bool:
        flags = self._ld16(self.desc + 16 * pos + 14)
        avail, used = flags >> 7 & 1, flags >> 15 & 1
        return avail == used == wrap

    def has_used(self) -> bool:
        return self._used_at(self.last_used, self.used_wrap)

    def used_idx(self) -> int:
        raise NotImplementedError("a packed ring has no used index: see has_used()")

    def get_used(self):
        if not self.has_used():
            return None
        d = self.desc + 16 * self.last_used
        length, bid = self._ld32(d + 8), self._ld16(d + 12)
        if bid not in self.inflight:
            raise AssertionError(f"device returned buffer ID {bid}, which is not in flight")
        need, placed, _ = self.inflight.pop(bid)
        data = [self.mem[a:a + n].tobytes() for a, n, w in placed if w]
        self.next_id[bid] = self.free_head
        self.free_head = bid
        self.num_free += need
        self.last_used += need
        if self.last_used >= self.size:
            self.last_used -= self.size
            self.used_wrap ^= 1
        if self.event_shadow == vring.RING_EVENT_FLAGS_DESC:
            self._st16(self.avail, self.last_used | self.used_wrap << 15)
        return bid, length, data

    def disable_cb(self) -> None:
        if self.event_shadow != vring.RING_EVENT_FLAGS_DISABLE:
            self.event_shadow = vring.RING_EVENT_FLAGS_DISABLE
            self._st16(self.avail + 2, self.event_shadow)

    def enable_cb(self) -> bool:
        if self.event_idx:
            self._st16(self.avail, self.last_used | self.used_wrap << 15)
        if self.event_shadow == vring.RING_EVENT_FLAGS_DISABLE:
            self.event_shadow = vring.RING_EVENT_FLAGS_DESC if self.event_idx else vring.RING_EVENT_FLAGS_ENABLE
            self._st16(self.avail + 2, self.event_shadow)
        return self.has_used()

    def set_used_event(self, off: int, wrap: int | None = None) -> None:
        """Ask for an interrupt once the used descriptor at ``off`` (in the
        lap ``wrap``, default the current one) is written (RING_EVENT_FLAGS_DESC)."""
        self._st16(self.avail, off | (self.used_wrap if wrap is None else wrap) << 15)
        self.event_shadow = vring.RING_EVENT_FLAGS_DESC
        self._st16(self.avail + 2, self.event_shadow)

    def set_driver_event_flags(self, flags: int) -> None:
        self.event_shadow = flags
        self._st16(self.avail + 2, flags)

    def write_desc(self, i: int, addr: int, length: int, flags: int, bid: int, table: int | None = None) -> None:
        """Raw ring (or table) entry ``i``: flags as given (add the lap's
        bits yourself, ``lap_bits``)."""
        self._wdesc(self.desc if table is None else table, i, addr, length, flags, bid)

    def lap_bits(self, wrap: int | None = None) -> int:
        """AVAIL/USED bits that mark a descriptor available in lap ``wrap``."""
        return self._lap_bits(self.avail_wrap if wrap is None else wrap)

    def set_avail_idx(self, idx: int) -> None:
        raise NotImplementedError("a packed ring has no avail index")


class RecordingDevice(pci.VirtioDevice):
    """A device for transport tests: no queue threads; it keeps the
    :class:`~lguest_jit.pci.QueueContext` it was activated with (``ctx``)
    and counts resets.  Subclasses set ``device_type``, ``name``,
    ``queue_max_sizes``, ``features``."""

    def __init__(self, config: bytes = b""):
        self.config = np.frombuffer(bytes(config), dtype=np.uint8).copy()
        self.ctx = None
        self.resets = 0

    def activate(self, ctx) -> None:
        self.ctx = ctx

    def reset(self) -> None:
        self.resets += 1


# What the harness programs into MSI-X table entries: the local APIC
# window and one data value (x86: the IDT vector) per entry.
MSI_ADDRESS = 0xFEE00000
MSI_DATA_BASE = 0x40


# Guest-side conf1 helpers: what Linux's pci_conf1_read/write do.

def conf1_address(slot: int, offset: int, bus: int = 0, function: int = 0) -> int:
    return 0x80000000 | bus << 16 | slot << 11 | function << 8 | (offset & 0xFC)


def conf1_read(bus: pci.Bus, slot: int, offset: int, size: int) -> int:
    """outl(address, 0xCF8); in{b,w,l}(0xCFC + (offset & 3))."""
    bus.pio(pci.CONFIG_ADDRESS, 4, True, conf1_address(slot, offset))
    return bus.pio(pci.CONFIG_DATA + (offset & 3), size, False, 0)


def conf1_write(bus: pci.Bus, slot: int, offset: int, size: int, value: int) -> None:
    bus.pio(pci.CONFIG_ADDRESS, 4, True, conf1_address(slot, offset))
    bus.pio(pci.CONFIG_DATA + (offset & 3), size, True, value)


class VirtioPciDriver:
    """Linux's virtio_pci_modern, played through ``bus.pio``/``bus.mmio``:
    find the device in config space, walk its capabilities, negotiate, set
    up every queue with a :class:`MockDriver`, then kick and take
    interrupts as the guest would.

    ``init(msix=True)`` does what Linux does when the device has an MSI-X
    capability (drivers/pci/msi: msix_capability_init; virtio_pci:
    vp_find_vqs_msix with one vector per queue): enable with the function
    masked, mask every entry, program the messages, INTx off, unmask the
    function, unmask each vector; msix_config = 0, queue i -> vector 1 + i,
    each read back.  Interrupts then arrive as messages (the vector's
    eventfd, found from the programmed address/data the way a backend
    routes them) and the ISR is never read.

    ``layout_base`` is where the first queue's rings go in guest memory;
    each queue gets ``queue_span`` bytes from there.
    """

    def __init__(self, bus, slot: int, gm: GuestMemory, layout_base: int = 0x100000,
                 queue_span: int = 0x400000, slot_bytes: int = 4096):
        self.pci = pci
        self.bus, self.slot, self.gm = bus, slot, gm
        self.layout_base, self.queue_span, self.slot_bytes = layout_base, queue_span, slot_bytes
        vendor = self.cfg_read(0, 4)
        if vendor == 0xFFFFFFFF:
            raise LookupError(f"no device in slot {slot}")
        self.device_id = vendor >> 16
        self.bar0 = self.cfg_read(0x10, 4) & ~0xF
        self.irq_line = self.cfg_read(pci.PCI_INTERRUPT_LINE, 1)
        self.caps = {}
        self.msix_cap = 0
        pos = self.cfg_read(pci.PCI_CAPABILITY_LIST, 1)
        while pos:
            cap_id = self.cfg_read(pos, 1)
            if cap_id == pci.PCI_CAP_ID_VNDR:
                kind = self.cfg_read(pos + 3, 1)
                self.caps.setdefault(kind, (pos, self.cfg_read(pos + 8, 4), self.cfg_read(pos + 12, 4)))
            elif cap_id == pci.PCI_CAP_ID_MSIX:
                self.msix_cap = pos
            pos = self.cfg_read(pos + 1, 1)
        self.msix = False           # MSI-X enabled and vectors assigned by init(msix=True)
        notify_pos = self.caps[pci.VIRTIO_PCI_CAP_NOTIFY_CFG][0]
        self.notify_mult = self.cfg_read(notify_pos + 16, 4)
        self.irq_fd = dict(bus.interrupts()).get(self.irq_line)
        self.queues: list[MockDriver] = []

    @classmethod
    def attach(cls, bus, gm: GuestMemory, dev, slot_bytes: int = 4096, **init_kw) -> "VirtioPciDriver":
        """Put ``dev`` on ``bus`` and bring it up as Linux would (:meth:`init`
        with ``init_kw``)."""
        t = bus.add_device(dev)
        drv = cls(bus, t.slot, gm, slot_bytes=slot_bytes)
        drv.init(**init_kw)
        return drv

    # -- config space through conf1, as Linux's pci_conf1_read does
    def cfg_read(self, off: int, size: int) -> int:
        self.bus.pio(0xCF8, 4, True, 0x80000000 | self.slot << 11 | (off & 0xFC))
        return int(self.bus.pio(0xCFC + (off & 3), size, False, 0))

    def cfg_write(self, off: int, size: int, value: int) -> None:
        self.bus.pio(0xCF8, 4, True, 0x80000000 | self.slot << 11 | (off & 0xFC))
        self.bus.pio(0xCFC + (off & 3), size, True, value)

    # -- BAR0 structures
    def _addr(self, kind: int, off: int) -> int:
        return self.bar0 + self.caps[kind][1] + off

    def common_read(self, off, size):
        return int(self.bus.mmio(self._addr(self.pci.VIRTIO_PCI_CAP_COMMON_CFG, off), size, False, 0))

    def common_write(self, off, size, value):
        self.bus.mmio(self._addr(self.pci.VIRTIO_PCI_CAP_COMMON_CFG, off), size, True, value)

    def config_read(self, off, size):
        return int(self.bus.mmio(self._addr(self.pci.VIRTIO_PCI_CAP_DEVICE_CFG, off), size, False, 0))

    def config_write(self, off, size, value):
        self.bus.mmio(self._addr(self.pci.VIRTIO_PCI_CAP_DEVICE_CFG, off), size, True, value)

    def isr(self) -> int:
        return self.bus.mmio(self._addr(self.pci.VIRTIO_PCI_CAP_ISR_CFG, 0), 1, False, 0)

    @property
    def status(self) -> int:
        return self.common_read(0x14, 1)

    def set_status(self, bit: int) -> None:
        self.common_write(0x14, 1, self.status | bit)

    def wait_status(self, bit: int, timeout: float = 5.0) -> bool:
        """Wait until the device sets status ``bit`` (DEVICE_NEEDS_RESET: a
        queue thread found a driver error); False when it did not."""
        import time
        deadline = time.monotonic() + timeout
        while not self.status & bit:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def reset(self) -> None:
        self.common_write(0x14, 1, 0)
        while self.status != 0:
            pass
        self.queues = []

    # -- MSI-X (PCI 3.0 §6.8), as drivers/pci/msi.c programs it
    def msix_table_size(self) -> int:
        return (self.cfg_read(self.msix_cap + pci.PCI_MSIX_FLAGS, 2) & pci.PCI_MSIX_FLAGS_QSIZE) + 1

    def msix_control(self, set_bits: int = 0, clear_bits: int = 0) -> None:
        """pci_msix_clear_and_set_ctrl: read-modify-write Message Control."""
        at = self.msix_cap + pci.PCI_MSIX_FLAGS
        self.cfg_write(at, 2, (self.cfg_read(at, 2) & ~clear_bits) | set_bits)

    def msix_entry(self, v: int, field: int = 0) -> int:
        """Guest address of table entry ``v``'s DWORD ``field`` (0 address
        lo, 1 address hi, 2 data, 3 vector control)."""
        table = self.cfg_read(self.msix_cap + pci.PCI_MSIX_TABLE, 4)
        assert table & 7 == 0, "table BIR is BAR0"
        return self.bar0 + (table & ~7) + pci.MSIX_ENTRY_SIZE * v + 4 * field

    def msix_pba(self, v: int = 0) -> int:
        """The PBA DWORD holding vector ``v``'s pending bit."""
        pba = self.cfg_read(self.msix_cap + pci.PCI_MSIX_PBA, 4)
        return int(self.bus.mmio(self.bar0 + (pba & ~7) + 4 * (v // 32), 4, False, 0))

    def mask_vector(self, v: int, masked: bool = True) -> None:
        """pci_msix_write_vector_ctrl, then the flushing read Linux does."""
        self.bus.mmio(self.msix_entry(v, 3), 4, True, 1 if masked else 0)
        self.bus.mmio(self.msix_entry(v, 2), 4, False, 0)

    def enable_msix(self, nvec: int) -> None:
        """msix_capability_init + request_irq of ``nvec`` vectors."""
        if not self.msix_cap:
            raise LookupError("the device has no MSI-X capability")
        if nvec > self.msix_table_size():
            raise ValueError(f"{nvec} vectors wanted, the table has {self.msix_table_size()}")
        self.msix_control(pci.PCI_MSIX_FLAGS_ENABLE | pci.PCI_MSIX_FLAGS_MASKALL)
        for v in range(self.msix_table_size()):            # msix_mask_all
            self.bus.mmio(self.msix_entry(v, 3), 4, True, 1)
        for v in range(nvec):                              # __pci_write_msi_msg, entry masked
            for field, val in ((0, MSI_ADDRESS), (1, 0), (2, MSI_DATA_BASE + v)):
                self.bus.mmio(self.msix_entry(v, field), 4, True, val)
            self.bus.mmio(self.msix_entry(v, 2), 4, False, 0)
        self.cfg_write(pci.PCI_COMMAND, 2, self.cfg_read(pci.PCI_COMMAND, 2) | pci.PCI_COMMAND_INTX_DISABLE)
        self.msix_control(clear_bits=pci.PCI_MSIX_FLAGS_MASKALL)
        for v in range(nvec):                              # request_irq -> unmask
            self.mask_vector(v, False)

    def vector_fd(self, v: int):
        """Where a message for table entry ``v`` lands: the eventfd the bus
        routes this entry's programmed address/data to (None if none)."""
        want = (MSI_ADDRESS, MSI_DATA_BASE + v)
        for fd, address, data in self.bus.msi_routes():
            if (address, data) == want:
                return fd
        return None

    def init(self, accept=lambda offered: offered, queue_sizes=None, msix: bool = False, enable=None) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (and re-read),
        (MSI-X), queues, DRIVER_OK.  ``accept(offered) -> wanted`` picks
        features; ``enable``: the queue indices to set up (default all; the
        others stay disabled and ``queues[i]`` is None, as when Linux uses
        fewer queues than the device offers).  Returns the negotiated
        features."""
        pci = self.pci
        self.reset()
        self.set_status(pci.ACKNOWLEDGE)
        self.set_status(pci.DRIVER)
        offered = 0
        for sel in (0, 1):
            self.common_write(0x00, 4, sel)
            offered |= self.common_read(0x04, 4) << (32 * sel)
        wanted = accept(offered) & offered
        for sel in (0, 1):
            self.common_write(0x08, 4, sel)
            self.common_write(0x0C, 4, (wanted >> (32 * sel)) & 0xFFFFFFFF)
        self.set_status(pci.FEATURES_OK)
        if not self.status & pci.FEATURES_OK:
            raise RuntimeError("device refused FEATURES_OK")
        nq = self.common_read(0x12, 2)
        self.msix = bool(msix and self.msix_cap)
        if self.msix:
            self.enable_msix(nq + 1)
            self.common_write(0x10, 2, 0)                  # vp_modern_config_vector
            if self.common_read(0x10, 2) != 0:
                raise RuntimeError("the device refused the configuration vector")
        for i in range(nq):
            if enable is not None and i not in enable:
                self.queues.append(None)
                continue
            self.common_write(0x16, 2, i)
            size = self.common_read(0x18, 2)
            if queue_sizes and i < len(queue_sizes) and queue_sizes[i]:
                size = queue_sizes[i]
                self.common_write(0x18, 2, size)
            drv = MockDriver(self.gm, size=size, base=self.layout_base + i * self.queue_span,
                             features=wanted, slot_bytes=self.slot_bytes)
            drv.notify_addr = self._addr(pci.VIRTIO_PCI_CAP_NOTIFY_CFG, self.common_read(0x1E, 2) * self.notify_mult)
            for off, val in ((0x20, drv.desc), (0x28, drv.avail), (0x30, drv.used)):
                self.common_write(off, 4, val & 0xFFFFFFFF)
                self.common_write(off + 4, 4, val >> 32)
            if self.msix:                                  # vp_modern_queue_vector
                self.common_write(0x1A, 2, 1 + i)
                if self.common_read(0x1A, 2) != 1 + i:
                    raise RuntimeError(f"the device refused vector {1 + i} for queue {i}")
            self.common_write(0x1C, 2, 1)
            self.queues.append(drv)
        self.set_status(pci.DRIVER_OK)
        self.features = wanted
        return wanted

    # -- running
    def kick(self, i: int) -> bool:
        """Notify queue ``i`` if the device asked for it; True if notified."""
        drv = self.queues[i]
        if drv.kick_prepare():
            self.bus.mmio(drv.notify_addr, 2, True, i)
            return True
        return False

    def wait_used(self, i: int, timeout: float = 5.0):
        """The next used entry of queue ``i``, taking interrupts (ISR read
        clears them) while waiting.  Raises TimeoutError."""
        import time
        drv = self.queues[i]
        deadline = time.monotonic() + timeout
        while True:
            got = drv.get_used()
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {i}: no used buffer within {timeout}s")
            if self.msix:
                self.wait_interrupt(min(left, 0.05), vector=1 + i)   # vp_vring_interrupt: no ISR
            elif self.wait_interrupt(min(left, 0.05)):
                self.isr()

    def wait_interrupt(self, timeout: float, vector: int | None = None) -> bool:
        """Wait up to ``timeout`` s for the device's interrupt (INTx, or the
        message of MSI-X ``vector``); True if it came (consumed)."""
        import select
        import time
        fd = self.irq_fd if vector is None else self.vector_fd(vector)
        if fd is None:
            time.sleep(min(timeout, 0.001))
            return False
        if select.select([fd], [], [], timeout)[0]:
            os.eventfd_read(fd)
            return True
        return False


def netns_problem() -> str | None:
    """None when this host lets us make a private network namespace
    (``unshare --net``) and a tap inside it; else why not.  The net tests
    and ``bench net`` run there, so nothing reaches the host's network."""
    import shutil
    import subprocess
    import sys
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    try:
        r = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare --net failed: {e}"
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip() or r.returncode}"
    # Opening /dev/net/tun can still be refused (a container without
    # CAP_NET_ADMIN or the device cgroup entry): try one tap in a namespace.
    from .devices.net import IFF_NO_PI, IFF_TAP, TUNSETIFF
    probe = ("import fcntl, os, struct\n"
             "fd = os.open('/dev/net/tun', os.O_RDWR)\n"
             f"fcntl.ioctl(fd, {TUNSETIFF:#x}, struct.pack('16sH22x', b'tap%d', {IFF_TAP | IFF_NO_PI:#x}))\n")
    r = subprocess.run(["unshare", "--net", sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [str(r.returncode)])[-1]
        return f"cannot create a tap in a network namespace: {last}"
    return None


class VsockGuest:
    """The guest side of virtio-vsock (Linux's virtio_transport), played
    over a :class:`VirtioPciDriver` of a vsock device: receive buffers kept
    posted, packets sent on the tx queue, event buffers posted.  Headers are
    ``struct virtio_vsock_hdr`` (§5.10.6); ``send`` can break any field."""

    HDR = "<QQIIIHHIII"
    HDR_SIZE = 44

    def __init__(self, drv: VirtioPciDriver, cid: int, rx_buf: int = 4096 + 44, buf_alloc: int = 256 * 1024):
        import struct
        self.struct = struct
        self.drv, self.cid, self.rx_buf, self.buf_alloc = drv, cid, rx_buf, buf_alloc
        self.fwd_cnt = {}          # (guest port, host port) -> bytes the guest consumed
        for _ in range(drv.queues[0].num_free):
            drv.queues[0].add(in_=[rx_buf])
        drv.kick(0)
        for _ in range(drv.queues[2].num_free):
            drv.queues[2].add(in_=[4])
        drv.kick(2)

    def header(self, op, src_port, dst_port, length=0, *, type_=1, flags=0, src_cid=None, dst_cid=2,
               buf_alloc=None, fwd_cnt=None) -> bytes:
        fwd = self.fwd_cnt.get((src_port, dst_port), 0) if fwd_cnt is None else fwd_cnt
        return self.struct.pack(self.HDR, self.cid if src_cid is None else src_cid, dst_cid, src_port, dst_port,
                                length, type_, op, flags, self.buf_alloc if buf_alloc is None else buf_alloc,
                                fwd & 0xFFFFFFFF)

    def send(self, op, src_port, dst_port, payload=b"", *, length=None, kick=True, **kw) -> None:
        """One packet on the tx queue (header and payload in one buffer),
        tx buffers the device finished with reaped first; ``kick=False``
        leaves the notification to a later send (a batch, as Linux's
        virtio_transport_send_pkt_work does)."""
        q = self.drv.queues[1]
        while q.get_used() is not None:
            pass
        while q.num_free == 0:
            import time
            self.drv.kick(1)
            time.sleep(0.0005)
            while q.get_used() is not None:
                pass
        hdr = self.header(op, src_port, dst_port, len(payload) if length is None else length, **kw)
        q.add(out=[hdr + bytes(payload)])
        if kick:
            self.drv.kick(1)

    def recv(self, timeout: float = 5.0) -> dict:
        """The next packet the device put on the rx queue (its buffer posted
        again): the header's fields and ``data``."""
        head, length, data = self.drv.wait_used(0, timeout)
        raw = data[0][:length]
        f = self.struct.unpack(self.HDR, raw[:self.HDR_SIZE])
        pkt = dict(zip(("src_cid", "dst_cid", "src_port", "dst_port", "len", "type", "op", "flags",
                        "buf_alloc", "fwd_cnt"), f))
        pkt["data"] = raw[self.HDR_SIZE:self.HDR_SIZE + pkt["len"]]
        self.drv.queues[0].add(in_=[self.rx_buf])
        self.drv.kick(0)
        return pkt

    def consumed(self, src_port, dst_port, n) -> None:
        """The guest's application read ``n`` bytes (its next header says so)."""
        key = (src_port, dst_port)
        self.fwd_cnt[key] = self.fwd_cnt.get(key, 0) + n

    def event(self, timeout: float = 5.0) -> int:
        """The next event's id (VIRTIO_VSOCK_EVENT_*)."""
        head, length, data = self.drv.wait_used(2, timeout)
        self.drv.queues[2].add(in_=[4])
        self.drv.kick(2)
        return int.from_bytes(data[0][:4], "little")
